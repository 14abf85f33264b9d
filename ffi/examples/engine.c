/*
 * A minimal engine in C: creates its control segment, keeps one request in the request table,
 * publishes a status every step and answers the llumlet's status requests.
 *
 *   cc -I ffi/include ffi/examples/engine.c -L target/debug -lllumlet_ffi -o engine
 *   ./engine SHM_NAME_OR_PATH SECONDS
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "llumlet.h"

#define CHECK(call)                                                              \
  do {                                                                           \
    int rc_ = (call);                                                            \
    if (rc_ < 0) {                                                               \
      fprintf(stderr, "%s failed (%d): %s\n", #call, rc_, llumlet_last_error()); \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s SHM SECONDS\n", argv[0]);
    return 2;
  }
  int steps = atoi(argv[2]) * 100;

  /* Errors are codes with a message, never a crash. */
  if (llumlet_engine_publish(NULL, NULL) != LLUMLET_ERR_NULL) return 1;
  printf("expected error: %s\n", llumlet_last_error());

  llumlet_engine *engine = NULL;
  CHECK(llumlet_engine_create("c-example", argv[1], &engine));

  const char *waiting[] = {"c-req-1", "c-req-2"};
  CHECK(llumlet_engine_set_waiting_ids(engine, waiting, 2, false));
  uint32_t blocks[] = {0, 1, 2};
  uint32_t slot = 0;
  CHECK(llumlet_engine_add_request(engine, "c-req-0", LLUMLET_REQ_RUNNING, 0, 40, 0, blocks, 3, &slot));

  llumlet_status st = {0};
  st.num_running_requests = 1;
  st.num_waiting_requests = 2;
  st.num_total_gpu_tokens = 4096;
  st.profiling_id = -1;

  struct timespec step = {0, 10 * 1000 * 1000};
  uint32_t next_block = 3;
  for (int i = 1; i <= steps; i++) {
    llumlet_command cmd;
    int got;
    while ((got = llumlet_engine_poll_command(engine, &cmd)) == 1) {
      if (cmd.kind == LLUMLET_CMD_STATUS_REQUEST) {
        CHECK(llumlet_engine_publish(engine, &st));
        llumlet_command reply = {LLUMLET_CMD_STATUS_PUBLISHED, 0, cmd.id, 0};
        CHECK(llumlet_engine_published(engine, &reply.a));
        CHECK(llumlet_engine_send(engine, &reply));
      }
    }
    CHECK(got);
    st.step_id = i;
    st.update_id = i;
    uint32_t output = (uint32_t)i;
    if ((40 + output) % 16 == 1) { /* the request filled a block: append one */
      CHECK(llumlet_engine_request_progress(engine, slot, LLUMLET_REQ_RUNNING, output, &next_block, 1));
      next_block++;
    } else {
      CHECK(llumlet_engine_request_progress(engine, slot, LLUMLET_REQ_RUNNING, output, NULL, 0));
    }
    st.num_used_gpu_tokens = (int32_t)(next_block * 16);
    CHECK(llumlet_engine_publish(engine, &st));
    nanosleep(&step, NULL);
  }
  llumlet_engine_destroy(engine);
  printf("done after %d steps\n", steps);
  return 0;
}

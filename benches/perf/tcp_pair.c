/* A loopback TCP copy in C, the reference for the perf tool's tcp baselines: SIZE MiB written
 * from a pre-faulted buffer and read into another, in pieces of CHUNK KiB each way, with a
 * one-byte acknowledgement per iteration (as a transfer stage waits for its StageAck). The
 * receiver is another process (`processes`, as two llumlets are) or a thread of this one
 * (`threads`). Prints one JSON line like the perf tool's.
 *
 *   cc -O2 -pthread -o tcp_pair benches/perf/tcp_pair.c
 *   ./tcp_pair SIZE_MIB ITERS CHUNK_KIB processes|threads
 */
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static size_t size, chunk;
static int iters, listener;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *receive(void *unused) {
    (void)unused;
    int s = accept(listener, 0, 0), one = 1;
    char *b = malloc(size);
    if (s < 0 || !b) exit(1);
    memset(b, 1, size);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (int i = 0; i <= iters; i++) {
        for (size_t got = 0; got < size;) {
            size_t c = size - got < chunk ? size - got : chunk;
            ssize_t r = read(s, b + got, c);
            if (r <= 0) exit(1);
            got += (size_t)r;
        }
        if (write(s, "k", 1) != 1) exit(1);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SIZE_MIB ITERS CHUNK_KIB processes|threads\n", argv[0]);
        return 2;
    }
    size = (size_t)atol(argv[1]) << 20;
    iters = atoi(argv[2]);
    chunk = (size_t)atol(argv[3]) << 10;
    int threads = strcmp(argv[4], "threads") == 0;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    socklen_t al = sizeof a;
    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(listener, (void *)&a, sizeof a) || listen(listener, 1) ||
        getsockname(listener, (void *)&a, &al))
        return 1;
    pthread_t th;
    pid_t child = -1;
    if (threads) {
        pthread_create(&th, 0, receive, 0);
    } else if ((child = fork()) == 0) {
        receive(0);
        _exit(0);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (connect(s, (void *)&a, sizeof a)) return 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *b = malloc(size), ack;
    if (!b) return 1;
    memset(b, 2, size);
    double total = 0;
    for (int i = 0; i <= iters; i++) { /* iteration 0 warms up */
        double t0 = now();
        for (size_t done = 0; done < size;) {
            size_t c = size - done < chunk ? size - done : chunk;
            ssize_t w = write(s, b + done, c);
            if (w <= 0) return 1;
            done += (size_t)w;
        }
        if (read(s, &ack, 1) != 1) return 1;
        if (i > 0) total += now() - t0;
    }
    if (child > 0) waitpid(child, 0, 0);
    printf("{\"bench\":\"baseline\",\"transport\":\"c-tcp-%s-%zuk\",\"bytes\":%zu,\"iters\":%d,"
           "\"gb_per_s\":%.3f}\n",
           threads ? "threads" : "processes", chunk >> 10, size, iters,
           (double)size * iters / total / 1e9);
    return 0;
}

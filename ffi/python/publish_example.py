"""Publishes a status from Python through the C ABI for SECONDS, answering status requests.

usage: publish_example.py SHM SECONDS
"""
import sys
import time

from llumlet_engine import Engine, LlumletError, REQ_RUNNING

shm, seconds = sys.argv[1], float(sys.argv[2])
with Engine("py-example", shm=shm) as e:
    try:
        e.set_waiting_ids(["x" * 64])
    except LlumletError as err:
        print(f"expected error: {err}")
    e.set_waiting_ids(["py-req-1"])
    e.add_request("py-req-0", REQ_RUNNING, 0, 30, 0, [5, 6])
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        step += 1
        e.serve_status_requests()
        e.publish(step_id=step, update_id=step, num_running_requests=7, num_waiting_requests=1,
                  num_total_gpu_tokens=8192, num_used_gpu_tokens=512, profiling_id=-1)
        time.sleep(0.01)
print("done")

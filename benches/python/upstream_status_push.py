"""Baseline: the upstream Python llumlet's status push path, measured in CPU time per push.

Mirrors upstream `run_busy_loop` in push mode with a status already available: take the newest
status (a dataclass, as the engine's InstanceStatus), convert it to the protobuf (`to_cms_status`,
field by field), complete it (timestamp, instance id, migration slots), `SerializeToString`, and
`await redis.set(key, value, ex=ttl)` with redis.asyncio; then sleep for the rest of the interval.

usage: upstream_status_push.py REDIS_PORT SECONDS INTERVAL_S
"""
import asyncio
import dataclasses
import os
import sys
import tempfile
import time


def generate(out):
    from grpc_tools import protoc

    proto = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "proto")
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", os.path.join(proto, "cms.proto")]) == 0
    sys.path.insert(0, out)


@dataclasses.dataclass
class InstanceStatus:
    instance_id: str = ""
    schedulable: bool = True
    timestamp_ms: int = 0
    step_id: int = 1
    update_id: int = 1
    recent_waiting_requests: list = dataclasses.field(default_factory=list)
    waiting_requests: list = dataclasses.field(default_factory=lambda: [f"chatcmpl-{i:032}" for i in range(8)])
    hybrid_scheduler_waiting_to_decode_requests_num: int = 0
    scheduler_waiting_to_decode_requests_num: int = 0
    num_waiting_requests: int = 8
    scheduler_running_to_decode_requests_num: int = 0
    num_running_requests: int = 64
    num_loading_requests: int = 0
    num_total_gpu_tokens: int = 1 << 20
    num_used_gpu_tokens: int = 123456
    num_uncomputed_tokens_hybrid_scheduler_waiting_prefills: int = 0
    num_unallocated_tokens_hybrid_scheduler_waiting_decodes: int = 0
    hybrid_scheduler_waiting_to_decode_tokens_num: int = 0
    num_uncomputed_tokens_scheduler_waiting_prefills: int = 0
    scheduler_waiting_to_decode_tokens_num: int = 0
    num_uncomputed_tokens_scheduler_running_prefills: int = 0
    num_unallocated_tokens_scheduler_running_prefills: int = 0
    scheduler_running_to_decode_tokens_num: int = 0
    num_tokens_loading_requests: int = 0
    num_uncomputed_tokens_all_waiting_prefills: int = 0
    num_migrate_in_reqs: int = 0
    num_migrate_out_reqs: int = 0
    num_available_migrate_in_slots: int = 0
    num_available_migrate_out_slots: int = 0
    profiling_id: int = -1
    step_duration: float = 0.0
    num_scheduled_prefill_tokens: int = 0


def to_cms_status(st, cms_pb2):
    pb = cms_pb2.InstanceStatus()
    for f in dataclasses.fields(st):
        v = getattr(st, f.name)
        if isinstance(v, list):
            getattr(pb, f.name).extend(v)
        else:
            setattr(pb, f.name, v)
    return pb


async def main():
    port, seconds, interval = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    import redis.asyncio as aioredis
    import cms_pb2

    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    queue = asyncio.Queue()
    status = InstanceStatus()
    pushes = 0

    async def one_iteration():
        await queue.put(status)
        st = await asyncio.wait_for(queue.get(), 30)
        while not queue.empty():
            st = queue.get_nowait()
        pb = to_cms_status(st, cms_pb2)
        pb.timestamp_ms = int(time.time() * 1000)
        pb.instance_id = "bench-py"
        pb.num_available_migrate_in_slots = 1 - pb.num_migrate_in_reqs
        pb.num_available_migrate_out_slots = 1 - pb.num_migrate_out_reqs
        await client.set("llumnix:instance_status:bench-py", pb.SerializeToString(), ex=100)

    for _ in range(200):  # warm-up
        await one_iteration()
    cpu0, end = time.process_time(), time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        await one_iteration()
        pushes += 1
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    cpu = time.process_time() - cpu0
    print(f'{{"what":"python upstream-style status push","interval_s":{interval},"pushes":{pushes},'
          f'"cpu_s":{cpu:.3f},"cpu_us_per_push":{cpu / pushes * 1e6:.2f}}}')


with tempfile.TemporaryDirectory() as out:
    generate(out)
    asyncio.run(main())

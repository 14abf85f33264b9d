"""The vLLM adapter against real vLLM 0.18 engines (the stand-in model on CPU), real llumlet
binaries, a real Redis and the scheduler's gRPC `Migrate` (scripts/test.sh runs this file in
the cached vLLM environment).
"""
import time

import pytest

from harness import Driver, Instance, Redis, migrate, until
from llumlet_stand_in.executor import expected_tokens

BLOCK = 16


@pytest.fixture
def redis():
    r = Redis()
    yield r
    r.close()


@pytest.fixture
def pair(redis):
    made = []

    def make(name, **kw):
        i = Instance(redis, name, **kw)
        made.append(i)
        return i

    yield make
    for i in made:
        i.close()


def prompt(n: int, seed: int) -> list[int]:
    return [10 + (seed * 37 + k * 11) % 900 for k in range(n)]


def idle(inst) -> bool:
    s = inst.status()
    return (s is not None and s.num_running_requests == 0 and s.num_waiting_requests == 0
            and s.num_used_gpu_tokens == BLOCK)  # vLLM's null block is never free


def test_requests_migrate_both_ways_and_every_stream_is_whole(pair):
    # vLLM's default prefix caching on: migrated-in blocks are registered under their hashes.
    a, b = pair("a", enable_prefix_caching=True), pair("b", enable_prefix_caching=True)
    da, db = Driver(a), Driver(b)
    prompts = {}
    for i in range(4):
        prompts[f"a{i}"] = prompt(40 + 7 * i, i)
        da.add(f"a{i}", prompts[f"a{i}"], 60)
    for i in range(2):
        prompts[f"b{i}"] = prompt(30 + 5 * i, 10 + i)
        db.add(f"b{i}", prompts[f"b{i}"], 60)
    da.start()
    db.start()
    logs = lambda: a.logs() + b.logs()  # noqa: E731
    until(30, "every request decoding", lambda: min(da.progress().values()) >= 5
          and min(db.progress().values()) >= 5, logs)

    ok, msg = migrate(a, b, num_reqs=2)
    assert ok, msg + logs()
    assert len(b.arrivals()) == 2, logs()
    ok, msg = migrate(b, a, num_reqs=1)
    assert ok, msg + logs()
    assert len(a.arrivals()) == 1, logs()

    until(60, "every request finished", lambda: da.done() and db.done(), logs)
    assert da.error is None and db.error is None, (da.error, db.error)
    for d in (da, db):
        for rid, toks in d.tokens.items():
            # The client that sent the request got all of it, once: nothing missing or repeated.
            assert toks == expected_tokens(prompts[rid], 60), (rid, toks)
            assert d.finished[rid] == 1, rid
    # Both engines hold nothing afterwards: the sources freed what migrated out, the
    # destinations what ran to the end there; vLLM's counts say so through the CMS.
    until(10, "both instances idle in the CMS", lambda: idle(a) and idle(b), logs)
    assert a.status().num_total_gpu_tokens == b.status().num_total_gpu_tokens > 0
    assert a.metric('llumlet_migrations_total{side="out",outcome="migrated"') == 2, a.logs()
    assert b.metric('llumlet_migrations_total{side="in",outcome="migrated"') == 2, b.logs()
    assert b.metric('llumlet_migrations_total{side="out",outcome="migrated"') == 1, b.logs()


def test_status_in_the_cms_is_what_the_vllm_scheduler_shows(redis):
    """The engine core runs in this process here, so the test can read vLLM's scheduler at the
    step the status was taken; the status is read back from Redis with the upstream protos."""
    inst = Instance(redis, "s", step_ms=0, multiprocess=False, max_num_batched_tokens=64,
                    max_num_seqs=3)
    try:
        d = Driver(inst)
        for i in range(6):  # more than max_num_seqs: some wait; prompts longer than a step's budget
            d.add(f"s{i}", prompt(50 + 27 * i, i), 40)
        sched = inst.engine.engine_core.engine_core.scheduler
        def mid_prefill():
            return any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running)

        for _ in range(30):  # until someone is mid-prefill with others waiting
            inst.engine.step()
            if mid_prefill() and sched.waiting:
                break
        # Nothing steps now: the scheduler holds still, and the llumlet's last push is final.
        until(10, "the CMS status of this step", lambda: inst.status().step_id == sched.step_id,
              inst.logs)
        s = inst.status()
        waiting = list(sched.waiting) + list(sched.skipped_waiting)
        running = list(sched.running)
        assert running and waiting
        free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        total = sched.cache_config.num_gpu_blocks * BLOCK
        assert s.schedulable and s.instance_id == inst.id
        assert s.update_id == sched.update_id
        assert s.num_running_requests == len(running)
        assert s.num_waiting_requests == len(waiting)
        assert s.num_total_gpu_tokens == total
        assert s.num_used_gpu_tokens == total - free * BLOCK
        assert list(s.waiting_requests) == [r.request_id for r in waiting]
        # Every request was waiting when some step began, and arrived under 10 s ago.
        assert set(s.recent_waiting_requests) == set(sched.requests)
        prefilling = [r for r in running if r.num_computed_tokens < r.num_prompt_tokens]
        assert prefilling, "a step's budget is smaller than a prompt: someone is mid-prefill"
        assert s.num_unallocated_tokens_scheduler_running_prefills == sum(
            r.num_tokens - r.num_computed_tokens for r in prefilling)
        assert s.num_uncomputed_tokens_scheduler_running_prefills == \
            s.num_unallocated_tokens_scheduler_running_prefills  # taken after the step
        assert s.scheduler_running_to_decode_requests_num == len(running)
        assert s.scheduler_running_to_decode_tokens_num == sum(r.num_tokens for r in running)
        assert s.scheduler_waiting_to_decode_requests_num == len(waiting)
        assert s.num_uncomputed_tokens_scheduler_waiting_prefills == sum(
            r.num_tokens - r.num_computed_tokens for r in waiting)
        assert s.num_uncomputed_tokens_all_waiting_prefills == \
            s.num_uncomputed_tokens_scheduler_waiting_prefills
        assert s.num_migrate_in_reqs == s.num_migrate_out_reqs == 0
        assert s.profiling_id == -1 and s.step_duration > 0
        # The llumlet's own fields, from its migration settings.
        assert s.num_available_migrate_in_slots == 4 and s.num_available_migrate_out_slots == 4
    finally:
        inst.close()

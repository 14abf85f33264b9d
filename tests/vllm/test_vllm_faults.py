"""The migration fault suite with vLLM engines: a llumlet killed, or its transfer connection
cut, at each step of the protocol (`LLUMLET_TEST_FAULTS`), the killed llumlet restarted after
the `Migrate` call returns. Whatever happens, every request reaches its client whole and once,
it moved or stayed as the step allows, and neither engine holds a block afterwards (no
reservation left, nothing suspended, nothing running twice).
"""
import itertools

import pytest

from harness import Driver, Instance, Redis, migrate, until
from llumlet_stand_in.executor import expected_tokens

BLOCK = 16
CASES = [
    # fault, whose llumlet, where the request ends (moved, stayed or either), requests on the
    # source (its batch holds 2) and their tokens, the other llumlet's environment
    ("src-after-stage0=kill", "src", "stayed", 2, 70, {}),
    ("src-after-suspend=kill", "src", "stayed", 2, 70, {}),
    ("src-after-commit=kill", "src", "moved", 2, 70, {}),
    ("src-after-committed=kill", "src", "moved", 2, 70, {}),
    ("dst-after-reserve=kill", "dst", "stayed", 2, 70, {}),
    ("dst-before-commit=kill", "dst", "either", 2, 70, {}),
    ("dst-after-commit=kill", "dst", "moved", 2, 70, {}),
    ("src-after-stage0=cut", "src", "stayed", 2, 70, {}),
    ("src-after-commit=cut", "src", "moved", 2, 70, {}),
    ("dst-after-commit=cut", "dst", "moved", 2, 70, {}),
    # The source stalls (12 s) with the request suspended and the destination gives up on it;
    # waiting requests take the freed seat in vLLM's batch meanwhile, so the one that comes
    # back finds the batch full (vLLM's own preemption takes it: recomputed, stream unchanged).
    ("src-after-suspend=hang", "src", "stayed", 6, 400, {"LLUMLET_TRANSFER_IDLE_TIMEOUT": "2"}),
]
_ids = itertools.count()


@pytest.fixture(scope="module")
def engines():
    redis = Redis()
    a = Instance(redis, "fa", step_ms=20, max_num_seqs=2)
    b = Instance(redis, "fb", step_ms=20, max_num_seqs=2)
    yield a, b
    a.close()
    b.close()
    redis.close()


def idle(inst) -> bool:
    s = inst.status()
    return (s is not None and s.num_running_requests == 0 and s.num_waiting_requests == 0
            and s.num_used_gpu_tokens == BLOCK)


@pytest.mark.parametrize("fault,who,expect,n,tokens,other_env", CASES, ids=[c[0] for c in CASES])
def test_fault(engines, fault, who, expect, n, tokens, other_env):
    a, b = engines
    target, other = (a, b) if who == "src" else (b, a)
    target.restart_llumlet({"LLUMLET_TEST_FAULTS": fault})
    if other_env:
        other.restart_llumlet(other_env)
    logs = lambda: a.logs() + b.logs()  # noqa: E731
    d = Driver(a)
    prompts = {}
    for i in range(n):
        rid = f"f{next(_ids)}"
        prompts[rid] = [10 + (len(prompts) * 31 + k * 7) % 900 for k in range(48)]
        d.add(rid, prompts[rid], tokens)
    d.start()
    try:
        until(30, "a full batch decoding",
              lambda: sorted(d.progress().values(), reverse=True)[1] >= 5, logs)
        before = len(b.arrivals())
        migrate(a, b, num_reqs=1)  # may fail: the fault decides
        point = fault.split("=")[0]
        # The fault fired at its step (not a migration that never got there).
        until(10, f"the fault at {point}", lambda: f"at {point}" in target.log_of_run(), logs)
        if fault.endswith("=kill"):  # a restarted llumlet recovers what the dead one left
            target.llumlet.wait(10)
            target.restart_llumlet()
        until(90, "every request finished", d.done, logs)
        assert d.error is None, d.error
        for rid, toks in d.tokens.items():
            assert toks == expected_tokens(prompts[rid], tokens), (fault, rid, toks)
            assert d.finished[rid] == 1, (fault, rid)
        moved = len(b.arrivals()) - before
        want = {"moved": {1}, "stayed": {0}, "either": {0, 1}}[expect]
        assert moved in want, (fault, moved, logs())
        until(20, "both engines hold nothing", lambda: idle(a) and idle(b), logs)
    finally:
        d.stop()
        target.restart_llumlet()
        if other_env:
            other.restart_llumlet()

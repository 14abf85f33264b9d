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
    a, b = pair("a"), pair("b")
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

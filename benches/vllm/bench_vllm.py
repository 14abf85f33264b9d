"""Measures the vLLM adapter (run with the python of scripts/vllm-env.sh, after cargo build):

  step   the adapter's cost per engine step: vLLM's EngineCore in this process stepping the
         stand-in model with N decoding requests, with the adapter (scheduler_cls + connector,
         beside no llumlet: the status ring, the request table and the command poll still run)
         and without it (vLLM's own scheduler, no connector: the baseline, the step itself);
         the adapter's own calls are also timed one by one.
  downtime  migrations between two vLLM engines (their EngineCores in processes of their own),
         each beside a llumlet: the llumlet's downtime (suspend sent → destination committed,
         `downtime_us` in its log) and the gap the client sees in the migrated request's token
         stream, against the same client's gap between two ordinary tokens (one engine step).

usage: bench_vllm.py step [--requests 1,16,64] [--steps 300]
       bench_vllm.py downtime [--migrations 10] [--tokens 256,1024] [--step-ms 10]
Prints one JSON object per configuration.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "vllm"))

import harness  # noqa: E402  (sets the stand-in platform before vLLM is imported)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def step_cost(n_requests, steps, adapter):
    from vllm import SamplingParams
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.executor.abstract import Executor

    over = {} if adapter else {"scheduler_cls": None, "kv_transfer_config": None}
    os.environ["LLUMLET_INSTANCE_ID"] = f"bench-step-{os.getpid()}-{n_requests}-{int(adapter)}"
    os.environ["STAND_IN_STEP_MS"] = "0"
    os.environ["STAND_IN_KV_BYTES"] = str(64 << 20)
    cfg = harness.engine_args(max_num_seqs=max(n_requests, 1), max_model_len=2048,
                              max_num_batched_tokens=8192, **over).create_engine_config()
    core = EngineCore(cfg, Executor.get_class(cfg), log_stats=False)
    sp = SamplingParams(max_tokens=steps + 50, temperature=0.0, detokenize=False, ignore_eos=True)
    for i in range(n_requests):
        core.add_request(*core.preprocess_add_request(EngineCoreRequest(
            request_id=f"r{i}", prompt_token_ids=[10 + (i + k) % 900 for k in range(64)],
            mm_features=None, sampling_params=sp, pooling_params=None, arrival_time=time.time(),
            lora_request=None, cache_salt=None, data_parallel_rank=None)))
    sched = core.scheduler
    parts = {}
    if adapter:
        for name in ("_publish", "_sync_table", "_serve_commands", "_note_recent_waiting"):
            orig = getattr(sched, name)

            def timed(*a, _orig=orig, _name=name, **k):
                t = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    parts.setdefault(_name, []).append(time.perf_counter() - t)

            setattr(sched, name, timed)
    for _ in range(10):  # prefill and warm-up
        core.step()
    parts.clear()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    core.shutdown()
    out = {"what": "step", "requests": n_requests, "adapter": adapter,
           "step_us_p50": round(statistics.median(times) * 1e6, 1),
           "step_us_mean": round(statistics.mean(times) * 1e6, 1)}
    for name, xs in parts.items():
        out[f"{name.strip('_')}_us_mean"] = round(sum(xs) / steps * 1e6, 1)
    return out


def downtime(tokens_list, migrations, step_ms):
    redis = harness.Redis()
    results = []
    try:
        for tokens in tokens_list:
            a = harness.Instance(redis, f"da{tokens}", step_ms=step_ms, max_model_len=tokens + 512,
                                 max_num_batched_tokens=max(2048, tokens + 64))
            b = harness.Instance(redis, f"db{tokens}", step_ms=step_ms, max_model_len=tokens + 512,
                                 max_num_batched_tokens=max(2048, tokens + 64))
            try:
                results.append(_downtime_pair(a, b, tokens, migrations, step_ms))
            finally:
                a.close()
                b.close()
    finally:
        redis.close()
    return results


def _downtime_pair(a, b, tokens, migrations, step_ms):
    llumlet_us, gaps_ms, normal_ms = [], [], []
    src, dst = a, b
    d = harness.Driver(a)
    stamps = {}
    orig = d._run

    def run_with_stamps():
        # The driver's loop, recording when each delta arrived.
        try:
            while not d._stop.is_set():
                if not a.engine.has_unfinished_requests():
                    time.sleep(0.005)
                    continue
                for out in a.engine.step():
                    now = time.monotonic()
                    for _ in out.outputs[0].token_ids:
                        stamps.setdefault(out.request_id, []).append(now)
                    d.tokens[out.request_id].extend(out.outputs[0].token_ids)
                    if out.finished:
                        d.finished[out.request_id] = 1
        except Exception as e:  # noqa: BLE001
            d.error = e

    d._run = run_with_stamps
    del orig
    prompt = [10 + k * 7 % 900 for k in range(tokens)]
    d.add("m", prompt, 100000 // max(step_ms, 1) + 400)
    d.start()
    harness.until(120, "decoding", lambda: len(d.tokens["m"]) >= 5, a.logs)
    for i in range(migrations):
        before = len(src.log_of_run())
        t0 = len(stamps["m"])
        ok, msg = harness.migrate(src, dst, num_reqs=1)
        assert ok, msg
        harness.until(10, "tokens after the migration", lambda: len(stamps["m"]) >= t0 + 6, a.logs)
        log = src.log_of_run()[before:]
        m = re.search(r"downtime_us=(\d+)", log)
        if m:
            llumlet_us.append(int(m.group(1)))
        s = stamps["m"]
        window = [s[j + 1] - s[j] for j in range(max(t0 - 3, 0), len(s) - 1)]
        gaps_ms.append(max(window) * 1000)
        normal_ms.extend(g * 1000 for g in window)
        src, dst = dst, src
    d.stop()
    a.engine.abort_request(["m"])
    return {"what": "downtime", "tokens": tokens, "step_ms": step_ms, "migrations": migrations,
            "llumlet_downtime_ms_p50": round(statistics.median(llumlet_us) / 1000, 2),
            "llumlet_downtime_ms_max": round(max(llumlet_us) / 1000, 2),
            "client_gap_ms_p50": round(statistics.median(gaps_ms), 2),
            "client_gap_ms_max": round(max(gaps_ms), 2),
            "baseline_token_gap_ms_p50": round(statistics.median(normal_ms), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["step", "downtime"])
    ap.add_argument("--requests", default="1,16,64")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--tokens", default="256,1024")
    ap.add_argument("--step-ms", type=int, default=10)
    args = ap.parse_args()
    if args.what == "step":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for n in [int(x) for x in args.requests.split(",")]:
            for adapter in (False, True):
                print(json.dumps(step_cost(n, args.steps, adapter)), flush=True)
    else:
        for r in downtime([int(x) for x in args.tokens.split(",")], args.migrations, args.step_ms):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

"""One vLLM engine of `llumlet demo --engine vllm` (written next to the demo's logs and run with
the python of the vLLM environment, scripts/vllm-env.sh).

vLLM 0.18's `LLMEngine` (its EngineCore in a process of its own) with the llumlet-rs adapter
(`llumlet_vllm`) and the test stand-in model (`llumlet_stand_in`: tokens are a function of the KV
bytes read back through vLLM's block tables). It keeps `--requests` requests in flight for as long
as it runs; every request that finishes has its whole token stream checked against the model's
unmigrated stream. Prints, as the simulated engine does, one line per event:

    vllm-engine: migrated-in ID kv=ok tokens=ok          (a request arrived here; its KV checked)
    vllm-engine: finished ID output=N migrated_in=B tokens=ok|BAD
"""
import argparse
import os
import signal
import sys
import time

os.environ["LLUMLET_STAND_IN"] = "1"
os.environ["VLLM_PLUGINS"] = "llumlet_stand_in_cpu"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main():
    os.dup2(1, 2)  # one log: the demo keeps the engine's stdout
    ap = argparse.ArgumentParser()
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--shm", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--step-ms", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--events-dir", required=True)
    a = ap.parse_args()

    events = os.path.join(a.events_dir, f"arrivals-{a.instance_id}")
    os.environ.update({
        "LLUMLET_INSTANCE_ID": a.instance_id,
        "LLUMLET_ENGINE_SHM": a.shm,
        "STAND_IN_STEP_MS": str(a.step_ms),
        "STAND_IN_EVENTS": events,
        "STAND_IN_KV_BYTES": str(1 << 20),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    })
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.llm_engine import LLMEngine

    from llumlet_stand_in.executor import expected_tokens

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=a.model, skip_tokenizer_init=True,
        distributed_executor_backend="llumlet_stand_in.executor.StandInExecutor",
        max_model_len=1024, block_size=16, max_num_seqs=32, max_num_batched_tokens=1024,
        enforce_eager=True, enable_prefix_caching=False, dtype="float16", seed=0,
        scheduler_cls="llumlet_vllm.make_scheduler",
        kv_transfer_config={"kv_connector": "LlumletConnector",
                            "kv_connector_module_path": "llumlet_vllm.connector",
                            "kv_role": "kv_both"}))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    prompts, tokens = {}, {}
    n = 0

    def admit():
        nonlocal n
        rid = f"{a.instance_id}-{n}"
        length = 64 + (a.seed * 131 + n * 53) % 192
        prompts[rid] = [10 + (a.seed * 37 + n * 17 + k * 11) % 900 for k in range(length)]
        tokens[rid] = []
        n += 1
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[rid]), sp)

    def migrated_ids():
        ids = set()
        for name in os.listdir(a.events_dir):
            if name.startswith("arrivals-"):
                with open(os.path.join(a.events_dir, name)) as f:
                    ids.update(line.split()[1] for line in f if line.startswith("arrived "))
        return ids

    seen_arrivals = 0
    for _ in range(a.requests):
        admit()
    print(f"vllm-engine: ready {a.instance_id}", flush=True)
    while not stop:
        if os.path.exists(events):
            with open(events) as f:
                lines = [x for x in f if x.startswith("arrived ")]
            for x in lines[seen_arrivals:]:
                # The stand-in checked every K and V element of every layer at every position
                # (a mismatch stops the engine); the KV encodes the token ids.
                print(f"vllm-engine: migrated-in {x.split()[1]} kv=ok tokens=ok", flush=True)
            seen_arrivals = len(lines)
        if not engine.has_unfinished_requests():
            time.sleep(0.01)
            continue
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
            if out.finished:
                rid = out.request_id
                ok = tokens[rid] == expected_tokens(prompts[rid], a.max_tokens)
                moved = any(i.startswith(rid + "-") for i in migrated_ids())
                print(f"vllm-engine: finished {rid} output={len(tokens[rid])} "
                      f"migrated_in={'true' if moved else 'false'} tokens={'ok' if ok else 'BAD'}",
                      flush=True)
                if not stop:
                    admit()
    engine.engine_core.shutdown()
    print(f"vllm-engine: stopped {a.instance_id}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

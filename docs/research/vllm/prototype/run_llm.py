"""vllm.LLM (and LLMEngine underneath) with the stand-in executor, generating from token ids.

usage: python run_llm.py [inproc|mp] [SCHEDULER_CLS]
  inproc: VLLM_ENABLE_V1_MULTIPROCESSING=0 (EngineCore in this process, InprocClient)
  mp:     the default, EngineCore in its own process (SyncMPClient over ZMQ)
  SCHEDULER_CLS: optional dotted path for SchedulerConfig.scheduler_cls
"""
import os
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "mp"
sched_cls = sys.argv[2] if len(sys.argv) > 2 else None
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if mode == "inproc" else "1"

T0 = time.perf_counter()
import common  # noqa: E402

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

T_IMPORT = time.perf_counter()


def main():
    kw = dict(
        model=common.MODEL_DIR,
        skip_tokenizer_init=True,
        distributed_executor_backend="stub_executor.StubExecutor",
        max_model_len=512,
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        enforce_eager=True,
        enable_prefix_caching=False,
        dtype="float16",
        seed=0,
    )
    if sched_cls:
        kw["scheduler_cls"] = sched_cls
    t = time.perf_counter()
    llm = LLM(**kw)
    t_llm = time.perf_counter()
    print(f"[{mode}] import vllm {T_IMPORT - T0:.2f}s, LLM() {t_llm - t:.2f}s")
    prompts = [TokensPrompt(prompt_token_ids=list(range(10, 30))),
               TokensPrompt(prompt_token_ids=list(range(100, 137)))]
    sp = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    print(f"[{mode}] generate {time.perf_counter() - t_llm:.3f}s")
    for o in outs:
        print(f"  {o.request_id}: {list(o.outputs[0].token_ids)} finish={o.outputs[0].finish_reason}")
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
    if os.environ.get("LLUMLET_ADAPTER_TEST_KICK"):
        time.sleep(2.5)  # idle engine; the scheduler's test thread kicks it three times
    print("OK")


if __name__ == "__main__":
    main()

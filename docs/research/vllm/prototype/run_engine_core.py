"""vLLM 0.18 EngineCore, in process, with the stand-in executor: generate from token ids.

usage: python run_engine_core.py
"""
import time

T0 = time.perf_counter()
import common  # noqa: E402  (sets the environment before vllm is imported)

from vllm import SamplingParams  # noqa: E402
from vllm.v1.engine import EngineCoreRequest  # noqa: E402
from vllm.v1.engine.core import EngineCore  # noqa: E402
from vllm.v1.executor.abstract import Executor  # noqa: E402

T_IMPORT = time.perf_counter()


def make_request(rid, prompt, max_tokens):
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        mm_features=None,
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
    )


def main():
    cfg = common.engine_args().create_engine_config()
    t_cfg = time.perf_counter()
    core = EngineCore(cfg, executor_class=Executor.get_class(cfg), log_stats=False)
    t_core = time.perf_counter()
    print(f"import vllm {T_IMPORT - T0:.2f}s, config {t_cfg - T_IMPORT:.2f}s, "
          f"EngineCore() {t_core - t_cfg:.2f}s")
    print("scheduler:", type(core.scheduler).__module__, type(core.scheduler).__name__,
          "async_scheduling:", cfg.scheduler_config.async_scheduling,
          "num_gpu_blocks:", cfg.cache_config.num_gpu_blocks,
          "block_size:", cfg.cache_config.block_size,
          "device:", cfg.device_config.device_type)

    for rid, prompt in (("a", list(range(10, 30))), ("b", list(range(100, 137)))):
        req, wave = core.preprocess_add_request(make_request(rid, prompt, 8))
        core.add_request(req, wave)

    got: dict[str, list[int]] = {}
    steps = 0
    t_gen = time.perf_counter()
    while core.scheduler.has_requests():
        outputs, _ = core.step()
        steps += 1
        for eco in outputs.values():
            for o in eco.outputs:
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    print(f"  {o.request_id} finished: {o.finish_reason} tokens={got[o.request_id]}")
    print(f"{steps} steps in {time.perf_counter() - t_gen:.3f}s")
    assert all(len(v) == 8 for v in got.values()), got
    core.shutdown()
    print("OK")


if __name__ == "__main__":
    main()

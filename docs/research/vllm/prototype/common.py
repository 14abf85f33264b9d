"""Shared set-up for the prototype scripts: environment, the tiny model dir, engine arguments."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "tiny-model")

# Must be set before vllm is imported (platform selection happens at import).
os.environ.setdefault("LLUMLET_STUB_PLATFORM", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_PLUGINS", "llumlet_stub_cpu")  # load only our plugin
# spawned engine-core processes must import stub_executor / llumlet_scheduler by name
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def engine_args(**overrides):
    from vllm.engine.arg_utils import EngineArgs

    kw = dict(
        model=MODEL_DIR,
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
    kw.update(overrides)
    return EngineArgs(**kw)

"""Loaded by pytest before any test module: vLLM picks its platform when it is first imported,
so the stand-in platform must be chosen before any test imports vLLM (harness.py does the same
for the benches that use it)."""
import os

os.environ["LLUMLET_STAND_IN"] = "1"
os.environ["VLLM_PLUGINS"] = "llumlet_stand_in_cpu"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

"""Test-only: run vLLM 0.18's whole engine (EngineCore, its scheduler, the KV cache manager, the
frontends) on a machine without an accelerator, with the model replaced by a stand-in executor.

* `activate_platform` (entry point `vllm.platform_plugins`): with LLUMLET_STAND_IN=1, vLLM's own
  CpuPlatform (the CUDA wheel finds no platform on a machine without a GPU, and EngineArgs cannot
  build a DeviceConfig then).
* `executor.StandInExecutor` (`distributed_executor_backend`): the model; see its docstring.
"""
import os


def activate_platform():
    if os.environ.get("LLUMLET_STAND_IN") != "1":
        return None
    return "llumlet_stand_in.platform.StandInCpuPlatform"

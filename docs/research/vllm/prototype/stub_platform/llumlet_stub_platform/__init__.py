"""Test-only vLLM platform plugin.

vLLM picks a platform at import time. The CUDA wheel on a machine without a GPU finds none
(UnspecifiedPlatform, device_type ""), and EngineArgs/LLM then fail building DeviceConfig.
This plugin activates only when LLUMLET_STUB_PLATFORM=1, and makes the platform vLLM's own
CpuPlatform (device type "cpu"). It is meant for running vLLM's engine loop with a stand-in
executor; nothing here runs a model.
"""
import os


def activate():
    if os.environ.get("LLUMLET_STUB_PLATFORM") != "1":
        return None
    return "llumlet_stub_platform.platform.StubCpuPlatform"

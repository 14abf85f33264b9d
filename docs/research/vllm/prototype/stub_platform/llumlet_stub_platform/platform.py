from vllm.platforms.cpu import CpuPlatform


class StubCpuPlatform(CpuPlatform):
    """vLLM's CpuPlatform, unchanged except for a name; see the package docstring."""

    device_name = "cpu"

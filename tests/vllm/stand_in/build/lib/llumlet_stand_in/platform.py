from vllm.platforms.cpu import CpuPlatform


class StandInCpuPlatform(CpuPlatform):
    """vLLM's CpuPlatform under another name (see the package docstring)."""

    device_name = "cpu"

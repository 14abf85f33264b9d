"""`llumlet demo --engine vllm`: the newcomer's demo with vLLM engines (two, briefly)."""
import os
import subprocess
import tempfile

from harness import llumlet_bin


def test_the_demo_migrates_between_vllm_engines_and_verifies_every_stream():
    d = tempfile.mkdtemp(prefix="llumlet-vllm-demo-")
    env = dict(os.environ, LLUMLET_VLLM_PYTHON=os.sys.executable)
    o = subprocess.run([llumlet_bin(), "demo", "--engine", "vllm", "--instances", "2",
                        "--duration", "10", "--logs", d, "--plot", os.path.join(d, "plot.svg")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert o.returncode == 0, o.stdout + o.stderr
    rows = dict(line.strip().split("  ", 1) for line in o.stdout.splitlines() if line.startswith("  "))
    assert rows["verification"].strip().startswith("ok"), o.stdout
    assert int(rows["requests migrated"].split()[0]) > 0, o.stdout
    assert "vLLM engines" in o.stderr

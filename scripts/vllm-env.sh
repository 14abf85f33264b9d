#!/usr/bin/env bash
# Prints the python of a virtual environment with vLLM 0.18.0 (the version the adapter supports),
# the adapter (ffi/python) and the test-only stand-in model (tests/vllm/stand_in). The environment
# is made once, outside the repository (9 GB with torch's CUDA wheels; about 3 minutes), at
# $LLUMLET_VLLM_VENV or ~/.cache/llumlet-rs/vllm-0.18.0; later runs only re-link this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LLUMLET_VLLM_VENV:-$HOME/.cache/llumlet-rs/vllm-0.18.0}"
if [ ! -f "$venv/.llumlet-complete" ]; then
  echo "== making the vLLM environment at $venv (once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet vllm==0.18.0 grpcio-tools redis pytest >&2
  touch "$venv/.llumlet-complete"
fi
if ! out=$("$venv/bin/pip" install --quiet --no-deps -e ffi/python -e tests/vllm/stand_in 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "$venv/bin/python"

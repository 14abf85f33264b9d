#!/usr/bin/env bash
# The one command that sets up a fresh machine and runs every check: installs what the tests need
# (redis-server, a C compiler, UCX, openssl, and nftables and iproute2 for the two-host network
# tests from Debian, grpcio-tools for the Python client
# test, vLLM 0.18 in a cached environment for the adapter's tests: scripts/vllm-env.sh), then fmt,
# clippy with -D warnings, and the whole test suite (the migration fault suite again over tcp and UCX).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
command -v cc >/dev/null || missing+=(gcc)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists ucx 2>/dev/null || missing+=(libucx-dev)
command -v ucx_perftest >/dev/null || missing+=(ucx-utils)
command -v openssl >/dev/null || missing+=(openssl)
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c "import grpc_tools, google.protobuf" 2>/dev/null; then
  echo "== installing grpcio-tools"
  python3 -m pip install --quiet grpcio-tools || python3 -m pip install --quiet --break-system-packages grpcio-tools
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries, and the C library the FFI tests link)"
cargo build --workspace --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== the vLLM adapter with vLLM 0.18 engines (stand-in model on CPU) beside llumlets"
vllm_python=$(scripts/vllm-env.sh)
(cd tests/vllm && LLUMLET_FFI_LIB="$PWD/../../target/debug/libllumlet_ffi.so" "$vllm_python" -m pytest -q -p no:cacheprovider -p no:warnings .)
echo "== the migration fault suite again over the tcp transport (one host picks shm by default)"
LLUMLET_TEST_TRANSPORT=tcp cargo test -p llumlet-tests --locked --test migration_faults
echo "== ... and over encrypted tcp (LLUMLET_TRANSFER_ENCRYPT=1 on every llumlet)"
LLUMLET_TEST_TRANSPORT=tcp LLUMLET_TEST_ENCRYPT=1 cargo test -p llumlet-tests --locked --test migration_faults
echo "== the migration fault suite again, over UCX: its TCP transport (software RMA), then its shared memory"
LLUMLET_TEST_TRANSPORT=ucx UCX_TLS=tcp cargo test -p llumlet-tests --locked --test migration_faults
LLUMLET_TEST_TRANSPORT=ucx UCX_TLS=posix,cma cargo test -p llumlet-tests --locked --test migration_faults
echo "== the migration fault suite again with the engines' KV caches on the GPU (the cuda transport; under"
echo "   the test double of the CUDA driver, tests/fake-cuda: host memory, no GPU needed)"
LLUMLET_TEST_KV=gpu cargo test -p llumlet-tests --locked --test migration_faults
echo "== loom models of the seqlock and the command queue (separate target dir: other cfg)"
RUSTFLAGS="--cfg loom" cargo test -p llumlet-dataplane --lib --locked --target-dir target/loom loom_
echo "== all checks passed"

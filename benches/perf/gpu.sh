#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md ("CUDA IPC transport"), for a machine with an NVIDIA GPU
# that cannot build (no crates.io): build here, carry .gpu/, run there.
#
#   benches/perf/gpu.sh build   # here: release llumlet with `cuda` (no UCX: the GPU machine has
#                               # no libucx) and the GPU test binary, into .gpu/ (git-ignored)
#   benches/perf/gpu.sh run     # there, from the repository root: the GPU tests on the real
#                               # driver, then JSON lines (transfer vs cuMemcpyDtoD, migration
#                               # downtime with KV on the GPU and, same run, on the host)
#
# `run` writes everything to stdout and, when $OUT is set, to $OUT/gpu.jsonl and $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    set -e
    cargo build --release --locked -p llumlet --features cuda >&2
    bin=$(cargo test --release --locked -p llumlet-tests --test cuda --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*cuda-[^"]*"' | cut -d'"' -f4 | tail -1)
    mkdir -p .gpu
    # Stripped: what is carried must stay under the device tool's 64 MiB.
    strip -o .gpu/llumlet target/release/llumlet
    strip -o .gpu/cuda-tests "$bin"
    ls -l .gpu >&2
    ;;
run)
    out=${OUT:-/tmp}
    log="$out/gpu.log"
    jsonl="$out/gpu.jsonl"
    : >"$log"
    : >"$jsonl"
    L=./.gpu/llumlet
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        ldd "$L" || true
        echo "== GPU tests on the real driver (the test double's reruns skipped: it is not carried)"
        LLUMLET_TEST_CUDA=real ./.gpu/cuda-tests --test-threads=1 \
            --skip copies_under_the_test_double --skip a_driver_without_devices
    } >>"$log" 2>&1
    echo "tests rc=$?" >>"$log"
    sizes=${SIZES:-1M,16M,64M,256M,1G}
    $L bench transfer --transport cuda --size "$sizes" --with-baseline 2>>"$log" | tee -a "$jsonl"
    $L bench transfer --transport shm --size 64M,256M --with-baseline 2>>"$log" | tee -a "$jsonl"
    for kv in gpu host; do
        $L bench migration --kv "$kv" --tokens 1024,4096,16384,65536 --step-ms 1 --repeat 5 \
            2>>"$log" | tee -a "$jsonl"
    done
    cat "$log"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac

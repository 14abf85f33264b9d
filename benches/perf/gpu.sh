#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md ("CUDA IPC transport"), for a machine with an NVIDIA GPU
# that cannot build (no crates.io): build here, carry .gpu/, run there.
#
#   benches/perf/gpu.sh build   # here: into .gpu/ (git-ignored, stripped, 27 MB): the
#                               # release llumlet with `cuda` (no UCX: the GPU machine has no
#                               # libucx), the GPU, migration and fault-suite test binaries, and
#                               # a redis-server with its libraries (the suites need one)
#   benches/perf/gpu.sh run     # there, from the repository root: the tests on the real driver,
#                               # then JSON lines (transfer vs cuMemcpyDtoD, migration downtime
#                               # with KV on the GPU and, same run, on the host)
#
# `run` writes everything to stdout and, when $OUT is set, to $OUT/gpu.jsonl and $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    set -e
    cargo build --release --locked -p llumlet-tools --features cuda >&2
    rm -rf .gpu
    mkdir -p .gpu/bin .gpu/lib
    # Stripped: what is carried must stay under the device tool's 64 MiB.
    strip -o .gpu/llumlet target/release/llumlet
    cargo test --release --locked -p llumlet-tests --test cuda --test migration --test migration_faults \
        --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | while read -r bin; do
        name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
        strip -o ".gpu/$name-tests" "$bin"
    done
    # The test binaries find the llumlet beside them, and redis-server on PATH.
    redis=$(readlink -f "$(command -v redis-server)")
    cp "$redis" .gpu/bin/redis-server
    ldd "$redis" | awk '/=> \// {print $3}' | grep -v -e '/libc\.so' -e '/libm\.so' \
        -e '/ld-linux' | xargs -I{} cp -L {} .gpu/lib/
    du -sh .gpu >&2
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
        LLUMLET_TEST_CUDA=real timeout 120 ./.gpu/cuda-tests --test-threads=1 \
            --skip copies_under_the_test_double --skip a_driver_without_devices
        echo "cuda tests rc=$?"
        export PATH="$PWD/.gpu/bin:$PATH"
        export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PWD/.gpu/lib"
        echo "== a migration between engines with KV on the GPU, then the whole fault suite so"
        LLUMLET_TEST_CUDA=real timeout 120 ./.gpu/migration-tests gpu
        echo "migration tests rc=$?"
        LLUMLET_TEST_CUDA=real LLUMLET_TEST_KV=gpu timeout 240 ./.gpu/migration_faults-tests
        echo "fault suite rc=$?"
    } >>"$log" 2>&1
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

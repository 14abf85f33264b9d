#!/usr/bin/env bash
# One run of the perf tool, every figure beside its baseline: what docs/BENCHMARKS.md's
# "perf tool" section reports. Builds the release llumlet with UCX, then prints JSON lines
# (one per measurement) to stdout; keep them with `benches/perf/run.sh > perf.jsonl`.
# Needs /dev/shm room for 4 GiB, libucx-dev (scripts/test.sh installs it) and redis-server for
# the status push figure (else the embedded CMS is used, and the JSON says so).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p llumlet-tools --features ucx >&2
L=./target/release/llumlet
sizes=${SIZES:-1M,16M,64M,256M,1G}
$L bench transfer --transport shm --size "$sizes" --with-baseline
$L bench transfer --transport tcp --size "$sizes" --with-baseline
LLUMLET_TRANSFER_ENCRYPT=1 $L bench transfer --transport tcp --size "$sizes" --with-baseline
# The loopback TCP copy in C (two processes, as two llumlets; and two threads), beside the tool's
# own baseline.
cc -O2 -pthread -o target/tcp_pair benches/perf/tcp_pair.c >&2
for mode in processes threads; do
  for chunk in 256 1024; do ./target/tcp_pair 256 8 $chunk $mode; done
done
UCX_TLS=tcp $L bench transfer --transport ucx --size 1M,16M,64M,256M --with-baseline
UCX_TLS=posix,cma $L bench transfer --transport ucx --size 1M,16M,64M,256M --with-baseline
$L bench migration --tokens 1024,4096,16384,65536 --step-ms 5
$L bench migration --tokens 1024,4096,16384,65536 --step-ms 1
$L bench status --seconds 10
$L bench migration --tokens 1024 --step-ms 5 --requests 32 --concurrency 1,2,4,8 --drain
$L bench migration --tokens 1024 --step-ms 5 --requests 32 --concurrency 1,2,4,8 --transport tcp
$L bench fleet --instances 50 --seconds 20
$L bench fleet --instances 200 --seconds 20
$L bench fleet --instances 200 --seconds 30 --restart-redis-at 10

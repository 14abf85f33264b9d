#!/usr/bin/env bash
# Runs every prototype check, one process at a time; logs under $LOG (/tmp/llumlet-vllm-prototype-logs).
# usage: prototype/run_all.sh   (needs the venv and the stub platform plugin installed)
set -u
cd "$(dirname "$0")"
PY=${PY:-/root/.cache/llumlet-rs/vllm-0.18.0/bin/python}
LOG=${LOG:-/tmp/llumlet-vllm-prototype-logs}
mkdir -p "$LOG"
export LLUMLET_FFI_LIB=${LLUMLET_FFI_LIB:-$(cd ../../../.. && pwd)/target/debug/libllumlet_ffi.so}
export LLUMLET_BINDING_DIR=${LLUMLET_BINDING_DIR:-$(cd ../../../.. && pwd)/ffi/python}
fail=0
run() {
  local name=$1; shift
  local t0=$(date +%s.%N)
  if env "$@" > "$LOG/$name.log" 2>&1 && tail -1 "$LOG/$name.log" | grep -q '^OK'; then r=OK; else r=FAIL; fail=1; fi
  printf '%-34s %-4s %6.1fs\n' "$name" "$r" "$(echo "$(date +%s.%N) - $t0" | bc)"
}
run engine_core            "$PY" run_engine_core.py
run llm_inproc             "$PY" run_llm.py inproc
run llm_mp                 "$PY" run_llm.py mp
run llm_mp_scheduler_kick  LLUMLET_ADAPTER_TEST_KICK=1 LLUMLET_ADAPTER_DEBUG=1 "$PY" run_llm.py mp llumlet_scheduler.LlumletScheduler
run llm_inproc_factory     LLUMLET_ADAPTER_DEBUG=1 "$PY" run_llm.py inproc llumlet_scheduler.make_scheduler
run migration              "$PY" test_migration.py
run migration_prefix_cache "$PY" test_migration.py --prefix-caching
run migration_no_delta     "$PY" test_migration.py --no-delta
run migration_binding      "$PY" test_migration.py --binding
run migration_no_rewrite     "$PY" test_migration.py --no-rewrite
run output_forwarding      "$PY" test_output_forwarding.py
exit $fail

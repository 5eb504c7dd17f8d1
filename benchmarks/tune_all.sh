#!/usr/bin/env bash
# Tune the shipped workloads on this GPU with `tvm-flash tune`, one after the other, within a budget.
#
#   benchmarks/tune_all.sh LOGDIR        (the tuning logs go to tuning_logs/, or $TVM_FLASH_TUNING_LOGS)
#
# Environment: ARCH (default sm_90a: the wgmma kernel; sm_90: mma.sync), HEADDIMS (default "64 128"), DTYPES ("bf16 fp16"), CAUSAL ("no yes"), TRIALS (32),
# BUDGET_S (540: no new tune starts when less than MIN_S=60 s is left), PYTHON (python3).
# Each workload's output goes to LOGDIR/tune-<workload>.log; a summary line per workload is printed.
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${1:-$REPO/benchmarks/logs}
mkdir -p "$LOGDIR"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
MIN_S=${MIN_S:-60}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
for d in ${HEADDIMS:-64 128}; do
  for t in ${DTYPES:-bf16 fp16}; do
    for c in ${CAUSAL:-no yes}; do
      name=d${d}_${t}$([ "$c" = yes ] && echo _causal)
      left=$(( BUDGET_S - $(date +%s) + START ))
      if (( left < MIN_S )); then echo "$name: skipped (${left}s left)"; continue; fi
      t0=$(date +%s)
      timeout -k 10 "$left" $PY -m tvm_flash tune --head-dim "$d" --dtype "$t" $([ "$c" = yes ] && echo --causal) \
        --arch "${ARCH:-sm_90a}" --trials "${TRIALS:-32}" >"$LOGDIR/tune-$name.log" 2>&1
      rc=$?
      echo "$name: rc $rc in $(( $(date +%s) - t0 ))s | $(grep -E '^\[tune\] (defaults|best)' "$LOGDIR/tune-$name.log" | tr '\n' ' ' | cut -c1-400)"
    done
  done
done

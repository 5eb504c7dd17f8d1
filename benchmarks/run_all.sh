#!/usr/bin/env bash
# The whole benchmark on one GPU, then the report, within a time budget.
#
#   benchmarks/run_all.sh [OUT]        OUT defaults to the repo root
#
# Writes, laid out like the repo so that OUT can be copied over it:
#   OUT/benchmarks/results/<card>.json, <card>-backward.json, <card>-seed.json, <card>-fp32.json,
#   <card>-occupancy.json (+ .md)
#   OUT/benchmarks/logs/<step>.log     full output of each step
#   OUT/benchmarks/plots/*.png
#   OUT/BENCHMARKS.md
#
# Steps, in order (each one's JSON is rewritten after every point, so a step cut short by
# its time limit still leaves the points it measured; a failing step does not stop the rest):
#   1. fa_sweep   bench_forward.py --sweep fa, bf16 + fp16 (48 points; ~95 s on an H100)
#   2. backward   bench_backward.py --sweep fa, bf16 + fp16 (48 points: tvm_flash, SDPA flash, cuDNN)
#   3. occupancy  occupancy.py: Nsight Compute on 4 points x {tvm_flash, SDPA flash, SDPA cuDNN}
#   4. seed_grid  bench_forward.py --grid seed, bf16 + fp16, --warmup 10 --rep 50 (128 points)
#   5. fp32       bench_forward.py --dtype fp32 --seqlens 1024,2048 (8 points; nice to have)
#   6. report.py  BENCHMARKS.md + plots from whatever the steps left
# (one GPU call of 10 minutes does not hold them all: STEPS="fa_sweep backward" runs only the
# steps named; the report always runs, over every result file in OUT)
# Budget: BUDGET_S seconds in all (default 540); each step gets min(its cap, what is left
# minus REPORT_S for the report). Environment: PYTHON (default python3), BUDGET_S, REPORT_S, STEPS.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/benchmarks/results
PLOTS=$OUT/benchmarks/plots
LOGS=$OUT/benchmarks/logs
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
REPORT_S=${REPORT_S:-25}
mkdir -p "$RESULTS" "$PLOTS" "$LOGS"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME CAP_S MIN_S CMD...: run CMD with a time limit of min(CAP_S, budget left); skip if
# less than MIN_S would be left. The limit is exported as STEP_LIMIT_S for the command line.
step() {
    local name=$1 cap=$2 min=$3; shift 3
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
        return
    fi
    local left=$(( BUDGET_S - REPORT_S - $(elapsed) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < min )); then
        echo "=== $name: skipped (${left}s of the budget left, needs ${min}s)"
        SUMMARY+=("$name: skipped, no time left")
        return
    fi
    echo "=== $name (limit ${limit}s, t+$(elapsed)s): $*"
    local t0=$(date +%s) rc
    # SIGINT first (Python stops between points; JSON files are written atomically), KILL 15 s later
    timeout -s INT -k 15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 14 "$LOGS/$name.log" | cut -c1-220
    local took=$(( $(date +%s) - t0 )) what="rc $rc"
    (( rc == 124 || rc == 130 || rc == 137 )) && what="cut at its ${limit}s limit (rc $rc), partial results kept"
    SUMMARY+=("$name: ${took}s, $what")
    echo "=== $name: ${took}s, $what"
}

echo "run_all: out $OUT, budget ${BUDGET_S}s, $($PY --version 2>&1), $(command -v ncu || echo 'no ncu')"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null \
    | tee "$LOGS/gpu.txt"

step fa_sweep 200 60 "$PY" benchmarks/bench_forward.py --sweep fa --dtype both --out "$RESULTS" \
    --impls tvm_flash,naive,naive_eager,sdpa_flash,sdpa_cudnn,sdpa_mem_eff
step backward 200 60 "$PY" benchmarks/bench_backward.py --sweep fa --dtype both --out "$RESULTS"
OCC_LEFT=$(( BUDGET_S - REPORT_S - $(elapsed) ))
OCC_BUDGET=$(( (OCC_LEFT < 150 ? OCC_LEFT : 150) - 10 ))
step occupancy 150 40 "$PY" benchmarks/occupancy.py --out "$RESULTS" --budget "$OCC_BUDGET"
step seed_grid 300 60 "$PY" benchmarks/bench_forward.py --grid seed --dtype both --warmup 10 --rep 50 --out "$RESULTS"
step fp32 75 30 "$PY" benchmarks/bench_forward.py --dtype fp32 --seqlens 1024,2048 --warmup 10 --rep 50 --out "$RESULTS"

echo "=== report (t+$(elapsed)s)"
RUN_CMD="benchmarks/run_all.sh $*"
timeout -k 10 120 "$PY" benchmarks/report.py --results "$RESULTS" --md "$OUT/BENCHMARKS.md" --plots "$PLOTS" \
    --run-command "${RUN_CMD% }" 2>&1 | tee "$LOGS/report.log"
SUMMARY+=("report: rc ${PIPESTATUS[0]}")

echo "=== done in $(elapsed)s"
printf '  %s\n' "${SUMMARY[@]}" | tee "$LOGS/summary.txt"

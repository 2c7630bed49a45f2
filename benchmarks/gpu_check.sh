#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the first real-GPU run of minisam, one script, under 8 minutes.
#
# Run it from the repository root on a fresh CUDA machine (written for one H200, CUDA 13,
# python3 with cupy-cuda13x 14, torch and jax installed, no network):
#
#     bash benchmarks/gpu_check.sh        # logs, JSON and summary.txt go to $OUT
#                                         # (default ./gpu_check_out)
#
# Every step runs under `timeout` with its own time box, logs to $OUT/<step>.log, and a
# failing step never stops the ones after it. Mandatory steps (*) decide the exit status.
#
#   step            box  min  what it does
#   env              30    5  versions, GPU, CUDA, NCCL, torch; a CuPy smoke test (env.py)
#                             -> env.json
#   a_install *      60    5  pip install -e . --no-deps --no-index (offline); else the
#                             PYTHONPATH=<root> this script exports
#   b_pytest *      160   40  pytest -m gpu on the real CuPy, 90 s per test (pytest-timeout,
#                             else gpucheck_timeout.py), --maxfail=5; fallback_tests.py when
#                             pytest is missing
#   c_verify *       90   30  minisam verify reference_results/*.npz --device gpu (float32)
#   d_bench *       150   60  minisam bench (SGD + SAM) vs the PyTorch eager peer, wrn16_8 and
#                             wrn28_10, batch 128, float32 both sides, via benchmarks/run_all.py
#                             -> bench_*.json; ratios.py -> RATIO lines, bench_summary.json
#   e_nccl *        120   40  NcclComm at world size 1 and 2 ranks (launcher) vs ThreadComm,
#                             two SAM steps, both perturbation modes (nccl_check.py); then
#                             benchmarks/allreduce.py on one GPU -> allreduce_1gpu.json
#   f_train *       100   30  minisam train --device gpu on synthetic data: --max-steps,
#                             --resume, eval, an uninterrupted twin (resume bitwise?),
#                             --replicas 2 (train_check.py) -> train/<run>/
# then, optional, with whatever budget is left:
#   diag             75   25  where the step time goes (diag.py): BN reductions, pad/im2col/
#                             GEMM, implicit GEMM, TF32 GEMM, fused BN+ReLU, host vs GPU time,
#                             peak live memory, hidden syncs, CUDA graph -> diag.json
#   tf32             70   25  minisam bench --tf32 vs torch_step.py --tf32 -> bench_tf32_*.json
#   f2_train_gpus2   45   25  minisam train --gpus 2 (NCCL through the CLI; on one GPU with
#                             NCCL_MULTI_RANK_GPU_ENABLE=1)
#
# "box" is the step's own limit in seconds, "min" the least time worth starting it with.
# A step gets min(box, time left - reserve), where the reserve is, for every mandatory step
# after it, its min plus the kill grace; a step whose share is below its min is SKIPPED.
# Statuses: PASS, FAIL, TIMEOUT (killed at its limit), SKIP (budget spent or interrupted),
# "-" (not selected). Exit status: 0 when every selected mandatory step passed, 1 when one
# did not, 2 for a usage error (e.g. not run from the repository root), 130 if interrupted.
#
# Afterwards: $OUT/summary.txt (the table, the RATIO and DIAG lines), and
# $OUT/results/<device-slug>-<date>/ with summary.txt, the JSON, train/ and the logs up to
# 200 KiB each: the folder to commit as benchmarks/results/<device-slug>-<date>/ (the last
# lines of the summary say how; GPU_CHECK_SAVE=1 copies it there itself).
#
# The helpers live in benchmarks/gpu_check/ (Python: env, ratios, nccl_check, train_check,
# diag, fallback_tests, gpucheck_timeout; step_*.sh: one per step). Environment knobs:
#   OUT                output folder (default ./gpu_check_out)
#   PY                 python to use (default python3)
#   GPU_CHECK_ONLY     comma-separated steps to run, e.g. "env,d_bench,diag" (default all)
#   GPU_CHECK_DIAG     comma-separated diag sections (default all; see diag.py)
#   GPU_CHECK_BUDGET   seconds for the steps (default 420). A step may overrun its limit by
#                      the kill grace, and the summary takes at most about 25 s, so the
#                      worst case is BUDGET + GRACE + ~25 s: about 7.5 minutes by default.
#   GPU_CHECK_SAVE=1   also copy the results folder into benchmarks/results/
# and, for tests (tests/test_gpu_check.py) and experiments:
#   GPU_CHECK_HELPERS  folder of helper files to use instead of benchmarks/gpu_check
#   GPU_CHECK_CAPS     per-step limits "step=BOX[/MIN],...", in seconds (decimals allowed);
#                      a step's min never exceeds its box
#   GPU_CHECK_GRACE    seconds between SIGTERM and SIGKILL at a step's limit (default 5)

if [ ! -f pyproject.toml ] || [ ! -d minisam ] || [ ! -f benchmarks/gpu_check.sh ] \
        || ! grep -q '^name = "minisam"' pyproject.toml; then
    echo "gpu_check.sh: run me from minisam's repository root: cd <repo> && bash benchmarks/gpu_check.sh" >&2
    exit 2
fi
ROOT=$(pwd -P)

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
is_secs() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
to_ms() {   # "12.5" -> 12500
    local i=${1%%.*} f=${1#*.}
    [ "$f" = "$1" ] && f=""
    f="${f}000"
    echo $(( 10#$i * 1000 + 10#${f:0:3} ))
}
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); }   # ms -> "12.5"
now_ms() {
    local t=${EPOCHREALTIME:-}
    if [ -n "$t" ]; then t=${t//[.,]/}; echo $(( 10#$t / 1000 )); else echo $(( $(date +%s%N) / 1000000 )); fi
}

# ---- knobs ------------------------------------------------------------------------------
PY=${PY:-python3}
HELP=${GPU_CHECK_HELPERS:-$ROOT/benchmarks/gpu_check}
[ -d "$HELP" ] || die "GPU_CHECK_HELPERS: no helper folder $HELP"
HELP=$(cd "$HELP" && pwd -P)
BUDGET=${GPU_CHECK_BUDGET:-420}
GRACE=${GPU_CHECK_GRACE:-5}
is_secs "$BUDGET" || die "GPU_CHECK_BUDGET must be a number of seconds, got '$BUDGET'"
[[ $GRACE =~ ^[1-9][0-9]*$ ]] || die "GPU_CHECK_GRACE must be whole seconds, at least 1, got '$GRACE'"
command -v "$PY" > /dev/null 2>&1 || echo "gpu_check.sh: warning: PY=$PY is not on PATH; the steps will fail"

# name, box (s), min (s), mandatory, files of OUT the step (re)writes (removed before it runs)
STEP_TABLE='
env             30   5  0  env.json
a_install       60   5  1  -
b_pytest       160  40  1  -
c_verify        90  30  1  -
d_bench        150  60  1  bench_run_all_*.json bench_minisam_*.json bench_summary.json
e_nccl         120  40  1  allreduce_1gpu.json
f_train        100  30  1  train/run train/run_r2
diag            75  25  0  diag.json
tf32            70  25  0  bench_tf32_*.json
f2_train_gpus2  45  25  0  train/run_gpus2
'
S_NAME=(); S_BOX=(); S_MIN=(); S_MAND=(); S_FILES=()
while read -r name box min mand files; do
    [ -n "$name" ] || continue
    S_NAME+=("$name"); S_BOX+=("$(to_ms "$box")"); S_MIN+=("$(to_ms "$min")")
    S_MAND+=("$mand"); S_FILES+=("$files")
done <<< "$STEP_TABLE"

step_index() { local i; for i in "${!S_NAME[@]}"; do [ "${S_NAME[$i]}" = "$1" ] && { echo "$i"; return 0; }; done; return 1; }

IFS=, read -r -a _caps <<< "${GPU_CHECK_CAPS:-}"
for c in "${_caps[@]}"; do
    [ -n "$c" ] || continue
    name=${c%%=*}; val=${c#*=}; box=${val%%/*}; min=${val#*/}
    [ "$min" = "$val" ] && min=""
    i=$(step_index "$name") || die "GPU_CHECK_CAPS: unknown step '$name' (steps: ${S_NAME[*]})"
    is_secs "$box" && { [ -z "$min" ] || is_secs "$min"; } || die "GPU_CHECK_CAPS: '$c' is not step=BOX[/MIN] in seconds"
    S_BOX[$i]=$(to_ms "$box")
    [ -n "$min" ] && S_MIN[$i]=$(to_ms "$min")
done
for i in "${!S_NAME[@]}"; do [ "${S_MIN[$i]}" -gt "${S_BOX[$i]}" ] && S_MIN[$i]=${S_BOX[$i]}; done
IFS=, read -r -a _only <<< "${GPU_CHECK_ONLY:-}"
for n in "${_only[@]}"; do
    [ -z "$n" ] || step_index "$n" > /dev/null || die "GPU_CHECK_ONLY: unknown step '$n' (steps: ${S_NAME[*]})"
done

selected() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *",$1,"* ]]; }

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT" || die "cannot create the output folder $OUT"
OUT=$(cd "$OUT" && pwd -P)

START_MS=$(now_ms)
DEADLINE_MS=$(( START_MS + $(to_ms "$BUDGET") ))
GRACE_MS=$(( GRACE * 1000 ))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export ROOT OUT PY WORK HELP
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # minisam importable even if pip fails
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
unset CUPY_TF32            # TF32 is minisam's --tf32 flag (off by default), never the env
unset MINISAM_STRICT_CUPY  # the real CuPy, not the CI stand-in
export MINISAM_DEBUG=1     # tracebacks instead of one-line CLI errors

# ---- the runner -------------------------------------------------------------------------
R_NAME=(); R_STATUS=(); R_SECS=(); R_LIMIT=(); R_NOTE=()
MANDATORY_FAILED=0
INTERRUPTED=0
STEP_PID=""
on_signal() {   # stop the running step (its timeout passes the signal on), skip the rest
    INTERRUPTED=1
    [ -n "$STEP_PID" ] || return 0
    kill -TERM "$(cat "$WORK/step.pid" 2>/dev/null)" 2>/dev/null || kill -TERM "$STEP_PID" 2>/dev/null
}
trap on_signal INT TERM
trap 'rm -rf "$WORK"' EXIT

record() {  # record NAME STATUS SECS LIMIT NOTE
    R_NAME+=("$1"); R_STATUS+=("$2"); R_SECS+=("$3"); R_LIMIT+=("$4"); R_NOTE+=("$5")
    local i
    i=$(step_index "$1")
    if [ "${S_MAND[$i]}" = 1 ] && [ "$2" != PASS ] && [ "$2" != - ]; then
        MANDATORY_FAILED=$((MANDATORY_FAILED + 1))
    fi
}

# run_step NAME COMMAND...: run COMMAND for step NAME under its limit (see the header)
run_step() {
    local name=$1; shift
    local i j log reserve=0 left t now t0 t1 rc st tail_pid offset
    i=$(step_index "$name")
    log="$OUT/$name.log"
    if ! selected "$name"; then
        record "$name" - 0.0 - "not selected (GPU_CHECK_ONLY)"; return 0
    fi
    if [ "$INTERRUPTED" = 1 ]; then
        record "$name" SKIP 0.0 - "interrupted"; return 0
    fi
    for ((j = i + 1; j < ${#S_NAME[@]}; j++)); do
        if [ "${S_MAND[$j]}" = 1 ] && selected "${S_NAME[$j]}"; then
            reserve=$((reserve + S_MIN[j] + GRACE_MS))
        fi
    done
    now=$(now_ms)
    left=$((DEADLINE_MS - now - reserve))
    t=${S_BOX[$i]}
    [ "$left" -lt "$t" ] && t=$left
    [ "$t" -lt 0 ] && t=0
    : > "$log"
    if [ "$t" -lt "${S_MIN[$i]}" ] || [ "$t" -le 0 ]; then
        echo "=== [$name] SKIPPED: $(secs "$t")s left for it, needs $(secs "${S_MIN[$i]}")s" | tee -a "$log"
        record "$name" SKIP 0.0 "$(secs "$t")" "budget spent ($(secs "$t")s < $(secs "${S_MIN[$i]}")s)"
        return 0
    fi
    if [ "${S_FILES[$i]}" != - ]; then
        (cd "$OUT" && rm -rf -- ${S_FILES[$i]})
    fi
    echo "=== [$name] $(date -u +%H:%M:%S) (t+$(secs $((now - START_MS)))s), limit $(secs "$t")s: $*" | tee -a "$log"
    offset=$(wc -c < "$log")
    t0=$(now_ms)
    rm -f "$WORK/step.pid"
    # a subshell around timeout, so that bash's "Killed" notice lands in the log
    ( timeout -k "$GRACE" "$(secs "$t")" "$@" < /dev/null & echo $! > "$WORK/step.pid"; wait $! ) >> "$log" 2>&1 &
    STEP_PID=$!
    tail -c +$((offset + 1)) -s 0.1 -f --pid="$STEP_PID" "$log" &
    tail_pid=$!
    while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; done
    wait "$STEP_PID"; rc=$?
    STEP_PID=""
    wait "$tail_pid" 2>/dev/null
    t1=$(now_ms)
    if [ "$rc" -eq 0 ]; then st=PASS
    elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ $((t1 - t0)) -ge $((t - 100)) ]; then st=TIMEOUT
    else st=FAIL; fi
    [ "$INTERRUPTED" = 1 ] && [ "$st" != PASS ] && st=SKIP
    echo "=== [$name] $st (rc $rc) in $(secs $((t1 - t0)))s" | tee -a "$log"
    record "$name" "$st" "$(secs $((t1 - t0)))" "$(secs "$t")" "rc=$rc$([ "$INTERRUPTED" = 1 ] && echo ', interrupted')"
}

note() {  # note TEXT: attach a one-line result to the last step, if it ran
    local i=$((${#R_NOTE[@]} - 1))
    case "${R_STATUS[$i]}" in -|SKIP) return 0 ;; esac
    [ -n "$1" ] && R_NOTE[$i]="${R_NOTE[$i]}; $1"
    return 0
}

echo "gpu_check: root $ROOT, helpers $HELP, output $OUT, budget ${BUDGET}s (+ ${GRACE}s kill grace), python $PY, started $(date -u +%FT%TZ)"

run_step env "$PY" "$HELP/env.py" "$OUT"
note "$(grep -s -m1 -E '^GPU ' "$OUT/env.log" | cut -c1-90)"
run_step a_install bash "$HELP/step_install.sh"
note "$(grep -s -m1 '^INSTALL' "$OUT/a_install.log")"
run_step b_pytest bash "$HELP/step_pytest.sh"
note "$(grep -s -E '(passed|failed|error|skipped|no tests ran)' "$OUT/b_pytest.log" | grep -v '^=== \[' | tail -1 | cut -c1-100)"
run_step c_verify bash "$HELP/step_verify.sh"
note "$(grep -s -E '^-> ' "$OUT/c_verify.log" | awk '{print $2}' | tr -d ':' | tr '\n' ' ')"
run_step d_bench bash "$HELP/step_bench.sh"
note "$(grep -s '^RATIO' "$OUT/d_bench.log" | grep fp32 | sed 's/RATIO //; s/ (SAM.*//' | tr '\n' ';' | cut -c1-160)"
run_step e_nccl bash "$HELP/step_nccl.sh"
note "$(grep -s -E '^compare:|^NCCL R=2: not run' "$OUT/e_nccl.log" | tr '\n' ' ')"
run_step f_train bash "$HELP/step_train.sh"
note "$(grep -s -E '^run(_r2)?: ' "$OUT/f_train.log" | sed 's/, test error.*->/ ->/' | tr '\n' ' ' | cut -c1-150)"
note "$(grep -s -m1 '^GPU resume vs' "$OUT/f_train.log" | sed 's/GPU resume vs uninterrupted run: /resume /' | cut -c1-70)"
run_step diag "$PY" "$HELP/diag.py" "$OUT" "${GPU_CHECK_DIAG:-}"
note "$(grep -s -E '^diag: ' "$OUT/diag.log")"
run_step tf32 bash "$HELP/step_tf32.sh"
note "$(grep -s '^RATIO' "$OUT/tf32.log" | grep tf32 | sed 's/RATIO //; s/ (SAM.*//' | tr '\n' ';' | cut -c1-160)"
run_step f2_train_gpus2 bash "$HELP/step_train_nccl.sh"
note "$(grep -s -m1 -E '^run: |skipped' "$OUT/f2_train_gpus2.log" | cut -c1-100)"

# ---- summary and results ----------------------------------------------------------------
GPU_NAME=$(sed -n 's/^ *"name": *"\([^"]*\)".*/\1/p' "$OUT/env.json" 2>/dev/null | head -1)
NGPUS=$(grep -c '"cc":' "$OUT/env.json" 2>/dev/null)
SLUG=$(printf '%s' "${GPU_NAME:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9][^a-z0-9]*/-/g; s/^-//; s/-$//')
[ "${NGPUS:-0}" -gt 1 ] 2>/dev/null && SLUG="$SLUG-x$NGPUS"
RESULT_NAME="${SLUG:-unknown-gpu}-$(date -u +%F)"
RESULTS="$OUT/results/$RESULT_NAME"
BIG_LOGS=$(find "$OUT" -maxdepth 1 -name '*.log' -size +200k -printf '%f ' 2>/dev/null)
{
    echo
    echo "==================================== gpu_check summary ===================================="
    printf "%-16s %-8s %7s %7s  %s\n" step status secs limit result
    printf "%-16s %-8s %7s %7s  %s\n" ---- ------ ---- ----- ------
    for i in "${!R_NAME[@]}"; do
        printf "%-16s %-8s %7s %7s  %s\n" "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_SECS[$i]}" \
            "${R_LIMIT[$i]}" "${R_NOTE[$i]}"
    done
    echo
    timeout -k 2 10 "$PY" "$HELP/ratios.py" "$OUT" 2>/dev/null | grep -E '^(RATIO|MISSING)' \
        || echo "(no benchmark ratios)"
    [ -f "$OUT/diag.json" ] && timeout -k 2 10 "$PY" "$HELP/diag.py" --summary "$OUT/diag.json" 2>/dev/null
    echo
    echo "total $(secs $(( $(now_ms) - START_MS )))s for a budget of ${BUDGET}s; mandatory steps not passing: $MANDATORY_FAILED$([ "$INTERRUPTED" = 1 ] && echo ' (interrupted)')"
    echo "logs and JSON: $OUT"
    echo "results to commit: $RESULTS/ (summary, JSON, train/, logs up to 200 KiB${BIG_LOGS:+; left out: $BIG_LOGS})"
    echo "  cp -r $RESULTS benchmarks/results/ && git add benchmarks/results/$RESULT_NAME"
} | tee "$OUT/summary.txt"

rm -rf "$RESULTS"
mkdir -p "$RESULTS"
cp "$OUT/summary.txt" "$RESULTS/"
for f in "$OUT"/*.json "$OUT"/*.log; do
    [ -f "$f" ] || continue
    case " $BIG_LOGS " in *" $(basename "$f") "*) continue ;; esac
    cp "$f" "$RESULTS/"
done
[ -d "$OUT/train" ] && cp -r "$OUT/train" "$RESULTS/"
if [ "${GPU_CHECK_SAVE:-}" = 1 ]; then
    mkdir -p "$ROOT/benchmarks/results" && rm -rf "$ROOT/benchmarks/results/$RESULT_NAME" \
        && cp -r "$RESULTS" "$ROOT/benchmarks/results/" \
        && echo "copied to benchmarks/results/$RESULT_NAME/ (GPU_CHECK_SAVE=1): review, then commit it"
fi
[ "$INTERRUPTED" = 1 ] && exit 130
[ "$MANDATORY_FAILED" -eq 0 ]

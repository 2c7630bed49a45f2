# gpu_check step e_nccl: NcclComm at world size 1 and with 2 ranks (on one GPU:
# NCCL_MULTI_RANK_GPU_ENABLE=1, NCCL >= 2.30) through python -m minisam.launch, against
# ThreadComm on the same two SAM steps (nccl_check.py); then benchmarks/allreduce.py on
# one GPU. Exit 1 if a comparison fails or a run is missing.
D=$WORK/nccl
rm -rf "$D"; mkdir -p "$D"
"$PY" -c "
from cupy.cuda import nccl
print('nccl.available:', nccl.available)
if nccl.available:
    print('NCCL runtime', nccl.get_version(), 'built against', nccl.get_build_version())"
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
NVER=$("$PY" -c "from cupy.cuda import nccl; print(nccl.get_version() if nccl.available else 0)" 2>/dev/null || echo 0)
case $NGPU in ''|*[!0-9]*) NGPU=0 ;; esac
case $NVER in ''|*[!0-9]*) NVER=0 ;; esac
echo "GPUs: $NGPU, NCCL: $NVER"
rc=0
echo "## ThreadComm reference (threads on the GPU)"
timeout --foreground -k 5 45 "$PY" "$HELP/nccl_check.py" threads "$D/threads" || rc=1
echo "## NcclComm, world size 1 (through the launcher)"
timeout --foreground -k 5 45 "$PY" -m minisam.launch --nproc 1 --grace 5 --raw -- \
    "$PY" "$HELP/nccl_check.py" child "$D/n1" || rc=1
echo "## NcclComm, 2 ranks"
EXTRA=()
if [ "$NGPU" -lt 2 ]; then
    if [ "$NVER" -lt 23000 ]; then
        echo "2 ranks on one GPU need NCCL >= 2.30 (NCCL_MULTI_RANK_GPU_ENABLE); this is $NVER: skipped"
        echo "NCCL $NVER < 2.30 with one GPU" > "$D/n2.skipped"
    fi
    EXTRA=(NCCL_MULTI_RANK_GPU_ENABLE=1)
fi
if [ ! -f "$D/n2.skipped" ]; then
    if ! env "${EXTRA[@]}" timeout --foreground -k 5 50 "$PY" -m minisam.launch --nproc 2 --grace 5 --raw -- \
            "$PY" "$HELP/nccl_check.py" child "$D/n2"; then
        echo "2-rank run failed; retrying once with NCCL_MAX_CTAS=1 NCCL_NVLS_ENABLE=0"
        rm -rf "$D/n2"
        env "${EXTRA[@]}" NCCL_MAX_CTAS=1 NCCL_NVLS_ENABLE=0 timeout --foreground -k 5 40 \
            "$PY" -m minisam.launch --nproc 2 --grace 5 --raw -- \
            "$PY" "$HELP/nccl_check.py" child "$D/n2" || rc=1
    fi
fi
echo "## compare"
"$PY" "$HELP/nccl_check.py" compare "$D" || rc=1
echo "## benchmarks/allreduce.py, one GPU (pack + ncclAllReduce + divide, world size 1)"
if timeout --foreground -k 5 30 "$PY" "$ROOT/benchmarks/allreduce.py" --iters 10 --repeats 3 \
        --warmup 2 > "$OUT/allreduce_1gpu.json"; then
    cat "$OUT/allreduce_1gpu.json"
else
    echo "allreduce.py failed"; rc=1
fi
exit $rc

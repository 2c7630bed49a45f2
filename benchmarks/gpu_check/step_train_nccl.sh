# gpu_check step f2_train_gpus2 (optional): minisam train --gpus 2 (two ranks over NCCL
# through the CLI; on one GPU with NCCL_MULTI_RANK_GPU_ENABLE=1, which needs NCCL >= 2.30).
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
NVER=$("$PY" -c "from cupy.cuda import nccl; print(nccl.get_version() if nccl.available else 0)" 2>/dev/null || echo 0)
case $NGPU in ''|*[!0-9]*) NGPU=0 ;; esac
case $NVER in ''|*[!0-9]*) NVER=0 ;; esac
EXTRA=()
if [ "$NGPU" -lt 2 ]; then
    [ "$NVER" -lt 23000 ] && { echo "one GPU and NCCL $NVER < 2.30: cannot run 2 ranks; skipped"; exit 0; }
    EXTRA=(NCCL_MULTI_RANK_GPU_ENABLE=1)
fi
D=$WORK/train_nccl
rm -rf "$D"
env "${EXTRA[@]}" "$PY" -m minisam train --gpus 2 --dataset synthetic --epochs 1 --batch-size 64 \
    --no-progress --out "$D/run" || exit 1
mkdir -p "$OUT/train/run_gpus2"
cp "$D/run"/*.json "$D/run"/metrics.jsonl "$OUT/train/run_gpus2/" 2>/dev/null
cat "$D/run/metrics.jsonl"
"$PY" "$HELP/train_check.py" metrics "$D/run=1"

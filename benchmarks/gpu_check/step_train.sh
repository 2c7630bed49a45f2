# gpu_check step f_train: minisam train --device gpu on synthetic data (WRN-10-2, 1024
# images, batch 64: 16 steps an epoch): 2 epochs stopped at step 20 (--max-steps), then
# --resume to the end, eval on the GPU, the same 2 epochs uninterrupted (is the resume
# bitwise exact? informational), and 2 thread replicas. train_check.py judges the
# metrics; config.json and metrics.jsonl are copied to OUT/train/<run>/.
D=$WORK/train
rm -rf "$D"; mkdir -p "$D" "$OUT/train"
rc=0
echo "## train 2 epochs x 16 steps, stopped at step 20 (--max-steps), on the GPU"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --epochs 2 \
    --batch-size 64 --no-progress --max-steps 20 --out "$D/run" || rc=1
echo "## --resume to the end"
timeout --foreground -k 5 60 "$PY" -m minisam train --resume --out "$D/run" --no-progress || rc=1
echo "## eval on the GPU"
timeout --foreground -k 5 40 "$PY" -m minisam eval "$D/run" --device gpu || rc=1
echo "## the same 2 epochs uninterrupted"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --epochs 2 \
    --batch-size 64 --no-progress --out "$D/full" || rc=1
"$PY" "$HELP/train_check.py" resume "$D/run" "$D/full"
echo "## 2 thread replicas on the GPU"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --replicas 2 \
    --epochs 1 --batch-size 64 --no-progress --out "$D/run_r2" || rc=1
for r in run run_r2; do
    mkdir -p "$OUT/train/$r"
    cp "$D/$r"/*.json "$D/$r"/metrics.jsonl "$OUT/train/$r/" 2>/dev/null
done
"$PY" "$HELP/train_check.py" metrics "$D/run=2" "$D/run_r2=1" || rc=1
exit $rc

# gpu_check step tf32 (optional): minisam bench --tf32 against torch_step.py --tf32
# (eager), WRN-28-10 first, then WRN-16-8; ratios.py prints the tf32 RATIO lines (rows
# carry "tf32": true).
rc=0
for m in wrn28_10 wrn16_8; do
    "$PY" -m minisam bench --tf32 --model "$m" --batch-size 128 --device gpu --warmup 2 \
        --steps 5 --json "$OUT/bench_tf32_minisam_$m.json" || rc=1
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        "$PY" "$ROOT/benchmarks/peers/torch_step.py" --model "$m" --batch-size 128 --device gpu \
            --mode eager --tf32 --warmup 3 --steps 5 --json "$OUT/bench_tf32_torch_$m.json" \
            > /dev/null || rc=1
    fi
done
"$PY" "$HELP/ratios.py" "$OUT" | grep tf32 || true
exit $rc

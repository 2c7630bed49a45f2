# gpu_check step d_bench: minisam bench against the PyTorch eager peer, WRN-16-8 and
# WRN-28-10, batch 128, float32 on both sides (TF32 off: minisam's default, torch_step's
# default), one benchmarks/run_all.py per model so that a time-out keeps the first model's
# rows; minisam alone when torch has no CUDA. Then ratios.py: exit 1 if a model has no
# fp32 minisam row or its row has an error.
MODELS="wrn16_8 wrn28_10"
rc=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    for m in $MODELS; do
        "$PY" "$ROOT/benchmarks/run_all.py" --device gpu --models "$m" --batch-size 128 \
            --warmup 3 --steps 10 --skip pytorch-compile jax --timeout 100 \
            --out "$OUT/bench_run_all_$m.json" || rc=1
    done
else
    echo "torch with CUDA is not available: timing minisam alone"
    for m in $MODELS; do
        "$PY" -m minisam bench --model "$m" --batch-size 128 --device gpu --warmup 3 --steps 10 \
            --json "$OUT/bench_minisam_$m.json" || rc=1
    done
fi
"$PY" "$HELP/ratios.py" "$OUT" --expect "${MODELS// /,}" || rc=1
exit $rc

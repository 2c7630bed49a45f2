# gpu_check step b_pytest: pytest -m gpu on the real CuPy, with a 90 s per-test timeout
# (pytest-timeout if installed, else gpucheck_timeout.py) and at most 5 failures before it
# stops; fallback_tests.py when pytest is missing.
unset MINISAM_STRICT_CUPY            # the real CuPy, not the CI stand-in
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed: running the pytest-free fallback instead"
    exec "$PY" "$HELP/fallback_tests.py"
fi
args=(-m gpu -q --maxfail=5 -rfEs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout=90)
else
    mkdir -p "$WORK/plugin" && cp "$HELP/gpucheck_timeout.py" "$WORK/plugin/"   # the plugin alone
    export PYTHONPATH="$WORK/plugin:$PYTHONPATH" GPUCHECK_TEST_TIMEOUT=90
    args+=(-p gpucheck_timeout)
fi
cd "$ROOT" || exit 1
echo "+ $PY -m pytest ${args[*]}"
"$PY" -m pytest "${args[@]}"

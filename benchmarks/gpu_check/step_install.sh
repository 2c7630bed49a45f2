# gpu_check step a_install: minisam importable, offline. Run by benchmarks/gpu_check.sh
# (ROOT, OUT, PY, HELP, WORK exported). pip install -e . --no-deps --no-index; if that
# fails (no network, no build backend), the runner's PYTHONPATH=$ROOT still makes minisam
# importable. Then which optional tools the later steps will find.
"$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" || echo "setuptools: missing"
if "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT"; then
    echo "INSTALL: editable install OK"
else
    echo "INSTALL: pip install -e . failed (offline, no build backend?); using PYTHONPATH=$ROOT"
fi
(cd /tmp && "$PY" -c "import minisam; print('minisam', minisam.__version__, 'from', minisam.__file__)") || exit 1
"$PY" -c "import tqdm" 2>/dev/null && echo "tqdm: present" || echo "tqdm: MISSING (fine: every train run here passes --no-progress)"
"$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: MISSING (step b_pytest falls back to fallback_tests.py)"
"$PY" -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: present" || echo "pytest-timeout: missing (step b_pytest uses gpucheck_timeout.py)"
exit 0

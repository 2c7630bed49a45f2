"""With MINISAM_STRICT_CUPY=1, ``import cupy`` gives the strict stand-in in tests/standin
(here and in every subprocess a test starts), and a ``gpu`` test that skips fails: under
the stand-in there is no "no GPU" to skip for. ``make test`` runs ``pytest -m gpu`` so."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin")
STRICT = os.environ.get("MINISAM_STRICT_CUPY") == "1"

if STRICT:
    sys.path.insert(0, STANDIN)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [STANDIN] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    import cupy
    assert cupy.__version__.endswith("strict-standin"), cupy.__file__
    _nccl_dir = tempfile.mkdtemp(prefix="minisam-standin-nccl-")   # the stand-in NCCL's files
    os.environ.setdefault("MINISAM_STANDIN_NCCL_DIR", _nccl_dir)
    atexit.register(shutil.rmtree, _nccl_dir, True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.get_closest_marker("gpu") is not None:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: a gpu test skipped under the strict CuPy "
                           f"stand-in ({report.longrepr}); it must run here")

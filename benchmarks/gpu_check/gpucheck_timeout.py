"""A per-test timeout for pytest when pytest-timeout is missing (gpu_check step b_pytest
loads it with ``-p gpucheck_timeout``, this folder on PYTHONPATH).

SIGALRM fails the running test after GPUCHECK_TEST_TIMEOUT seconds (default 90); if the
test is stuck inside C code (an NCCL init, a kernel) where the alarm cannot interrupt it,
faulthandler dumps every thread's stack and ends the whole run 30 s later."""
import faulthandler
import os
import signal

import pytest

_T = float(os.environ.get("GPUCHECK_TEST_TIMEOUT", "90"))


def _alarm(signum, frame):
    raise TimeoutError(f"test ran longer than {_T:g} s (gpu_check per-test timeout)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(_T + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, _T)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

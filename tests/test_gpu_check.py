"""benchmarks/gpu_check.sh on the CPU: its step runner (selection, budget, a failing step
never stopping the others, the summary, the exit status), its NCCL step end to end under
the strict CuPy stand-in, and its helpers' arithmetic (ratios.py, nccl_check.py compare)
on results written here. What needs a real GPU (timings, real NCCL) it cannot check."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STANDIN = os.path.join(ROOT, "tests", "standin")
STEPS = ["env", "a_install", "b_pytest", "c_verify", "d_bench", "e_nccl", "f_train", "diag",
         "tf32", "f2_train_gpus2"]


def run(tmp_path, cwd=ROOT, timeout=240, **env):
    e = dict(os.environ, **{"OUT": str(tmp_path / "out"), "PY": sys.executable, **env})
    return subprocess.run(["bash", SCRIPT], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


def summary(tmp_path) -> dict:
    text = (tmp_path / "out" / "summary.txt").read_text()
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in STEPS:
            rows[parts[0]] = parts[1]
    return rows


def test_syntax_and_refusal_outside_the_repository(tmp_path):
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    r = run(tmp_path, cwd=str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "run me from minisam's root" in r.stderr


def test_failing_steps_do_not_stop_the_others_and_the_budget_skips(tmp_path):
    fake = tmp_path / "fakepython"
    fake.write_text("#!/bin/sh\nexit 1\n")     # every Python call fails at once
    fake.chmod(0o755)
    # Budget 150 s: env, a, b and c keep back more than that for the steps after them
    # (reserves 200, 200, 160, 130 s), so they are skipped; d, e and f then run and fail.
    r = run(tmp_path, PY=str(fake), GPU_CHECK_BUDGET="150")
    rows = summary(tmp_path)
    assert [rows[s] for s in STEPS[:7]] == ["SKIP"] * 4 + ["FAIL"] * 3, rows
    assert set(rows) == set(STEPS)
    assert r.returncode == 1                         # mandatory steps did not pass
    assert "mandatory steps not passing: 6" in r.stdout   # a..f; env is informational


@pytest.mark.slow
def test_the_nccl_step_passes_under_the_strict_cupy_standin(tmp_path):
    """NcclComm (world size 1 and 2 ranks through the launcher, over the stand-in's NCCL)
    against ThreadComm on two SAM steps, both perturbation modes: what step e compares."""
    (tmp_path / "nccl").mkdir()
    r = run(tmp_path, PYTHONPATH=STANDIN, GPU_CHECK_ONLY="env,e_nccl",
            MINISAM_STANDIN_NCCL_DIR=str(tmp_path / "nccl"))
    rows = summary(tmp_path)
    assert rows["env"] == "PASS" and rows["e_nccl"] == "PASS", r.stdout[-3000:]
    assert all(rows[s] == "-" for s in STEPS if s not in ("env", "e_nccl"))
    log = (tmp_path / "out" / "e_nccl.log").read_text()
    assert log.count("-> ok") == 6 and "compare: PASS" in log   # 2 modes x (1 + 2 ranks)
    assert r.returncode == 0


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    e = dict(os.environ, OUT=str(out), GPU_CHECK_HELPERS_ONLY="1")
    assert subprocess.run(["bash", SCRIPT], cwd=ROOT, env=e, timeout=60).returncode == 0
    return out / "helpers"


def bench_row(framework, sam_ms, sgd_ms, mem, tf32=False, **kw):
    return {"framework": framework, "model": "wrn16_8", "batch_size": 128, "sam_ms": sam_ms,
            "sgd_ms": sgd_ms, "sam_images_per_s": 128e3 / sam_ms,
            "sgd_images_per_s": 128e3 / sgd_ms, "sam_sgd_ratio": sam_ms / sgd_ms,
            "peak_memory_mb": mem, "tf32": tf32, "error": None, **kw}


def test_ratios_from_bench_results(tmp_path, helpers):
    rows = [bench_row("minisam", 200.0, 100.0, 3000.0, pool_mb=4000.0),
            bench_row("pytorch-eager", 160.0, 90.0, 2500.0)]
    (tmp_path / "bench_run_all_wrn16_8.json").write_text(json.dumps({"rows": rows}))
    r = subprocess.run([sys.executable, str(helpers / "ratios.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("RATIO wrn16_8 fp32"))
    assert "minisam/torch = 0.80" in line                    # (128/0.2) / (128/0.16)
    assert "SGD 0.90" in line and "peak live vs torch max allocated) 1.20" in line
    assert "CuPy pool 4000 MiB" in line
    s = json.loads((tmp_path / "bench_summary.json").read_text())["summary"][0]
    assert s["sam_throughput_ratio_minisam_over_torch"] == pytest.approx(160 / 200)
    # a minisam fp32 row with an error is a failure of the step
    rows[0]["error"] = "CUDA out of memory"
    (tmp_path / "bench_run_all_wrn16_8.json").write_text(json.dumps({"rows": rows}))
    r = subprocess.run([sys.executable, str(helpers / "ratios.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1


def test_nccl_compare_on_written_results(tmp_path, helpers):
    rng = np.random.default_rng(0)
    res = {"params/w": rng.standard_normal(5).astype(np.float32), "metrics/loss": np.float32(1)}
    for sub, size in (("threads", 1), ("threads", 2), ("n1", 1), ("n2", 2)):
        os.makedirs(tmp_path / sub, exist_ok=True)
        for sync in (0, 1):
            for r in range(size):
                np.savez(tmp_path / sub / f"R{size}_sync{sync}_rank{r}.npz", **res)

    def compare():
        p = subprocess.run([sys.executable, str(helpers / "nccl_check.py"), "compare",
                            str(tmp_path)], capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout

    code, out = compare()
    assert code == 0 and "compare: PASS" in out and out.count("(bitwise equal)") == 6
    bad = dict(res, **{"params/w": res["params/w"] * np.float32(1.001)})
    np.savez(tmp_path / "n2" / "R2_sync1_rank1.npz", **bad)
    code, out = compare()
    assert code == 1 and re.search(r"R=2 sync_perturbations=True rank 1: .*-> FAIL", out)
    assert "parameters identical on both ranks: False" in out
    os.remove(tmp_path / "n2" / "R2_sync1_rank1.npz")
    code, out = compare()
    assert code == 1 and "MISSING" in out
    (tmp_path / "n2.skipped").write_text("NCCL 22000 < 2.30 with one GPU")
    code, out = compare()
    assert code == 0 and "NCCL R=2: not run (NCCL 22000" in out

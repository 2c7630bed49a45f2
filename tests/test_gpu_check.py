"""benchmarks/gpu_check.sh on the CPU: its runner (time boxes, budget and reserves, a failing
or hanging step never stopping the others, the summary, the exit status, the results
folder), driven through fake helpers and a fake python; its NCCL step end to end under the
strict CuPy stand-in; and its helpers' own logic (ratios, NCCL comparison, training checks,
diag summary, env, the per-test timeout plugin, the pytest-free fallback) on inputs written
here. What needs a real GPU (timings, real CUDA and NCCL) it cannot check."""
import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
HELPERS = os.path.join(ROOT, "benchmarks", "gpu_check")
STANDIN = os.path.join(ROOT, "tests", "standin")
# the steps in order, and the helper each one runs (the script's header)
STEPS = {"env": "env", "a_install": "step_install", "b_pytest": "step_pytest",
         "c_verify": "step_verify", "d_bench": "step_bench", "e_nccl": "step_nccl",
         "f_train": "step_train", "diag": "diag", "tf32": "step_tf32",
         "f2_train_gpus2": "step_train_nccl"}
MANDATORY = {"a_install", "b_pytest", "c_verify", "d_bench", "e_nccl", "f_train"}

# a fake python: "$1" is the helper it is asked to run; what it then does is the shell
# snippet $FAKE_DIR/<helper>.sh, if the test wrote one, else it says "ok" and exits 0
FAKE_PY = """#!/bin/bash
name=$(basename "$1"); name=${name%.py}; name=${name%.sh}
echo "$name" >> "$FAKE_DIR/calls"
[ -f "$FAKE_DIR/$name.sh" ] && . "$FAKE_DIR/$name.sh"
echo "fake $name ok"
exit 0
"""
SLEEP = "exec sleep 300\n"                                    # ends at SIGTERM
HANG = "trap '' TERM\nwhile :; do sleep 0.05; done\n"         # needs SIGKILL
FAIL = "echo 'fake failure'; exit 1\n"


def load(name):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}",
                                                  os.path.join(HELPERS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_env(tmp_path, actions=None):
    """A helper folder whose every helper hands over to the fake python, the fake python,
    and the actions; returns the environment for the runner."""
    h, fake = tmp_path / "helpers", tmp_path / "fake"
    h.mkdir()
    fake.mkdir()
    for helper in list(STEPS.values()) + ["ratios"]:
        if helper.startswith("step_"):
            (h / f"{helper}.sh").write_text('exec "$PY" "$0" "$@"\n')
        else:
            (h / f"{helper}.py").write_text("")
    py = tmp_path / "fakepy"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    for helper, code in (actions or {}).items():
        (fake / f"{helper}.sh").write_text(code)
    return {"PY": str(py), "GPU_CHECK_HELPERS": str(h), "FAKE_DIR": str(fake),
            "GPU_CHECK_GRACE": "1"}


def run(tmp_path, cwd=ROOT, timeout=120, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    e.update(OUT=str(tmp_path / "out"), **env)
    t0 = time.monotonic()
    r = subprocess.run(["bash", SCRIPT], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=timeout)
    r.wall = time.monotonic() - t0
    return r


def summary(tmp_path) -> dict:
    """step -> (status, secs, limit, result) from summary.txt."""
    rows = {}
    for line in (tmp_path / "out" / "summary.txt").read_text().splitlines():
        parts = line.split(None, 4)
        if parts and parts[0] in STEPS:
            rows[parts[0]] = (parts[1], parts[2], parts[3], parts[4] if len(parts) > 4 else "")
    assert list(rows) == list(STEPS), rows          # every step, in order
    return rows


def statuses(tmp_path) -> dict:
    return {k: v[0] for k, v in summary(tmp_path).items()}


def calls(tmp_path) -> list:
    p = tmp_path / "fake" / "calls"
    return p.read_text().split() if p.exists() else []


def started(tmp_path, step):
    """(seconds after the start, limit) from the step's header line in its log."""
    text = (tmp_path / "out" / f"{step}.log").read_text()
    m = re.search(rf"=== \[{step}\] \S+ \(t\+([\d.]+)s\), limit ([\d.]+)s", text)
    return float(m.group(1)), float(m.group(2))


# ---- the runner -----------------------------------------------------------------------------

def test_syntax_and_every_helper_compiles(tmp_path):
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    names = sorted(os.listdir(HELPERS))
    shells = [n for n in names if n.endswith(".sh")]
    pys = [n for n in names if n.endswith(".py")]
    assert {f"{h}.sh" for h in STEPS.values() if h.startswith("step_")} <= set(shells)
    assert {"env.py", "ratios.py", "nccl_check.py", "diag.py", "fallback_tests.py",
            "gpucheck_timeout.py", "train_check.py"} <= set(pys)
    for n in shells:
        r = subprocess.run(["bash", "-n", os.path.join(HELPERS, n)], capture_output=True)
        assert r.returncode == 0, (n, r.stderr)
    for n in pys:
        py_compile.compile(os.path.join(HELPERS, n), cfile=str(tmp_path / (n + "c")),
                           doraise=True)


def test_refuses_to_run_outside_the_repository_root(tmp_path):
    for cwd in (tmp_path, os.path.join(ROOT, "benchmarks")):
        r = run(tmp_path, cwd=str(cwd))
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and "repository root" in r.stderr
        assert r.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("knob, value", [("GPU_CHECK_ONLY", "env,b_pytset"),
                                         ("GPU_CHECK_CAPS", "d_bench=soon"),
                                         ("GPU_CHECK_BUDGET", "7min"),
                                         ("GPU_CHECK_GRACE", "0")])
def test_a_mistyped_knob_is_one_line_and_exit_2(tmp_path, knob, value):
    env = fake_env(tmp_path) | {knob: value}
    r = run(tmp_path, **env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert knob in r.stderr and calls(tmp_path) == [] and not (tmp_path / "out").exists()


def test_failures_and_timeouts_do_not_stop_the_later_steps(tmp_path):
    env = fake_env(tmp_path, {"env": FAIL, "step_pytest": FAIL, "step_verify": SLEEP,
                              "step_bench": HANG})
    r = run(tmp_path, **env, GPU_CHECK_CAPS="c_verify=1,d_bench=1")
    rows = summary(tmp_path)
    assert {k: v[0] for k, v in rows.items()} == {
        "env": "FAIL", "a_install": "PASS", "b_pytest": "FAIL", "c_verify": "TIMEOUT",
        "d_bench": "TIMEOUT", "e_nccl": "PASS", "f_train": "PASS", "diag": "PASS",
        "tf32": "PASS", "f2_train_gpus2": "PASS"}
    assert calls(tmp_path)[:10] == list(STEPS.values())    # each step ran, in order
    # c_verify stops at SIGTERM after its 1 s; d_bench ignores SIGTERM: killed 1 s later
    assert 0.9 <= float(rows["c_verify"][1]) < 1.8
    assert 1.9 <= float(rows["d_bench"][1]) < 2.9
    assert r.returncode == 1
    assert "mandatory steps not passing: 3" in r.stdout        # b, c and d; env is not
    assert "fake failure" in (tmp_path / "out" / "b_pytest.log").read_text()


def test_the_exit_status_follows_the_mandatory_steps_only(tmp_path):
    env = fake_env(tmp_path, {"env": FAIL, "diag": FAIL, "step_tf32": SLEEP,
                              "step_train_nccl": FAIL})
    r = run(tmp_path, **env, GPU_CHECK_CAPS="tf32=0.5")
    s = statuses(tmp_path)
    assert [s[k] for k in ("env", "diag", "tf32", "f2_train_gpus2")] == \
        ["FAIL", "FAIL", "TIMEOUT", "FAIL"]
    assert all(s[k] == "PASS" for k in MANDATORY)
    assert r.returncode == 0, r.stdout[-2000:]

    # only the selected steps run; the others are "-" and do not count
    (tmp_path / "out").rename(tmp_path / "out1")
    (tmp_path / "fake" / "calls").unlink()
    (tmp_path / "fake" / "step_install.sh").write_text(FAIL)
    r = run(tmp_path, **env, GPU_CHECK_ONLY="a_install,diag")
    s = statuses(tmp_path)
    assert s["a_install"] == "FAIL" and s["diag"] == "FAIL"
    assert all(v == "-" for k, v in s.items() if k not in ("a_install", "diag"))
    assert calls(tmp_path)[:2] == ["step_install", "diag"] and len(calls(tmp_path)) == 3
    assert r.returncode == 1                   # a_install is mandatory


def test_the_budget_keeps_time_for_the_mandatory_steps_and_skips_what_does_not_fit(tmp_path):
    """The rule (header): a step gets min(box, time left - reserve), the reserve being
    min + grace for every mandatory step after it; below its min it is skipped."""
    budget, grace = 7.0, 1.0
    mins = {"env": 0.2, "a_install": 0.2, "b_pytest": 0.5, "c_verify": 0.2, "d_bench": 0.2,
            "e_nccl": 0.2, "f_train": 0.2, "diag": 5.0, "tf32": 0.2, "f2_train_gpus2": 0.2}
    boxes = dict.fromkeys(STEPS, 2.0) | {"b_pytest": 20.0, "diag": 8.0}
    caps = ",".join(f"{k}={boxes[k]}/{mins[k]}" for k in STEPS)
    env = fake_env(tmp_path, {"step_pytest": SLEEP})
    r = run(tmp_path, **env, GPU_CHECK_BUDGET=str(budget), GPU_CHECK_CAPS=caps)
    rows = summary(tmp_path)
    s = {k: v[0] for k, v in rows.items()}

    def reserve(step):
        names = list(STEPS)
        return sum(mins[k] + grace for k in names[names.index(step) + 1:] if k in MANDATORY)

    # env would leave less than the reserve (7.5 s > 7 s): skipped before anything ran
    assert reserve("env") > budget and s["env"] == "SKIP" and "budget spent" in rows["env"][3]
    for step in ("a_install", "b_pytest"):     # both get what the reserve leaves
        t, limit = started(tmp_path, step)
        assert limit == pytest.approx(budget - t - reserve(step), abs=0.15), step
    assert s["a_install"] == "PASS" and s["b_pytest"] == "TIMEOUT"
    # after b_pytest's time-out the later mandatory steps still had their reserve
    assert all(s[k] == "PASS" for k in ("c_verify", "d_bench", "e_nccl", "f_train"))
    assert s["diag"] == "SKIP" and "< 5.0s" in rows["diag"][3]       # about 4.4 s left
    assert s["tf32"] == "PASS" and s["f2_train_gpus2"] == "PASS"
    assert "diag" not in calls(tmp_path) and "env" not in calls(tmp_path)
    total = float(re.search(r"^total ([\d.]+)s", r.stdout, re.M).group(1))
    assert total <= budget + grace and r.wall < budget + grace + 2
    assert r.returncode == 1

    # no budget at all: every step skipped, nothing run, mandatory ones count as failed
    (tmp_path / "out").rename(tmp_path / "out1")
    (tmp_path / "fake" / "calls").unlink()
    r = run(tmp_path, **env, GPU_CHECK_BUDGET="1")
    assert set(statuses(tmp_path).values()) == {"SKIP"}
    assert calls(tmp_path) == ["ratios"]            # only the summary's
    assert r.returncode == 1 and "mandatory steps not passing: 6" in r.stdout


def test_results_folder_to_commit(tmp_path):
    gpu_json = json.dumps({"gpus": [{"id": 0, "name": "NVIDIA H200", "cc": "9.0"}]}, indent=1)
    env = fake_env(tmp_path, {
        "env": f"cat > \"$2/env.json\" <<'EOF'\n{gpu_json}\nEOF\n",
        "step_bench": "echo '{\"rows\": []}' > \"$OUT/bench_run_all_wrn16_8.json\"\n",
        "step_pytest": "head -c 300000 /dev/zero | tr '\\0' x\n",      # a 300 kB log
    })
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_run_all_stale.json").write_text("{}")     # from an earlier run: d_bench's
    (out / "notes.json").write_text("{}")                   # not the script's: kept
    r = run(tmp_path, **env)
    assert r.returncode == 0, r.stdout[-2000:]
    folders = list((out / "results").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"nvidia-h200-\d{4}-\d\d-\d\d", folders[0].name)
    got = {p.name for p in folders[0].iterdir()}
    assert {"summary.txt", "env.json", "bench_run_all_wrn16_8.json", "env.log",
            "d_bench.log"} <= got
    assert "b_pytest.log" not in got and "bench_run_all_stale.json" not in got
    assert not (out / "bench_run_all_stale.json").exists() and (out / "notes.json").exists()
    text = (out / "summary.txt").read_text()
    assert "left out: b_pytest.log" in text
    assert f"benchmarks/results/{folders[0].name}" in text
    assert (folders[0] / "summary.txt").read_text() == text
    assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results", folders[0].name))


def test_the_nccl_step_end_to_end_under_the_strict_cupy_standin(tmp_path):
    """The real step_nccl.sh and nccl_check.py: ThreadComm, then NcclComm at world size 1
    and with 2 ranks through python -m minisam.launch (the stand-in's NCCL), compared. Only
    benchmarks/allreduce.py (36M-parameter all-reduces, slow on NumPy) is faked."""
    py = tmp_path / "py"
    py.write_text(f"#!/bin/sh\ncase \"$1\" in */allreduce.py) echo '{{}}'; exit 0;; esac\n"
                  f"exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    (tmp_path / "nccl").mkdir()
    r = run(tmp_path, PY=str(py), PYTHONPATH=STANDIN, GPU_CHECK_ONLY="e_nccl",
            MINISAM_STANDIN_NCCL_DIR=str(tmp_path / "nccl"))
    s = statuses(tmp_path)
    assert s["e_nccl"] == "PASS", r.stdout[-3000:]
    log = (tmp_path / "out" / "e_nccl.log").read_text()
    assert log.count("-> ok (bitwise equal)") == 6      # 2 modes x (1 rank + 2 ranks)
    assert log.count("parameters identical on both ranks: True") == 2
    assert "compare: PASS" in log and r.returncode == 0


# ---- the helpers ----------------------------------------------------------------------------

def bench_row(framework, model, sam_ms, sgd_ms, mem, tf32=False, batch=128, **kw):
    row = {"framework": framework, "model": model, "batch_size": batch, "sam_ms": sam_ms,
           "sgd_ms": sgd_ms, "sam_images_per_s": batch * 1e3 / sam_ms,
           "sgd_images_per_s": batch * 1e3 / sgd_ms, "sam_sgd_ratio": sam_ms / sgd_ms,
           "peak_memory_mb": mem, "error": None, **kw}
    if tf32 is not None:
        row["tf32"] = tf32
    return row


def test_ratios_table_lines_and_summary(tmp_path, capsys):
    ratios = load("ratios")
    fp32 = [bench_row("minisam", "wrn16_8", 250.0, 100.0, 3600.0, pool_mb=5000.0,
                      peak_memory_kind="peak live bytes in the CuPy pool (MemoryHook)"),
            bench_row("pytorch-eager", "wrn16_8", 200.0, 125.0, 2400.0,
                      memory_kind="torch.cuda.max_memory_allocated")]
    (tmp_path / "bench_run_all_wrn16_8.json").write_text(json.dumps({"rows": fp32}))
    # tf32 by the rows' own field, in a file whose name does not say so
    (tmp_path / "bench_x.json").write_text(json.dumps(
        bench_row("minisam", "wrn16_8", 160.0, 80.0, 3000.0, tf32=True, pool_mb=4000.0)))
    # an error row without a tf32 field: the file name decides
    (tmp_path / "bench_tf32_torch_wrn16_8.json").write_text(json.dumps(
        [dict(bench_row("pytorch-eager", "wrn16_8", 1.0, 1.0, None, tf32=None), sam_ms=None,
              sgd_ms=None, sam_images_per_s=None, sgd_images_per_s=None, error="OOM")]))
    assert ratios.main([str(tmp_path), "--expect", "wrn16_8"]) == 0
    out = capsys.readouterr().out
    fp = next(l for l in out.splitlines() if l.startswith("RATIO wrn16_8 fp32"))
    # minisam/torch throughput = torch ms / minisam ms: SAM 200/250, SGD 125/100
    assert "minisam/torch = 0.80 (SAM 250.0 ms vs 200.0 ms)" in fp and "SGD 1.25" in fp
    assert "memory (peak live vs torch max allocated) 1.50" in fp     # 3600 / 2400
    assert "CuPy pool 5000 MiB" in fp
    tf = next(l for l in out.splitlines() if l.startswith("RATIO wrn16_8 tf32"))
    assert "minisam/torch = - (SAM 160.0 ms vs - ms)" in tf and "CuPy pool 4000 MiB" in tf
    table = [l.split() for l in out.splitlines() if l.startswith("wrn16_8")]
    assert sorted((t[1], t[2]) for t in table) == [("fp32", "minisam"), ("fp32", "pytorch-eager"),
                                                   ("tf32", "minisam"), ("tf32", "pytorch-eager")]
    pools = {(t[1], t[2]): t[8] for t in table}                 # the pool MiB column
    assert pools == {("fp32", "minisam"): "5000", ("fp32", "pytorch-eager"): "-",
                     ("tf32", "minisam"): "4000", ("tf32", "pytorch-eager"): "-"}
    saved = json.loads((tmp_path / "bench_summary.json").read_text())
    s = {x["precision"]: x for x in saved["summary"]}
    assert s["fp32"]["sam_throughput_ratio_minisam_over_torch"] == pytest.approx(200 / 250)
    assert s["fp32"]["sgd_throughput_ratio_minisam_over_torch"] == pytest.approx(125 / 100)
    assert s["fp32"]["peak_memory_ratio_live_over_torch_allocated"] == pytest.approx(1.5)
    assert s["fp32"]["minisam_pool_mb"] == 5000.0 and s["tf32"]["torch_error"] == "OOM"
    assert s["tf32"]["peak_memory_ratio_live_over_torch_allocated"] is None
    assert len(saved["rows"]) == 4 and saved["failed_models"] == []


def test_ratios_fail_without_a_good_fp32_minisam_row(tmp_path, capsys):
    ratios = load("ratios")
    f = tmp_path / "bench_run_all_wrn28_10.json"
    assert ratios.main([str(tmp_path)]) == 1                   # no rows at all
    good = bench_row("minisam", "wrn28_10", 500.0, 250.0, 9000.0)
    torch = bench_row("pytorch-eager", "wrn28_10", 400.0, 200.0, 8000.0)
    f.write_text(json.dumps({"rows": [good, torch]}))
    assert ratios.main([str(tmp_path)]) == 0
    assert ratios.main([str(tmp_path), "--expect", "wrn28_10,wrn16_8"]) == 1   # one missing
    assert "MISSING wrn16_8" in capsys.readouterr().out
    f.write_text(json.dumps({"rows": [dict(good, error="CUDA out of memory"), torch]}))
    assert ratios.main([str(tmp_path)]) == 1
    f.write_text(json.dumps({"rows": [dict(good, tf32=True), torch]}))   # tf32 only
    assert ratios.main([str(tmp_path)]) == 1
    f.write_text(json.dumps({"rows": [torch]}))
    r = subprocess.run([sys.executable, os.path.join(HELPERS, "ratios.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "MISSING wrn28_10" in r.stdout


def test_nccl_compare_on_written_results(tmp_path, capsys):
    nc = load("nccl_check")
    rng = np.random.default_rng(0)
    res = {"params/w": rng.standard_normal(5).astype(np.float32),
           "momentum/w": rng.standard_normal(5).astype(np.float32),
           "metrics/train_loss": np.float32(1.5)}
    for sub, size in (("threads", 1), ("threads", 2), ("n1", 1), ("n2", 2)):
        (tmp_path / sub).mkdir(exist_ok=True)
        for sync in (0, 1):
            for r in range(size):
                np.savez(tmp_path / sub / f"R{size}_sync{sync}_rank{r}.npz", **res)

    def compare():
        code = nc.main(["compare", str(tmp_path)])
        return code, capsys.readouterr().out

    code, out = compare()
    assert code == 0 and "compare: PASS" in out and out.count("(bitwise equal)") == 6
    # a relative difference of 1e-3 on one rank's parameters
    np.savez(tmp_path / "n2" / "R2_sync1_rank1.npz",
             **dict(res, **{"params/w": res["params/w"] * np.float32(1.001)}))
    code, out = compare()
    line = next(l for l in out.splitlines() if "R=2 sync_perturbations=True rank 1" in l)
    assert code == 1 and line.endswith("-> FAIL") and "1/3 arrays differ" in line
    assert "parameters identical on both ranks: False" in out and "compare: FAIL" in out
    # below the tolerance: passes, but is not bitwise equal
    np.savez(tmp_path / "n2" / "R2_sync1_rank1.npz",
             **dict(res, **{"metrics/train_loss": np.float32(1.5) * np.float32(1 + 2**-23)}))
    code, out = compare()
    line = next(l for l in out.splitlines() if "R=2 sync_perturbations=True rank 1" in l)
    assert code == 0 and "-> ok" in line and "bitwise" not in line
    os.remove(tmp_path / "n2" / "R2_sync1_rank1.npz")
    code, out = compare()
    assert code == 1 and "R=2 sync=1 rank 1: MISSING (n2 result absent)" in out
    (tmp_path / "n2.skipped").write_text("NCCL 22000 < 2.30 with one GPU")
    code, out = compare()
    assert code == 0 and "NCCL R=2: not run (NCCL 22000 < 2.30 with one GPU)" in out
    np.savez(tmp_path / "n1" / "R1_sync0_rank0.npz", **{"params/w": res["params/w"]})
    code, out = compare()
    assert code == 1 and "different keys" in out


def test_train_check_resume_and_metrics(tmp_path, capsys):
    tc = load("train_check")
    arrays = {"params/a": np.arange(4, dtype=np.float32), "momentum/a": np.ones(4, np.float32),
              "state/m": np.zeros(2, np.float32), "meta/step": np.int64(32)}
    for run in ("run", "full", "other"):
        (tmp_path / run).mkdir()
    np.savez(tmp_path / "run" / "checkpoint.npz", **arrays)
    np.savez(tmp_path / "full" / "checkpoint.npz", **arrays)
    np.savez(tmp_path / "other" / "checkpoint.npz",
             **dict(arrays, **{"state/m": np.array([0.0, 0.25], np.float32)}))
    assert tc.main(["resume", str(tmp_path / "run"), str(tmp_path / "full")]) == 0
    assert "bitwise equal True, max abs diff 0.00e+00 over 3 arrays" in capsys.readouterr().out
    assert tc.main(["resume", str(tmp_path / "run"), str(tmp_path / "other")]) == 0
    assert "bitwise equal False, max abs diff 2.50e-01" in capsys.readouterr().out
    assert tc.main(["resume", str(tmp_path / "run"), str(tmp_path / "nowhere")]) == 0
    assert "not compared" in capsys.readouterr().out

    def metrics(run, *records):
        (tmp_path / run / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    metrics("run", {"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0,
                                                     "test_error_rate": 0.25})
    metrics("full", {"epoch": 1, "train_loss": float("nan")})
    assert tc.main(["metrics", f"{tmp_path / 'run'}=2"]) == 0
    assert "run: 2/2 epochs, train loss 1.0, test error 0.25 -> ok" in capsys.readouterr().out
    assert tc.main(["metrics", f"{tmp_path / 'run'}=3"]) == 1              # one epoch short
    assert tc.main(["metrics", f"{tmp_path / 'run'}=2", f"{tmp_path / 'full'}=1"]) == 1
    assert "full: 1/1 epochs" in capsys.readouterr().out.splitlines()[-1]
    assert tc.main(["metrics", f"{tmp_path / 'other'}=1"]) == 1            # no metrics file


def test_diag_summary_from_a_written_diag_json(tmp_path, capsys):
    diag = load("diag")
    d = {"step_split": {"wrn28_10/sam": {"gpu_ms": 12.5, "host_ms": 3.0},
                        "wrn28_10/sam_peak_live_MiB": 777.0,
                        "wrn28_10/sam_keep_cols": {"gpu_ms": 11.0, "peak_live_MiB": 1500.0}},
         "bn_reduction": [{"shape": [128, 32, 32, 160], "op": "x.mean(axis=(0,1,2))",
                           "ms": 0.5, "GB_per_s": 100.0},
                          {"shape": [128, 8, 8, 640], "op": "x.mean(axis=(0,1,2))",
                           "ms": 0.1, "GB_per_s": 50.0}],
         "conv_pieces": {"gemm_fp32": {"ms": 2.0, "TFLOPS": 30.0}},
         "graph_capture": {"error": "RuntimeError: capture failed"},
         "hidden_syncs": {"syncs": "none detected"}}
    (tmp_path / "diag.json").write_text(json.dumps(d))
    assert diag.main(["--summary", str(tmp_path / "diag.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "DIAG wrn28_10/sam: GPU 12.5 ms, host 3.0 ms per step" in lines
    assert "DIAG wrn28_10/sam_peak_live_MiB: 777.0" in lines
    assert "DIAG wrn28_10/sam with keep_cols=True: GPU 11.0 ms, peak live 1500.0 MiB" in lines
    assert sum(l.startswith("DIAG BN stat") for l in lines) == 1        # the 160-channel one
    assert "DIAG conv gemm_fp32: 2.0 ms, 30.0 TFLOP/s" in lines
    assert "DIAG CUDA graph capture failed: RuntimeError: capture failed" in lines
    assert "DIAG hidden syncs: none detected" in lines
    assert "DIAG sections failed: graph_capture" in lines
    assert diag.main([str(tmp_path), "bn_reduction,no_such_section"]) == 2   # before any CuPy


def test_env_without_cupy_and_the_two_cupys_warning(tmp_path):
    env = load("env")
    assert env.cupy_warning({"numpy": "2", "cupy-cuda13x": "14.2"}) is None
    w = env.cupy_warning({"cupy-cuda12x": "14.0", "cupy-cuda13x": "14.2"})
    assert "cupy-cuda12x, cupy-cuda13x" in w and "gpu-cuda12" in w and "gpu-cuda13" in w
    r = subprocess.run([sys.executable, os.path.join(HELPERS, "env.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["python"] == sys.version.split()[0]
    assert info["packages"]["numpy"] == np.__version__
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except Exception:  # noqa: BLE001
        has_cupy = False
    if not has_cupy:     # this machine: no CuPy, which is the finding, and exit 1
        assert r.returncode == 1 and "CuPy PROBLEM" in r.stdout and "cupy_error" in info


def test_the_per_test_timeout_plugin(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\n"
        "def test_slow():\n    time.sleep(5)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpucheck_timeout",
                        "-p", "no:cacheprovider", str(tmp_path / "test_slow.py")],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=HELPERS, GPUCHECK_TEST_TIMEOUT="0.5"))
    assert r.returncode == 1 and time.monotonic() - t0 < 4.5
    assert "1 failed, 1 passed" in r.stdout
    assert "test ran longer than 0.5 s (gpu_check per-test timeout)" in r.stdout


def test_the_pytest_free_fallback(tmp_path):
    script = os.path.join(HELPERS, "fallback_tests.py")
    (tmp_path / "nccl").mkdir()
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([STANDIN, ROOT]),
                                MINISAM_STANDIN_NCCL_DIR=str(tmp_path / "nccl")))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "PASS NcclComm world size 1 in-process" in r.stdout and ", 0 failed" in r.stdout
    assert r.stdout.count("PASS layer ") == 9
    try:
        import cupy  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        pass
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 1 and "FAIL layer conv1" in r.stdout   # no CuPy: every check fails
    assert "fallback: 0 passed" in r.stdout

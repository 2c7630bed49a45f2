"""The training loop: exact resume (in process, after SIGKILL, after Ctrl-C), atomic
checkpoints, NaN handling, thread replicas and an external communicator."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import minisam.rundir as rundir_mod
from minisam.config import TrainConfig
from minisam.distributed.local import run_replicas
from minisam.rundir import load_checkpoint, read_metrics
from minisam.train import NonFiniteLossError, Trainer, TrainingInterrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**kw):
    base = dict(dataset="digits", image_size=8, model="wrn10_1", epochs=2, batch_size=64,
                rho=0.05, label_noise=0.2)
    return TrainConfig(**{**base, **kw})


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a.meta["step"] == b.meta["step"]
    for part in ("params", "state", "momentum"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{part}/{k}")
    strip = ("epoch_time_s", "elapsed_s")
    ra = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(a_dir)]
    rb = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(b_dir)]
    assert ra == rb


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------

def test_config_validation():
    with pytest.raises(ValueError, match="rho"):
        small(rho=-0.1)
    with pytest.raises(ValueError, match="divisible by replicas"):
        small(batch_size=10, replicas=3)
    with pytest.raises(ValueError, match="unknown dataset"):
        small(dataset="mnist")
    with pytest.raises(ValueError, match="unknown model"):
        small(model="resnet50")
    with pytest.raises(ValueError, match="lr"):
        small(lr=float("nan"))
    with pytest.raises(ValueError, match="label_noise"):
        small(label_noise=1.5)
    cfg = small()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.__dict__))) == cfg
    assert small(dataset="cifar10", model="wrn16_4").augment().crop_pad == 4
    assert small().augment().flip is False and small(flip=True, cutout=3).augment().cutout == 3


def test_run_directory_files_and_metrics(tmp_path):
    d = str(tmp_path / "run")
    rec = Trainer(small(), d, progress=False).fit()
    assert sorted(os.listdir(d)) == [".lock", "checkpoint.json", "checkpoint.npz", "config.json",
                                     "metrics.jsonl"]
    info = json.load(open(os.path.join(d, "config.json")))
    assert info["config"]["rho"] == 0.05 and info["steps_per_epoch"] == 1440 // 64
    recs = read_metrics(d)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[-1] == {**rec}
    assert recs[-1]["step"] == 2 * 22 and recs[-1]["test_error_rate"] < 0.5
    ck = load_checkpoint(d)
    assert ck.meta["epoch"] == 2 and ck.config == small() and ck.meta["rng"]["seed"] == 0
    assert json.load(open(os.path.join(d, "checkpoint.json")))["step"] == 44
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(small(), d, progress=False)


@pytest.mark.parametrize("replicas", [1, 2])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, replicas):
    cfg = small(epochs=3, replicas=replicas)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(cfg, a, progress=False).fit()
    out = Trainer(cfg, b, progress=False, max_steps=30).fit()   # stops mid-epoch 2
    assert out["stopped_at_step"] == 30 and load_checkpoint(b).meta["step_in_epoch"] == 8
    Trainer(None, b, progress=False, resume=True, max_steps=50).fit()
    Trainer(None, b, progress=False, resume=True).fit()
    assert_same_run(a, b)
    if replicas == 2:  # per-replica BN states are saved for exact resume; `state` is their mean
        ck = load_checkpoint(b)
        assert len(ck.replica_states) == 2
        for k in ck.state:
            np.testing.assert_array_equal(
                ck.state[k], (ck.replica_states[0][k] + ck.replica_states[1][k]) / 2)
    with pytest.raises(ValueError, match="differ"):
        Trainer(small(epochs=3, replicas=replicas, lr=0.5), b, resume=True, progress=False)


def _cli(*args):
    return [sys.executable, "-m", "minisam", "train", "--dataset", "digits", "--image-size", "8",
            "--model", "wrn10_1", "--epochs", "3", "--batch-size", "32", "--label-noise", "0.2",
            "--rho", "0.05", "--no-progress", *args]


def _straight(tmp_path):
    from minisam.cli import main
    a = str(tmp_path / "straight")
    assert main(_cli("--out", a)[3:]) == 0
    return a


def test_sigkill_after_first_checkpoint_then_resume_is_bitwise_identical(tmp_path):
    a = _straight(tmp_path)
    b = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli("--out", b), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    meta = os.path.join(b, "checkpoint.json")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.load(open(meta))["epoch"] >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 1 <= load_checkpoint(b).meta["epoch"] < 3      # really killed mid-run
    from minisam.cli import main
    assert main(["train", "--resume", "--out", b, "--no-progress"]) == 0
    assert_same_run(a, b)


def test_sigkill_inside_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    """The process kills itself between the temp file's fsync and os.replace of the
    second checkpoint: the first stays loadable, resume finishes the run exactly."""
    a = _straight(tmp_path)
    b = str(tmp_path / "torn")
    code = ("import os, signal, sys, minisam.rundir as t\n"
            "n = [0]\n"
            "def rep(src, dst, real=os.replace):\n"
            "    if dst.endswith('checkpoint.npz'):\n"
            "        n[0] += 1\n"
            "        if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(src, dst)\n"
            "t._replace = rep\n"
            "from minisam.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *_cli("--out", b)[3:]], env=cli_env(),
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert any(".tmp-" in f for f in os.listdir(b))          # the torn write's leftover
    ck = load_checkpoint(b)
    assert ck.meta["epoch"] == 1 and ck.meta["step_in_epoch"] == 0
    assert [r["epoch"] for r in read_metrics(b)] == [1, 2]    # logged, not checkpointed
    from minisam.cli import main
    assert main(["train", "--resume", "--out", b, "--no-progress"]) == 0
    assert not any(".tmp-" in f for f in os.listdir(b))
    assert_same_run(a, b)     # metrics.jsonl was cut back to epoch 1 on resume


def test_crash_between_temp_write_and_replace(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    tr = Trainer(small(epochs=1), d, progress=False)
    tr.fit()
    before = load_checkpoint(d)

    class Crash(BaseException):
        pass

    def crash(src, dst):
        raise Crash()
    monkeypatch.setattr(rundir_mod, "_replace", crash)
    tr.step += 1  # anything: the write must not land
    with pytest.raises(Crash):
        tr.save()
    after = load_checkpoint(d)
    assert after.meta == before.meta
    for k in before.params:
        np.testing.assert_array_equal(after.params[k], before.params[k])
    assert sorted(os.listdir(d)) == [".lock", "checkpoint.json", "checkpoint.npz", "config.json",
                                     "metrics.jsonl"]


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    tr = Trainer(small(epochs=3, gradient_clipping=0.0), d, progress=False)
    good_lr = tr.lr_fn
    tr.lr_fn = lambda step: good_lr(step) if step < 25 else 1e30   # explodes in epoch 2
    with pytest.raises(NonFiniteLossError, match=r"non-finite.*epoch 2.*last good checkpoint"):
        tr.fit()
    ck = load_checkpoint(d)
    assert ck.meta["epoch"] == 1 and ck.meta["step"] == 22
    assert all(np.isfinite(v).all() for v in ck.params.values())
    assert [r["epoch"] for r in read_metrics(d)] == [1]
    # the trainer still holds the last finite step, not the NaNs
    assert tr.step == 25 and all(np.isfinite(v).all() for v in tr.params.values())


def test_ctrl_c_saves_at_step_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = small(epochs=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(cfg, a, progress=False).fit()
    real = Trainer._train_step
    calls = [0]

    def interrupted(self, batch, lr):
        calls[0] += 1
        if calls[0] == 30:
            raise KeyboardInterrupt
        return real(self, batch, lr)
    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(TrainingInterrupted, match="global step 29.*--resume"):
        Trainer(cfg, b, progress=False).fit()
    monkeypatch.setattr(Trainer, "_train_step", real)
    m = load_checkpoint(b).meta
    assert (m["step"], m["epoch"], m["step_in_epoch"]) == (29, 1, 7)
    Trainer(None, b, resume=True, progress=False).fit()
    assert_same_run(a, b)


def signal_after_first_checkpoint(argv, run_dir, sig):
    """Start ``argv``, send ``sig`` once ``run_dir`` has a checkpoint; (exit code, stderr)."""
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    meta = os.path.join(run_dir, "checkpoint.json")
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(meta):
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigint_subprocess_exits_cleanly_with_checkpoint(tmp_path):
    b = str(tmp_path / "int")
    # a background job may inherit SIGINT as ignored: install Python's handler explicitly
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from minisam.cli import main; sys.exit(main(sys.argv[1:]))")
    code, err = signal_after_first_checkpoint(
        [sys.executable, "-c", code, *_cli("--out", b, "--epochs", "50")[3:]], b, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err and "--resume" in err
    m = load_checkpoint(b).meta
    assert m["step"] >= 45 and m["epoch"] < 50


def test_external_comm_matches_thread_replicas(tmp_path):
    """Two Trainers, each one replica with an external communicator (here ThreadComm
    handles; NCCL in production), train exactly like one Trainer with replicas=2."""
    cfg = small(epochs=1, replicas=2)
    a, b = str(tmp_path / "threads"), str(tmp_path / "external")
    Trainer(cfg, a, progress=False).fit()
    results = run_replicas(2, lambda r, comm: Trainer(cfg, b, comm=comm, progress=False).fit())
    assert results[0]["test_error_rate"] == pytest.approx(results[1]["test_error_rate"])
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for part in ("params", "momentum", "state"):
        for k, v in getattr(ca, part).items():
            np.testing.assert_array_equal(getattr(cb, part)[k], v, err_msg=k)
    ra, rb = read_metrics(a)[0], read_metrics(b)[0]
    assert ra["train_loss"] == rb["train_loss"]
    assert ra["test_error_rate"] == pytest.approx(rb["test_error_rate"], abs=1e-12)


def test_in_memory_run_and_evaluate():
    tr = Trainer(small(epochs=1, rho=0.0), None, progress=False)
    rec = tr.fit()
    assert rec["epoch"] == 1
    ev = tr.evaluate()
    assert ev["error_rate"] == pytest.approx(rec["test_error_rate"])
    assert tr.evaluate(tr.clean_train)["error_rate"] < tr.evaluate(tr.train_data)["error_rate"]


def test_one_replica_path_threads_made_once_and_ranks_build_only_their_rows(tmp_path,
                                                                              monkeypatch):
    """The topology is decided once: a Trainer with thread replicas makes its threads once
    (not one per step), and a process that is one rank of a communicator asks the loader
    for its own shard only."""
    from minisam.data import Loader
    from minisam.distributed import local
    made, asked = [], []
    real_init, real_shards = local.ReplicaThreads.__init__, Loader.shards

    def counting_init(self, size):
        made.append(size)
        real_init(self, size)

    def recording_shards(self, epoch, step, ranks):
        asked.append(list(ranks))
        return real_shards(self, epoch, step, ranks)
    monkeypatch.setattr(local.ReplicaThreads, "__init__", counting_init)
    monkeypatch.setattr(Loader, "shards", recording_shards)
    tr = Trainer(small(epochs=2, replicas=2), None, progress=False)
    tr.fit()
    assert made == [2] and len(asked) == 2 * tr.steps_per_epoch and asked[0] == [0, 1]
    asked.clear()
    run_replicas(2, lambda r, comm: Trainer(small(epochs=1, replicas=2), None, comm=comm,
                                            progress=False).fit())
    assert sorted(map(tuple, asked))[:2] == [(0,), (0,)] and sorted(map(tuple, asked))[-1] == (1,)
    assert all(len(a) == 1 for a in asked)


def test_cli_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    from minisam import rundir
    from minisam.cli import main
    run = str(tmp_path / "run")
    assert main(_cli("--out", run, "--max-steps", "3", "--epochs", "1")[3:]) == 0
    loads = []
    real = rundir.load_checkpoint
    monkeypatch.setattr(rundir, "load_checkpoint", lambda p: loads.append(p) or real(p))
    assert main(["train", "--resume", "--out", run, "--no-progress"]) == 0
    assert len(loads) == 1

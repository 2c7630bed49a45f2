"""Nothing lost when two runs meet, a run that died before its first checkpoint can be
resumed, and SIGINT/SIGTERM stop training at a step boundary with a checkpoint."""
import json
import os
import signal
import subprocess
import time

import pytest

from minisam import rundir
from minisam.cli import main
from minisam.rundir import RunLock, load_checkpoint, read_metrics
from minisam.train import Trainer, TrainingInterrupted

from .test_train import _cli, assert_same_run, cli_env, signal_after_first_checkpoint, small


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# --------------------------------------------------------------------- two runs, one --out
def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(_cli("--out", run, "--max-steps", "2")[3:]) == 0
    capsys.readouterr()
    before = open(os.path.join(run, "metrics.jsonl")).read(), load_checkpoint(run).meta
    holder = RunLock(run)              # another process training there (same rules)
    try:
        for argv in (_cli("--out", run)[3:], ["train", "--resume", "--out", run]):
            assert main(argv) == 2
            line = one_line(capsys)
            assert f"in use by another minisam process (pid {os.getpid()})" in line
    finally:
        holder.release()
    assert (open(os.path.join(run, "metrics.jsonl")).read(), load_checkpoint(run).meta) == before


def test_two_processes_into_one_out_the_second_refuses(tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen(_cli("--out", run, "--epochs", "50"), env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(run, "config.json")):
            time.sleep(0.05)
        second = subprocess.run(_cli("--out", run), env=cli_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the dead process's lock: the run can be resumed
    assert main(["train", "--resume", "--out", run, "--max-steps", "1", "--no-progress"]) == 0


def test_out_into_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text('{"mine": true}')   # a user's file, not a run's
    (d / "notes.txt").write_text("keep me")
    assert main(_cli("--out", str(d))[3:]) == 2
    assert "already holds a run" in one_line(capsys)
    (d / "config.json").unlink()
    assert main(_cli("--out", str(d))[3:]) == 2
    assert "not empty and holds no run (notes.txt)" in one_line(capsys)
    assert (d / "notes.txt").read_text() == "keep me"


def test_demo_replaces_only_its_own_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    user_run = str(out / "sam")
    assert main(_cli("--out", user_run, "--max-steps", "1")[3:]) == 0   # a user's run there
    capsys.readouterr()
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 2
    assert "a run the demo did not make" in one_line(capsys)
    assert load_checkpoint(user_run).meta["step"] == 1 and not (out / "sgd").exists()
    other = tmp_path / "demo2"
    assert main(["demo", "--quick", "--no-progress", "--out", str(other)]) == 0
    assert main(["demo", "--quick", "--no-progress", "--out", str(other)]) == 0   # its own
    capsys.readouterr()


# --------------------------------------------------------------------- died before a checkpoint
def test_a_run_killed_before_its_first_checkpoint_can_be_resumed(tmp_path, monkeypatch):
    cfg = small(epochs=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(cfg, a, progress=False).fit()

    class Killed(BaseException):
        pass

    def die(*args):
        raise Killed        # after the first epoch's metrics line, before its checkpoint
    monkeypatch.setattr(rundir, "save_checkpoint", die)
    with pytest.raises(Killed):
        Trainer(cfg, b, progress=False).fit()
    monkeypatch.undo()
    assert [r["epoch"] for r in read_metrics(b)] == [1] and not os.path.exists(
        os.path.join(b, "checkpoint.npz"))
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(cfg, b, progress=False)
    Trainer(None, b, resume=True, progress=False).fit()   # starts again from step 0
    assert_same_run(a, b)


# --------------------------------------------------------------------- signals
def test_a_signal_inside_a_step_is_acted_on_at_the_step_boundary(tmp_path, monkeypatch):
    cfg = small(epochs=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(cfg, a, progress=False).fit()
    real, calls = Trainer._train_step, [0]

    def signalled(self, batch, lr):
        calls[0] += 1
        if calls[0] == 30:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives in the middle of step 30
        return real(self, batch, lr)
    monkeypatch.setattr(Trainer, "_train_step", signalled)
    with pytest.raises(TrainingInterrupted, match="global step 30") as e:
        Trainer(cfg, b, progress=False).fit()
    assert e.value.signum == signal.SIGTERM
    monkeypatch.undo()
    m = load_checkpoint(b).meta
    assert (m["step"], m["epoch"], m["step_in_epoch"]) == (30, 1, 8)   # step 30 finished
    Trainer(None, b, resume=True, progress=False).fit()
    assert_same_run(a, b)


def test_a_second_signal_does_not_abort_the_final_save(tmp_path, monkeypatch):
    b = str(tmp_path / "b")
    real_save, real_step, calls = rundir.save_checkpoint, Trainer._train_step, [0]

    def step(self, batch, lr):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, batch, lr)

    def save(run_dir, ck):
        os.kill(os.getpid(), signal.SIGINT)        # impatient Ctrl-C during the save
        time.sleep(0.05)
        real_save(run_dir, ck)
    monkeypatch.setattr(Trainer, "_train_step", step)
    monkeypatch.setattr(rundir, "save_checkpoint", save)
    with pytest.raises(TrainingInterrupted):
        Trainer(small(epochs=2), b, progress=False).fit()
    monkeypatch.undo()
    assert load_checkpoint(b).meta["step"] == 5


def test_sigterm_saves_and_exits_143(tmp_path):
    b = str(tmp_path / "term")
    code, err = signal_after_first_checkpoint(_cli("--out", b, "--epochs", "50"), b,
                                              signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "checkpoint saved" in err and "--resume" in err
    step = json.load(open(os.path.join(b, "checkpoint.json")))["step"]
    assert main(["train", "--resume", "--out", b, "--max-steps", str(step + 1),
                 "--no-progress"]) == 0

"""The command line: train from a CIFAR archive and from tfds mock_data, eval, plot, demo,
presets, and user errors (one line on stderr, exit 2, never a traceback)."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from minisam.backend import gpu_available
from minisam.cli import build_parser, main
from minisam.cli_train import build_config
from minisam.rundir import load_checkpoint, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "wrn10_1", "--no-progress"]


def run_main(capsys, argv):
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit counts as a code."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write_cifar10_archive(directory, per_member=8, seed=0):
    """A cifar-10-python.tar.gz in the real format: pickled dicts with b'data' uint8
    [N, 3072] (CHW planes) and b'labels' a list, protocol 2."""
    rng = np.random.default_rng(seed)
    members = {}
    for m in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_member, 3072), dtype=np.uint8)
        members[m] = pickle.dumps({b"batch_label": m.encode(), b"data": data,
                                   b"labels": [int(v) for v in rng.integers(0, 10, per_member)],
                                   b"filenames": [b"x.png"] * per_member}, protocol=2)
    path = os.path.join(directory, "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for m, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{m}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_train_cifar10_from_local_archive_then_eval_and_plot(tmp_path, capsys):
    write_cifar10_archive(tmp_path)
    run = str(tmp_path / "run")
    code, out, err = run_main(capsys, ["train", "--dataset", "cifar10", "--data-dir",
                                       str(tmp_path), "--epochs", "2", "--batch-size", "8",
                                       "--cutout", "16", "--out", run, *TINY])
    assert code == 0, err
    assert "done: epoch 2" in out
    info = json.load(open(os.path.join(run, "config.json")))
    assert info["num_train"] == 40 and info["num_test"] == 8 and info["steps_per_epoch"] == 5
    assert info["augment"] == {"crop_pad": 4, "flip": True, "cutout": 16,
                               "cutout_per_image": False}
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    code, out, err = run_main(capsys, ["eval", run, "--data-dir", str(tmp_path)])
    assert code == 0, err
    rec = read_metrics(run)[-1]
    assert f"error {rec['test_error_rate']:.2%}" in out and "8 examples" in out
    pytest.importorskip("matplotlib")
    code, out, err = run_main(capsys, ["plot", run])
    assert code == 0, err
    assert os.path.getsize(os.path.join(run, "curves.png")) > 1000


def test_train_cifar10_through_tfds_mock_data(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    run = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=16):
        code, out, err = run_main(capsys, ["train", "--dataset", "cifar10", "--data-source",
                                           "tfds", "--epochs", "1", "--batch-size", "8",
                                           "--replicas", "2", "--out", run, *TINY])
    assert code == 0, err
    ck = load_checkpoint(run)
    assert ck.meta["step"] == 2 and ck.config.replicas == 2 and len(ck.replica_states) == 2


def test_presets_and_explicit_flags_override():
    p = build_parser()
    cfg = build_config(p.parse_args(["train", "--preset", "cifar10-wrn28_10-sam"]))
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay,
            cfg.rho, cfg.gradient_clipping) == ("cifar10", "wrn28_10", 200, 256, 0.1, 5e-4,
                                                0.05, 5.0)
    cfg = build_config(p.parse_args(["train", "--preset", "cifar100-wrn28_10-sam",
                                     "--epochs", "3", "--rho", "0.2", "--no-flip"]))
    assert (cfg.dataset, cfg.epochs, cfg.rho, cfg.flip, cfg.lr) == ("cifar100", 3, 0.2, False, 0.1)
    assert build_config(p.parse_args(["train", "--preset", "cifar100-wrn28_10-sam"])).rho == 0.1
    cfg = build_config(p.parse_args(["train", "--preset", "cifar10-wrn16_8-sam"]))
    assert (cfg.model, cfg.batch_size, cfg.label_smoothing, cfg.cutout) == ("wrn16_8", 128, 0.1, 16)
    assert build_config(p.parse_args(["train", "--dataset", "digits"])).model == "wrn10_2"
    assert build_config(p.parse_args(["train", "--dataset", "digits", "--no-crop"])).crop == 0


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "imagenet"], "invalid choice"),
    (["train"], "choose a dataset"),
    (["train", "--dataset", "digits", "--rho", "-0.1"], "rho must be >= 0"),
    (["train", "--dataset", "digits", "--batch-size", "10", "--replicas", "3"], "divisible"),
    (["train", "--dataset", "digits", "--lr", "0"], "lr must be"),
    (["train", "--dataset", "digits", "--label-noise", "2"], "label_noise"),
    (["train", "--dataset", "digits", "--epochs", "x"], "invalid int"),
    (["train", "--dataset", "digits", "--model", "resnet"], "unknown model"),
    (["train", "--dataset", "cifar10", "--data-source", "archive", "--data-dir", "/nonexistent"],
     "does not exist"),
    (["train", "--preset", "nope"], "invalid choice"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--resume", "--out", "/nonexistent"], "no checkpoint"),
    (["train", "--dataset", "digits", "--device", "gpu"], "gpu"),
    (["train", "--dataset", "digits", "--tf32"], "needs device 'gpu'"),
    (["bench", "--model", "wrn10_1", "--tf32"], "--tf32 needs --device gpu"),
    (["eval", "/nonexistent"], "no checkpoint"),
    (["plot", "/nonexistent"], "not a directory"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, needle):
    if "gpu" in argv and gpu_available():
        pytest.skip("a GPU is present: --device gpu is not a mistake here")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith("minisam")


def test_existing_run_and_changed_flags_on_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", "--dataset", "digits", "--image-size", "8", "--epochs", "1",
            "--max-steps", "3", "--out", run, *TINY]
    code, out, err = run_main(capsys, argv)
    assert code == 0 and "--resume" in out
    code, out, err = run_main(capsys, argv)
    assert code == 2 and "already holds a run" in err
    code, out, err = run_main(capsys, ["train", "--resume", "--out", run, "--lr", "0.3"])
    assert code == 2 and "lr (saved 0.1, given 0.3)" in err
    code, out, err = run_main(capsys, ["train", "--resume", "--out", run, "--no-progress"])
    assert code == 0 and "done: epoch 1" in out


def test_nan_is_one_line_and_exit_1(tmp_path, capsys):
    code, out, err = run_main(capsys, [
        "train", "--dataset", "digits", "--image-size", "8", "--epochs", "1", "--lr", "1e30",
        "--gradient-clipping", "0", "--out", str(tmp_path / "run"), *TINY])
    assert code == 1
    lines = err.strip().splitlines()
    assert "training diverged" in lines[-1] and "no checkpoint had been written" in lines[-1]
    assert "Traceback" not in err and "Warning" not in err


def test_subprocess_errors_have_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for argv in (["train", "--dataset", "digits", "--rho", "-1"], ["train", "--lr", "abc"]):
        p = subprocess.run([sys.executable, "-m", "minisam", *argv], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
        assert p.returncode == 2 and p.stdout == ""
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "minisam", "train", "--help"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0
    for flag in ("--dataset", "--data-dir", "--preset", "--rho", "--epochs", "--batch-size",
                 "--lr", "--weight-decay", "--label-smoothing", "--gradient-clipping", "--crop",
                 "--no-crop", "--flip", "--cutout", "--label-noise", "--seed", "--device",
                 "--replicas", "--sync-perturbations", "--out", "--resume", "--image-size",
                 "--validation", "--max-steps"):
        assert flag in p.stdout


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_dir = str(tmp_path / "demo")
    code, out, err = run_main(capsys, ["demo", "--quick", "--out", out_dir, "--no-progress"])
    assert code == 0, err
    for row in ("train accuracy, noisy labels", "test accuracy", "top Hessian eigenvalue",
                "m-sharpness"):
        assert row in out
    assert os.path.getsize(os.path.join(out_dir, "sgd_vs_sam.png")) > 1000
    res = json.load(open(os.path.join(out_dir, "results.json")))["results"]
    assert set(res) == {"sgd", "sam"} and np.isfinite(res["sam"]["hessian_top"])
    assert all(0 <= r[k] <= 1 for r in res.values() for k in ("train_acc_noisy", "test_acc"))
    assert "--fair-sgd adds SGD at twice the epochs" in out
    # a second demo replaces its own previous runs; --fair-sgd adds SGD at twice the epochs
    code, out, err = run_main(capsys, ["demo", "--quick", "--fair-sgd", "--out", out_dir,
                                       "--no-progress"])
    assert code == 0, err
    rec = json.load(open(os.path.join(out_dir, "results.json")))
    assert set(rec["results"]) == {"sgd", "sam", "sgd2x"}
    cfg = rec["config"]
    assert cfg["sgd2x"]["rho"] == 0 and cfg["sgd2x"]["epochs"] == 2 * cfg["sgd"]["epochs"]
    better = "SGD, 2x epochs" if (rec["results"]["sgd2x"]["test_acc"]
                                  > rec["results"]["sgd"]["test_acc"]) else "SGD"
    assert f"the better SGD baseline on the test set: {better} " in out


def test_eval_command_and_trainer_share_one_evaluation(tmp_path, capsys):
    """`minisam eval` prints what the Trainer's evaluation gives for the same checkpoint."""
    from minisam.rundir import load_checkpoint as load
    from minisam.train import Trainer
    run = str(tmp_path / "run")
    code, out, err = run_main(capsys, ["train", "--dataset", "digits", "--image-size", "8",
                                       "--epochs", "1", "--replicas", "2", "--out", run, *TINY])
    assert code == 0, err
    tr = Trainer(None, run, resume=True, progress=False)
    want = tr.evaluate()
    assert want["error_rate"] == pytest.approx(load(run).meta["last_record"]["test_error_rate"])
    for bs in ("7", "500"):
        code, out, err = run_main(capsys, ["eval", run, "--batch-size", bs])
        assert code == 0, err
        assert f"loss {want['loss']:.4f}, error {want['error_rate']:.2%}" in out


def test_every_command_has_help_that_exits_0(capsys):
    for cmd in ("demo", "train", "eval", "plot", "verify", "bench"):
        code, out, _ = run_main(capsys, [cmd, "--help"])
        assert code == 0 and "usage: minisam " + cmd in out
        assert "%%" not in out, cmd

"""What a new user meets: the Python API checks what the CLI checks, NaN in evaluation,
strict JSON metrics, advice that can be followed, --version, quoted hints, log files."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from minisam import __version__, rundir
from minisam.cli import main
from minisam.config import TrainConfig
from minisam.data import Augment, Dataset
from minisam.train import NonFiniteLossError, Trainer

from .test_train import _cli, cli_env, small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_python_api_checks_what_the_cli_checks():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(TypeError, match="integer class indices"):
        Dataset(x, np.array([0.0, 1.5, 2.0, 3.0]), 10, "toy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        Dataset(x, np.array([0, 1, 2, 10]), 10, "toy")
    for bad in (dict(flip="no"), dict(validation="yes"), dict(sync_perturbations="no")):
        with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
            small(**bad)
    with pytest.raises(TypeError, match="Augment.flip must be True or False"):
        Augment(flip="no")
    with pytest.raises(ValueError, match="Augment.crop_pad"):
        Augment(crop_pad=-1)
    with pytest.raises(ValueError, match="lr must be"):
        small(lr="0.1")


def test_nan_in_evaluation_stops_before_logging_and_keeps_the_last_good_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    tr = Trainer(small(epochs=3), d, progress=False)
    real, calls = tr.evaluate, [0]

    def evaluate(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        return dict(out, loss=float("nan")) if calls[0] == 2 else out
    tr.evaluate = evaluate
    with pytest.raises(NonFiniteLossError, match=r"non-finite test loss nan.*after epoch 2.*"
                                                 r"last good checkpoint.*start a new run"):
        tr.fit()
    assert [r["epoch"] for r in rundir.read_metrics(d)] == [1]
    assert rundir.load_checkpoint(d).meta["epoch"] == 1
    with pytest.raises(ValueError):
        rundir.append_metrics(d, {"epoch": 2, "test_loss": float("nan")})   # strict JSON
    assert "NaN" not in open(os.path.join(d, "metrics.jsonl")).read()


def test_version_and_a_quoted_resume_hint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minisam {__version__}"
    out = str(tmp_path / "my run")
    assert main(_cli("--out", out, "--max-steps", "2")[3:]) == 0
    assert f"--resume --out '{out}'" in capsys.readouterr().out


def test_a_log_file_gets_one_line_per_epoch_and_no_progress_frames(tmp_path):
    log = tmp_path / "train.log"
    argv = [a for a in _cli("--out", str(tmp_path / "run"), "--epochs", "2") if a != "--no-progress"]
    with open(log, "w") as f:
        assert subprocess.run(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=f,
                              timeout=300).returncode == 0
    text = log.read_text()
    assert "\r" not in text
    assert re.findall(r"^epoch (\d)/2: train loss", text, re.M) == ["1", "2"]


def test_make_demo_installs_only_what_the_demo_needs():
    make = open(os.path.join(ROOT, "Makefile")).read()
    demo_stamp = re.search(r"^demo: (\S+)", make, re.M).group(1)
    rule = make[make.index(f"{demo_stamp}:"):]
    rule = rule[:rule.index("\n\n")]
    installs = re.findall(r"pip install .*-e '\.\[([^\]]*)\]'", rule)
    assert installs and not {"data", "dev"} & set(installs[0].split(","))
    assert re.search(r"^test: \$\(VENV\)/\.installed", make, re.M)
    assert "'.[dev,data]'" in make


def test_the_final_progress_frame_shows_the_final_test_error(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    rec = Trainer(small(epochs=1), None, progress=True).fit()
    last = term.getvalue().split("\r")[-1]
    assert f"test_err={rec['test_error_rate']:.3f}" in last, last

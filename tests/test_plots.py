"""Figures are written as PNG files; a missing matplotlib is one clear error."""
import builtins
import json
import os

import numpy as np
import pytest

from minisam import plots


def fake_run(directory, rho, epochs=4):
    os.makedirs(directory)
    cfg = {"rho": rho, "model": "wrn10_2", "dataset": "digits", "label_noise": 0.3,
           "validation": False}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"config": cfg}, f)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "train_loss": 2 / e,
                                "train_error_rate": 0.5 / e, "test_loss": 2.2 / e,
                                "test_error_rate": 0.6 / e}) + "\n")
        f.write('{"epoch": 5, "torn')   # a crash mid-line is skipped
    return str(directory)


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_curves_and_comparison(tmp_path, mpl):
    a, b = fake_run(tmp_path / "sgd", 0.0), fake_run(tmp_path / "sam", 0.1)
    assert is_png(plots.plot_training_curves(a)) and os.path.exists(os.path.join(a, "curves.png"))
    s = {"alphas": np.linspace(-1, 1, 5), "loss": np.array([3, 1, 0.5, 1, 3.0]),
         "error_rate": np.zeros(5)}
    out = plots.plot_comparison({"SGD": a, "SAM": b}, str(tmp_path / "cmp.png"),
                                landscape={"SGD": s, "SAM": s}, title="t")
    assert is_png(out)
    assert is_png(plots.plot_comparison([a, b], str(tmp_path / "sub" / "cmp2.png")))


def test_landscape_plots(tmp_path, mpl):
    s = {"alphas": np.linspace(-1, 1, 5), "loss": np.array([3, 1, 0.5, 1, 3.0]),
         "error_rate": np.array([0.5, 0.2, 0.1, 0.2, 0.5])}
    assert is_png(plots.plot_landscape_1d({"a": s}, str(tmp_path / "l1.png")))
    al, be = np.linspace(-1, 1, 7), np.linspace(-1, 1, 5)
    surf = {"alphas": al, "betas": be, "loss": be[:, None] ** 2 + al[None, :] ** 2}
    assert is_png(plots.plot_landscape_2d(surf, str(tmp_path / "l2.png")))


def test_empty_run_is_a_clear_error(tmp_path, mpl):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no completed epoch"):
        plots.plot_training_curves(str(d))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_training_curves(str(tmp_path))


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    a = fake_run(tmp_path / "run", 0.1)
    with pytest.raises(ImportError, match=r"minisam\[plots\]"):
        plots.plot_training_curves(a)
    from minisam.cli import main
    assert main(["plot", a]) == 2

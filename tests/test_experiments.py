"""``minisam experiment``: each runs in its quick setting, writes its JSON and PNG, and the
numbers in the JSON are the measurements (checked against the library directly)."""
import json
import os

import numpy as np
import pytest

from minisam.cli import main


def test_hessian_quick_writes_its_figure_and_every_number(tmp_path, capsys):
    out = str(tmp_path / "h")
    assert main(["experiment", "hessian", "--quick", "--out", out, "--no-progress"]) == 0
    assert "hessian:" in capsys.readouterr().out
    with open(os.path.join(out, "hessian.json")) as f:
        rec = json.load(f)
    assert os.path.getsize(os.path.join(out, "hessian.png")) > 10_000
    assert set(rec["runs"]) == {"SGD", "SAM"} and rec["batch_norm"] is False
    for run in rec["runs"].values():
        assert [r["epoch"] for r in run["epochs"]] == [1, 2]
        for r in run["epochs"]:
            lam = r["eigenvalues"]
            assert len(lam) == 5 and lam == sorted(lam, reverse=True) and lam[0] > 0
            if lam[4] > 0:      # early in training the 5th may be negative: no ratio then
                assert r["lambda_max_over_lambda_5"] == pytest.approx(lam[0] / lam[4])
            else:
                assert np.isnan(r["lambda_max_over_lambda_5"])
    assert rec["runs"]["SAM"]["rho"] == 0.05 and rec["runs"]["SGD"]["rho"] == 0.0
    assert "about 24" in rec["paper"]
    assert rec["fair_sgd"] is False


def test_hessian_fair_sgd_adds_sgd_at_twice_the_epochs(tmp_path):
    out = str(tmp_path / "h")
    assert main(["experiment", "hessian", "--quick", "--fair-sgd", "--epochs", "1", "--out", out,
                 "--no-progress"]) == 0
    with open(os.path.join(out, "hessian.json")) as f:
        rec = json.load(f)
    assert rec["fair_sgd"] is True
    assert set(rec["runs"]) == {"SGD", "SGD, 2x epochs", "SAM"}
    assert [r["epoch"] for r in rec["runs"]["SGD, 2x epochs"]["epochs"]] == [1, 2]
    assert [r["epoch"] for r in rec["runs"]["SGD"]["epochs"]] == [1]


def test_hessian_measure_is_lanczos_on_the_masked_hvp(tmp_path):
    """The experiment's numbers are sharpness.lanczos of BatchLoss.hvp at the trained weights."""
    from minisam.config import TrainConfig
    from minisam.experiments.hessian import measure
    from minisam.sharpness import BatchLoss, lanczos
    from minisam.train import Trainer
    cfg = TrainConfig(dataset="digits", image_size=8, model="wrn10_1", epochs=1, batch_size=64,
                      batch_norm=False)
    t = Trainer(cfg, None, progress=False)
    t.fit()
    got = measure(t, examples=16, iters=6)
    params = {k: np.asarray(v, np.float64) for k, v in t.params.items()}
    f = BatchLoss(t.models[0], {}, t.train_data.images[:16], t.train_data.labels[:16],
                  dtype=np.float64)
    want = lanczos(None, params, k=5, iters=6, hvp=f.hvp(params))
    np.testing.assert_allclose(got["eigenvalues"], want.values, rtol=1e-10)


def test_bad_experiment_arguments_are_one_line(capsys):
    assert main(["experiment", "hessian", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert main(["experiment", "hessian", "--rho", "0"]) == 2
    assert "--rho must be > 0" in capsys.readouterr().err
    assert main(["experiment", "label-noise", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "noise"])
    assert "invalid choice" in capsys.readouterr().err


def test_m_sharpness_quick_writes_its_figure_and_every_number(tmp_path):
    from minisam.experiments.msharpness import QUICK
    out = str(tmp_path / "m")
    assert main(["experiment", "m-sharpness", "--quick", "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "m-sharpness.json")) as f:
        rec = json.load(f)
    assert os.path.getsize(os.path.join(out, "m-sharpness.png")) > 10_000
    # one SGD model (rho 0 does not depend on m) and one per (m, rho > 0)
    assert len(rec["models"]) == 1 + len(QUICK["ms"]) * (len(QUICK["rhos"]) - 1)
    keys = {f"m={m},steps={k}" for m in QUICK["ms"] for k in (1, QUICK["ascent_steps"])}
    assert set(rec["spearman_vs_gap"]) == keys
    for r in rec["models"]:
        assert r["gap"] == pytest.approx(r["test_error_rate"] - r["train_error_rate"])
        for m in QUICK["ms"]:   # projected ascent never finds less than the first step
            assert r["m_sharpness"][f"m={m},steps={QUICK['ascent_steps']}"] >= \
                r["m_sharpness"][f"m={m},steps=1"] - 1e-12


def test_spearman_rank_correlation():
    from minisam.experiments.msharpness import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)   # ranks only
    # ties get their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3) -> r = sqrt(3)/2
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)


def test_label_noise_quick_writes_its_figure_its_table_and_every_number(tmp_path, capsys):
    from minisam.experiments.labelnoise import METHODS, PAPER_TABLE4
    out = str(tmp_path / "ln")
    assert main(["experiment", "label-noise", "--quick", "--fair-sgd", "--out", out,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "label-noise.json")) as f:
        rec = json.load(f)
    assert os.path.getsize(os.path.join(out, "label-noise.png")) > 10_000
    assert rec["table"] in printed and "paper (CIFAR-10)" in printed
    (row,) = rec["rows"]
    assert row["rate"] == 0.4 and set(METHODS) <= set(row)
    assert abs(row["wrong_labels"] - 0.9 * 0.4) < 0.05   # a label lands on its class 1 in 10
    # the paper's numbers are printed beside ours, labelled as the paper's
    assert "68.8" in printed and "94.2" in printed and PAPER_TABLE4["SAM"][1] == 93.4
    # fair SGD: the 1x and 2x budgets, and the reported one ends best on validation
    runs = row["sgd_runs"]
    assert [r["epochs"] for r in runs] == [2, 4] and [len(r["val_acc"]) for r in runs] == [2, 4]
    finals = [r["val_acc"][-1] for r in runs]
    chosen = runs[finals.index(max(finals))]
    assert row["SGD"] == {"test_acc": chosen["test_acc"][-1], "epochs": chosen["epochs"]}
    # early stopping: the test accuracy at the epoch of best validation accuracy
    es = row["SGD, early stopped"]
    stopped = next(r for r in runs if r["epochs"] == es["of_epochs"])
    assert stopped["val_acc"][es["epoch"] - 1] == max(max(r["val_acc"]) for r in runs)
    assert es["test_acc"] == stopped["test_acc"][es["epoch"] - 1]
    assert row["SAM"]["rho"] == row["Bootstrap + SAM"]["rho"] == 0.1
    assert row["SAM"]["test_acc"] == row["sam_by_rho"]["0.1"]["test_acc"]
    assert 0 < row["Bootstrap + SAM"]["relabelled_correct"] <= 1
    assert rec["fair_sgd"] is True and "1x and 2x" in rec["sgd_baseline"]


def test_label_noise_choices_early_stopping_and_predictions():
    """The selection rules on known curves, and predict() agrees with the evaluation."""
    from minisam.config import TrainConfig
    from minisam.experiments.labelnoise import best_final, early_stopped, predict
    from minisam.train import Trainer
    curves = [[0.5, 0.8, 0.7], [0.6, 0.8, 0.9, 0.75]]
    assert best_final(curves) == 1                 # finals 0.7 and 0.75
    assert best_final([[0.1, 0.9], [0.9], [0.2, 0.9]]) == 0     # ties: the first
    assert early_stopped(curves) == (1, 3)         # 0.9 at epoch 3 of the second run
    assert early_stopped([[0.2, 0.8, 0.8], [0.8]]) == (0, 2)    # ties: the earliest
    t = Trainer(TrainConfig(dataset="digits", image_size=8, model="wrn10_1", epochs=1,
                            batch_size=64), None, progress=False)
    t.fit()
    pred = predict(t, t.test_data)
    assert pred.shape == (len(t.test_data),) and pred.dtype == np.int32
    assert np.mean(pred != t.test_data.labels) == pytest.approx(t.evaluate()["error_rate"])


@pytest.mark.gpu
def test_experiments_run_on_the_gpu_path_and_agree_with_the_cpu(tmp_path):
    """``--device gpu`` trains on CuPy arrays (the strict stand-in in ``make test``); the
    records match the CPU's (exactly under the stand-in, to float32 sums on a GPU)."""
    from minisam.backend import gpu_available
    if not gpu_available():
        pytest.skip("needs CuPy and a GPU")
    cp = pytest.importorskip("cupy")
    exact = hasattr(cp, "standin")
    recs = {}
    for device in ("cpu", "gpu"):
        for name in ("label-noise", "hessian"):
            out = str(tmp_path / device / name)
            assert main(["experiment", name, "--quick", "--epochs", "1", "--device", device,
                         "--out", out, "--no-progress"]) == 0
            with open(os.path.join(out, f"{name}.json")) as f:
                recs[device, name] = json.load(f)
    assert recs["gpu", "label-noise"]["device"] == "gpu"
    cmp = (lambda a, b: a == b) if exact else (lambda a, b: a == pytest.approx(b, abs=0.02))
    for m in ("SGD", "SAM", "Bootstrap + SAM"):
        a, b = (recs[d, "label-noise"]["rows"][0][m]["test_acc"] for d in ("gpu", "cpu"))
        assert cmp(a, b), (m, a, b)
    a, b = (recs[d, "hessian"]["runs"]["SAM"]["epochs"][-1]["eigenvalues"] for d in ("gpu", "cpu"))
    assert a == (b if exact else pytest.approx(b, rel=0.05))


def test_experiments_take_cifar_with_a_flag(tmp_path, capsys):
    """``--dataset cifar10 --data-dir DIR``: the same experiments at 32x32 from a (fake)
    archive in the real format, with --model and --batch-size overriding the setting."""
    from .test_cli import write_cifar10_archive
    write_cifar10_archive(str(tmp_path), per_member=16)   # 80 training, 16 test images
    for name in ("hessian", "m-sharpness", "label-noise"):
        out = str(tmp_path / name)
        assert main(["experiment", name, "--quick", "--epochs", "1", "--dataset", "cifar10",
                     "--data-dir", str(tmp_path), "--model", "wrn10_1", "--batch-size", "32",
                     "--out", out, "--no-progress"]) == 0, capsys.readouterr().err
        with open(os.path.join(out, f"{name}.json")) as f:
            rec = json.load(f)
        st = rec["settings"]
        assert (st["dataset"], st["image_size"], st["model"], st["batch_size"], st["epochs"]) \
            == ("cifar10", None, "wrn10_1", 32, 1)
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 10_000
    assert rec["num_train"] + rec["num_validation"] == 80 and rec["num_test"] == 16
    assert "minisam, CIFAR-10" in rec["table"]
    assert main(["experiment", "hessian", "--data-dir", str(tmp_path)]) == 2
    assert "--data-dir is for CIFAR" in capsys.readouterr().err
    assert main(["experiment", "hessian", "--dataset", "cifar10", "--data-dir",
                 str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err

"""``minisam demo``: SGD and SAM side by side on handwritten digits with noisy labels.

Offline and small enough for a laptop CPU (a couple of minutes): the embedded UCI digits
(1440 training images at their native 8x8, 357 test images), 30% of the training labels
replaced by random classes (``Dataset.with_label_noise``: the SAM paper's sec. 3.3 setting,
in miniature), and the same WideResnet (WRN-10-2) trained twice with the same seed, data
order and augmentation: once with SGD (rho = 0), once with SAM at rho = 0.1 (the paper's
label-noise rho). Then, for each solution:

* accuracy on the noisy training labels (how much noise it memorised), on the true
  training labels, and on the clean test set;
* train and test loss (eval mode);
* the top Hessian eigenvalue of the training loss (``sharpness.top_hessian_eigenvalue``)
  and the m-sharpness (``sharpness.m_sharpness``);
* a 1-D loss slice along a filter-normalised random direction (Li et al. 2018).

It prints a table, writes ``sgd_vs_sam.png`` (curves and slices) and ``results.json`` in
the output directory, which holds the two run directories ``sgd/`` and ``sam/``. With
``fair_sgd`` a third run, ``sgd2x/``, trains SGD for twice the epochs: the paper's fair
baseline (sec. 3.1), since a SAM step costs two gradient evaluations and an SGD step one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict

import numpy as np

from .sharpness import (
    BatchLoss,
    filter_normalized_direction,
    loss_slice_1d,
    m_sharpness,
    top_hessian_eigenvalue,
)
from .config import TrainConfig
from .rundir import CONFIG_FILE, RunLock
from .train import Trainer

FULL = dict(dataset="digits", image_size=8, model="wrn10_2", epochs=40, batch_size=64, lr=0.1,
            weight_decay=5e-4, label_noise=0.3, seed=0)
SAM_RHO = 0.1
# what the sharpness measures look at: the first N (noisy-label) training images
FULL_MEASURE = dict(examples=256, hessian_iters=20, slice_points=21)
QUICK = dict(FULL, model="wrn10_1", epochs=2)
QUICK_MEASURE = dict(examples=128, hessian_iters=3, slice_points=5)


DEMO_MARK = ".made-by-minisam-demo"   # in each run directory the demo made


def _check_replaceable(path: str):
    """The demo may reuse ``path`` if it is absent or empty, or a run the demo made itself;
    never a user's run or anything else."""
    if os.path.isdir(path) and os.listdir(path) and \
            not os.path.isfile(os.path.join(path, DEMO_MARK)):
        what = "a run the demo did not make" if os.path.isfile(
            os.path.join(path, CONFIG_FILE)) else "files the demo did not make"
        raise ValueError(f"{path!r} holds {what}; the demo replaces only its own earlier "
                         "runs: choose another --out")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file; choose another --out for the demo")


def _replace(path: str):
    """Delete the demo's own earlier run in ``path`` (not while a process trains in it)."""
    if os.path.isdir(path) and os.listdir(path):
        lock = RunLock(path)
        shutil.rmtree(path)
        lock.release()


def measure(trainer: Trainer, examples: int, hessian_iters: int, slice_points: int,
            seed: int = 0) -> dict:
    """Accuracies, losses and sharpness of a trained Trainer's solution."""
    tr = trainer
    noisy, clean, test = tr.evaluate(tr.train_data), tr.evaluate(tr.clean_train), tr.evaluate()
    model, state, params = tr.models[0], tr.eval_state(), tr.params
    x, y = tr.train_data.images[:examples], tr.train_data.labels[:examples]
    bs = min(tr.cfg.batch_size, examples)
    f = BatchLoss(model, state, x, y, batch_size=bs)
    t = time.time()
    eig = top_hessian_eigenvalue(f.grad, params, iters=hessian_iters, tol=1e-3, seed=seed)
    t_eig = time.time() - t
    ms = m_sharpness(model, params, state, x, y, m=min(32, examples), rho=0.05)
    direction = filter_normalized_direction(params, seed)
    sl = loss_slice_1d(f, params, direction, np.linspace(-1.0, 1.0, slice_points))
    return {"train_acc_noisy": 1 - noisy["error_rate"], "train_acc_clean": 1 - clean["error_rate"],
            "test_acc": 1 - test["error_rate"], "train_loss": noisy["loss"],
            "test_loss": test["loss"], "hessian_top": eig.value,
            "hessian_iterations": eig.iterations, "hessian_converged": eig.converged,
            "hessian_time_s": t_eig, "m_sharpness": ms["loss"], "slice": sl}


def format_table(res: dict, labels: dict) -> str:
    rows = [("train accuracy, noisy labels", "train_acc_noisy", "{:.1%}"),
            ("train accuracy, true labels", "train_acc_clean", "{:.1%}"),
            ("test accuracy", "test_acc", "{:.1%}"),
            ("train loss (noisy labels)", "train_loss", "{:.3f}"),
            ("test loss", "test_loss", "{:.3f}"),
            ("top Hessian eigenvalue", "hessian_top", "{:.2f}"),
            ("m-sharpness (m=32, rho=0.05)", "m_sharpness", "{:.4f}"),
            ("training time", "train_time_s", "{:.0f} s")]
    names = list(labels)
    w0, w = 30, max(14, *(len(labels[n]) + 2 for n in names))
    lines = [" " * w0 + "".join(f"{labels[n]:>{w}}" for n in names)]
    lines.append("-" * (w0 + w * len(names)))
    for title, key, fmt in rows:
        lines.append(f"{title:<{w0}}" + "".join(f"{fmt.format(res[n][key]):>{w}}" for n in names))
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", quick: bool = False, epochs: int | None = None,
             label_noise: float | None = None, rho: float = SAM_RHO, seed: int = 0,
             fair_sgd: bool = False, progress: bool = True, echo=print) -> dict:
    """Train SGD and SAM, measure both, print the table, write the figure; return results."""
    base, meas = (QUICK, QUICK_MEASURE) if quick else (FULL, FULL_MEASURE)
    base = dict(base, seed=seed)
    if epochs is not None:
        base["epochs"] = epochs
    if label_noise is not None:
        base["label_noise"] = label_noise
    if not rho > 0:
        raise ValueError(f"the demo compares SGD with SAM, so rho must be > 0, got {rho}")
    runs = {"sgd": TrainConfig(rho=0.0, **base), "sam": TrainConfig(rho=rho, **base)}
    labels = {"sgd": "SGD", "sam": f"SAM rho={rho:g}"}
    if fair_sgd:
        runs["sgd2x"] = TrainConfig(rho=0.0, **dict(base, epochs=2 * base["epochs"]))
        labels["sgd2x"] = "SGD, 2x epochs"
    for name in runs:                 # check both before deleting either
        _check_replaceable(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    for name in runs:
        _replace(os.path.join(out, name))
    c = runs["sgd"]
    echo(f"minisam demo: {c.model} on digits ({c.image_size}x{c.image_size}), "
         f"{c.label_noise:.0%} of the training labels replaced at random, {c.epochs} epochs, "
         f"batch {c.batch_size}, lr {c.lr} (cosine), weight decay {c.weight_decay}; "
         f"SGD vs SAM (rho={rho:g}), same seed, same data order. "
         + ("SGD also trains for twice the epochs, the paper's fair baseline (sec. 3.1)."
            if fair_sgd else "SGD trains as many epochs as SAM, so half its gradient "
            "evaluations (--fair-sgd adds SGD at twice the epochs)."))
    results = {}
    for name, cfg in runs.items():
        echo(f"\n[{labels[name]}] training -> {os.path.join(out, name)}")
        t = time.time()
        trainer = Trainer(cfg, os.path.join(out, name), progress=progress)
        open(os.path.join(out, name, DEMO_MARK), "w").close()
        trainer.fit()
        train_time = time.time() - t
        echo(f"[{labels[name]}] measuring: accuracies, top Hessian eigenvalue (power iteration, "
             f"{meas['hessian_iters']} iterations max), m-sharpness, loss slice")
        results[name] = dict(measure(trainer, seed=seed, **meas), train_time_s=train_time)
    echo("\n" + format_table(results, labels))
    if fair_sgd:
        better = max(("sgd", "sgd2x"), key=lambda n: results[n]["test_acc"])
        echo(f"the better SGD baseline on the test set: {labels[better]} (the paper reports "
             "the better of the two budgets)")
    figure = None
    try:
        from .plots import plot_comparison
        figure = plot_comparison(
            {labels[n]: os.path.join(out, n) for n in runs}, os.path.join(out, "sgd_vs_sam.png"),
            landscape={labels[n]: results[n]["slice"] for n in runs},
            title=f"digits {c.image_size}x{c.image_size}, {c.label_noise:.0%} label noise, "
                  f"{c.model}: SGD vs SAM")
        echo(f"\nfigure: {figure}")
    except ImportError as e:
        echo(f"\nno figure: {e}")
    summary = {n: {k: (v if k != "slice" else {kk: np.asarray(vv).tolist() for kk, vv in v.items()})
                   for k, v in r.items()} for n, r in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": {n: asdict(c) for n, c in runs.items()}, "results": summary,
                   "figure": figure}, f, indent=2)
    return {"results": results, "figure": figure, "table": format_table(results, labels)}

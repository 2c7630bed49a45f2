"""Robustness to label noise (the SAM paper, sec. 3.3, Table 4), in miniature.

The paper trains a ResNet-32 on CIFAR-10 for 200 epochs with a fraction of the training
labels replaced at random (symmetric noise, 20% to 80%) and reports the accuracy on the
clean test set: SGD collapses as the noise grows, SAM stays within a few points of the
methods built for noisy labels, and *bootstrapped* SAM (train, relabel the training set
with the model's own predictions, train again from scratch on those labels) does a little
better still. Here, per noise rate, on the embedded digits:

* the training images lose a clean validation split (the last 10%, ``validation_split``),
  and the rest get symmetric noise (``Dataset.with_label_noise``, seeded);
* **SGD**, evaluated after every epoch on the clean validation split and on the test set:
  the row "SGD" is the last epoch (what the paper reports), the row "SGD, early stopped"
  the epoch of best validation accuracy, the standard defence against memorisation;
* **SAM** for every rho of a grid; the row "SAM" is the rho of best final validation
  accuracy (the paper tuned rho too: 0.1, and 0.05 at 80% noise);
* **Bootstrap + SAM**: that SAM model's predictions on the training images become their
  labels, and a fresh SAM model (same rho, same initialisation) trains on them.

No data augmentation (``crop=0``): augmentation is itself a defence against memorising
wrong labels, and this small network memorises them within the budget without it.
With ``fair_sgd`` SGD also runs for twice the epochs and the better run on the validation
split is reported (the paper's fair baseline, sec. 3.1: a SAM step costs two gradients).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from ..backend import to_numpy
from ..config import TrainConfig
from ..data import Loader, load_dataset
from ..sam import eval_step
from ..train import Trainer
from .common import data_label, save, settings, sgd_epochs, train_config

FULL = dict(rates=(0.2, 0.4, 0.6, 0.8), rhos=(0.05, 0.1, 0.2), epochs=20, batch_size=64,
            image_size=8, model="wrn10_1", lr=0.1)
QUICK = dict(rates=(0.4,), rhos=(0.1,), epochs=2, batch_size=64, image_size=8,
             model="wrn10_1", lr=0.1)
METHODS = ("SGD", "SGD, early stopped", "SAM", "Bootstrap + SAM")

# The paper's Table 4 (Foret et al. 2021), its own runs: clean test accuracy (%) of a
# ResNet-32 trained 200 epochs on CIFAR-10 with symmetric label noise.
PAPER_TABLE4 = {"rates": (0.2, 0.4, 0.6, 0.8),
                "SGD": (84.8, 68.8, 48.2, 26.2),
                "SAM": (95.1, 93.4, 90.5, 77.9),
                "Bootstrap + SAM": (95.4, 94.2, 91.8, 79.9)}
PAPER_NOTE = ("Foret et al. 2021, Table 4: ResNet-32 on CIFAR-10, 200 epochs, clean test "
              "accuracy; rho = 0.1 at every noise rate except 0.05 at 80%")


def predict(trainer: Trainer, dataset) -> np.ndarray:
    """The trained network's class for every image of ``dataset`` (BN in eval mode)."""
    loader = Loader(dataset, 256, train=False, device=trainer.cfg.device)
    state, out = trainer.eval_state(), []
    for step in range(loader.steps_per_epoch):
        x, y = loader.batch(0, step)
        logits, _ = eval_step(trainer.models[0], trainer.params, state, x, y)
        out.append(to_numpy(logits).argmax(-1))
    return np.concatenate(out).astype(np.int32)


def best_final(val_curves) -> int:
    """Which run ends with the best validation accuracy (ties: the first, e.g. the smaller
    rho of an ascending grid, or SGD's shorter budget)."""
    finals = [curve[-1] for curve in val_curves]
    return finals.index(max(finals))


def early_stopped(val_curves) -> tuple:
    """(run, epoch counted from 1) of the best validation accuracy over every epoch of
    every run: early stopping on the clean validation split (ties: the earliest)."""
    best = max(max(curve) for curve in val_curves)
    return next((i, e + 1) for i, curve in enumerate(val_curves)
                for e, v in enumerate(curve) if v == best)


def train(cfg: TrainConfig, train_set, val, test, per_epoch: bool = False) -> dict:
    """Train; the clean validation and test accuracy at the end (and after every epoch)."""
    t = Trainer(cfg, None, progress=False, data=(train_set, val))
    val_acc, test_acc = [], []
    for epoch in (range(1, cfg.epochs + 1) if per_epoch else [cfg.epochs]):
        t.max_steps = epoch * t.steps_per_epoch
        rec = t.fit()
        val_acc.append(1 - rec["test_error_rate"])       # the trainer's "test" set is val
        test_acc.append(1 - t.evaluate(test)["error_rate"])
    t.close()
    return {"trainer": t, "val_acc": val_acc, "test_acc": test_acc}


def run(out_dir: str, *, quick: bool = False, epochs: int | None = None, device: str = "cpu",
        seed: int = 0, fair_sgd: bool = False, progress: bool = True, dataset="digits",
        data_dir=None, model=None, batch_size=None, **_ignored) -> dict:
    """Train every method at every noise rate, write label-noise.json and label-noise.png."""
    s = settings(FULL, QUICK, quick=quick, epochs=epochs, dataset=dataset, data_dir=data_dir,
                 model=model, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    where = dict(data_dir=s["data_dir"], image_size=s["image_size"])
    clean, val = load_dataset(s["dataset"], validation=True, **where)
    _, test = load_dataset(s["dataset"], **where)
    base = train_config(s, lr=s["lr"], epochs=s["epochs"], crop=0, seed=seed, device=device)
    rows = []
    for rate in s["rates"]:
        noisy = clean.with_label_noise(rate, seed=seed)   # what the Trainer draws too
        row = {"rate": rate, "wrong_labels": float(np.mean(noisy.labels != clean.labels))}
        sgd = [train(TrainConfig(**dict(base, epochs=e), rho=0.0, label_noise=rate), clean,
                     val, test, per_epoch=True) for e in sgd_epochs(s["epochs"], fair_sgd)]
        best = sgd[best_final([r["val_acc"] for r in sgd])]
        i, epoch = early_stopped([r["val_acc"] for r in sgd])
        row["sgd_runs"] = [{"epochs": len(r["val_acc"]), "val_acc": r["val_acc"],
                            "test_acc": r["test_acc"]} for r in sgd]
        row["SGD"] = {"test_acc": best["test_acc"][-1], "epochs": len(best["val_acc"])}
        row["SGD, early stopped"] = {"test_acc": sgd[i]["test_acc"][epoch - 1],
                                     "epoch": epoch, "of_epochs": len(sgd[i]["val_acc"])}
        sam = {rho: train(TrainConfig(**base, rho=rho, label_noise=rate), clean, val, test)
               for rho in s["rhos"]}
        rho = s["rhos"][best_final([sam[r]["val_acc"] for r in s["rhos"]])]
        row["sam_by_rho"] = {str(r): {"val_acc": v["val_acc"][-1], "test_acc": v["test_acc"][-1]}
                             for r, v in sam.items()}
        row["SAM"] = {"test_acc": sam[rho]["test_acc"][-1], "rho": rho}
        relabelled = replace(noisy, labels=predict(sam[rho]["trainer"], noisy))
        boot = train(TrainConfig(**base, rho=rho), relabelled, val, test)
        row["Bootstrap + SAM"] = {"test_acc": boot["test_acc"][-1], "rho": rho,
                                  "relabelled_correct": float(np.mean(relabelled.labels
                                                                      == clean.labels))}
        rows.append(row)
        if progress:
            print(f"  noise {rate:.0%}: " + ", ".join(
                f"{m} {row[m]['test_acc']:.1%}" for m in METHODS)
                + f" (rho {rho:g}; {time.time() - t0:.0f} s so far)", flush=True)
    record = {"experiment": "label-noise", "quick": quick, "settings": s, "seed": seed,
              "device": device, "fair_sgd": fair_sgd, "methods": list(METHODS), "rows": rows,
              "sgd_baseline": ("the better on validation of SGD at 1x and 2x the epochs"
                               if fair_sgd else "SGD for the same epochs as SAM"),
              "num_train": len(clean), "num_validation": len(val), "num_test": len(test),
              "paper": dict(PAPER_TABLE4, note=PAPER_NOTE), "seconds": round(time.time() - t0, 1)}
    record["table"] = table(record)
    from ..plots import plot_label_noise
    return save(out_dir, record, plot_label_noise)


def table(record: dict) -> str:
    """The miniature's test accuracies beside the paper's Table 4, as text."""
    paper = dict(zip(PAPER_TABLE4["rates"], range(len(PAPER_TABLE4["rates"]))))
    ours = f"minisam, {data_label(record['settings'])}"
    lines = [f"{'noise':>6} {'method':<20} {ours:>20} {'paper (CIFAR-10)':>17}"]
    for row in record["rows"]:
        for m in METHODS:
            i = paper.get(row["rate"])
            ref = PAPER_TABLE4.get(m)
            mine = f"{100 * row[m]['test_acc']:.1f}"
            lines.append(f"{row['rate']:>6.0%} {m:<20} {mine:>20} "
                         f"{(f'{ref[i]:.1f}' if ref and i is not None else '-'):>17}")
    lines.append(f"test accuracy (%); the paper's column: {PAPER_NOTE}")
    return "\n".join(lines)

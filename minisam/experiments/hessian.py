"""The Hessian spectrum during training, SGD against SAM (the SAM paper, sec. 4.2, Fig. 3 left).

The paper trained a WideResNet-40-10 without batch norm on CIFAR-10 and reports, at the end
of training, the top of the Hessian spectrum of the training loss: SAM's lambda_max is
far smaller than SGD's (about 1.0 against 24) and so is lambda_max / lambda_5 (up to 2.6
against 11.4), i.e. SAM's solutions are flatter and less dominated by a few directions. This is
that measurement in miniature: a WRN-10-2 on the embedded digits, trained with SGD and
with SAM from the same initialisation, the top 5 eigenvalues measured after every epoch
by ``sharpness.lanczos``.

What it measures: the Hessian of the cross entropy (no weight decay term; it would add
wd = 5e-4 to every eigenvalue) on a fixed set of training images, in float64, BN (if any)
in train mode on that set, from Hessian-vector products by central differences of the
gradient with every ReLU's mask held at w (``BatchLoss.hvp``): the Hessian autodiff
reports for a ReLU net. Plain differences are not usable here: on a WRN-10-1 trained two
epochs with SAM (8x8 digits, 128 images) the top eigenvalue they gave was 43, 969 and 237
at steps of 1e-8, 1e-7 and 1e-6 (ReLU inputs crossing zero), while the masked ones gave
42.58 at every step from 1e-8 to 1e-4 (tests/test_sharpness.py checks that invariance). Without BN (the default, as in the paper) the Hessian is that of the
function the network computes; with BN (``batch_norm=True``) it also moves with the
batch statistics, which "tends to obscure interpretation of the Hessian" (the paper).
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..config import TrainConfig
from ..sharpness import BatchLoss, lanczos
from ..train import Trainer
from .common import float64_weights, save, settings, sgd_epochs, train_config

FULL = dict(epochs=10, batch_size=32, lr=0.1, image_size=16, model="wrn10_2", examples=128,
            iters=20, every=2)
QUICK = dict(epochs=2, batch_size=64, lr=0.1, image_size=8, model="wrn10_1", examples=32,
             iters=6, every=1)
K = 5


def measure(trainer: Trainer, examples: int, iters: int, seed: int = 0) -> dict:
    """The top ``K`` eigenvalues of the trainer's current training-loss Hessian."""
    data = trainer.train_data
    model = trainer.models[0]
    params, state = float64_weights(trainer)
    f = BatchLoss(model, state, data.images[:examples], data.labels[:examples],
                  dtype=np.float64)
    spec = lanczos(None, params, k=K, iters=iters, seed=seed, hvp=f.hvp(params))
    model.set_params(trainer.params)   # the trainer's own (float32) arrays again
    top = [float(v) for v in spec.values]
    return {"eigenvalues": top, "bounds": [float(b) for b in spec.bounds],
            "lambda_max_over_lambda_5": top[0] / top[-1] if top[-1] > 0 else float("nan"),
            "hvps": spec.iterations, "h": spec.h}


def run(out_dir: str, *, quick: bool = False, rho: float = 0.05, batch_norm: bool = False,
        epochs: int | None = None, device: str = "cpu", seed: int = 0,
        fair_sgd: bool = False, progress: bool = True, dataset="digits", data_dir=None,
        model=None, batch_size=None) -> dict:
    """Train SGD and SAM, measure every ``every`` epochs and at the end, write hessian.json
    and hessian.png. ``fair_sgd``: also SGD for twice the epochs ("SGD, 2x epochs")."""
    s = settings(FULL, QUICK, quick=quick, epochs=epochs, dataset=dataset, data_dir=data_dir,
                 model=model, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    runs = {}
    budgets = [("SGD" if e == s["epochs"] else "SGD, 2x epochs", 0.0, e)
               for e in sgd_epochs(s["epochs"], fair_sgd)]
    for name, r, n_epochs in [budgets[0], ("SAM", rho, s["epochs"]), *budgets[1:]]:
        cfg = TrainConfig(**train_config(s, epochs=n_epochs, lr=s["lr"], rho=r,
                                         batch_norm=batch_norm, seed=seed, device=device))
        trainer = Trainer(cfg, None, progress=False, max_steps=0)
        rows, spe = [], trainer.steps_per_epoch
        for epoch in range(1, n_epochs + 1):
            trainer.max_steps = epoch * spe
            rec = trainer.fit()
            if epoch % s["every"] and epoch != n_epochs:
                continue
            tm = time.time()
            row = {"epoch": epoch, "train_loss": rec.get("train_loss"),
                   "test_error_rate": rec.get("test_error_rate"),
                   **measure(trainer, s["examples"], s["iters"], seed)}
            row["measure_s"] = round(time.time() - tm, 2)
            rows.append(row)
            if progress:
                print(f"  {name} epoch {epoch}: lambda_max {row['eigenvalues'][0]:8.3f}, "
                      f"lambda_max/lambda_5 {row['lambda_max_over_lambda_5']:6.2f}, test error "
                      f"{row['test_error_rate']:.2%}", flush=True)
        trainer.close()
        runs[name] = {"rho": r, "epochs": rows}
    record = {"experiment": "hessian", "quick": quick, "batch_norm": batch_norm,
              "dataset": s["dataset"], "settings": s, "k": K, "device": device, "seed": seed,
              "fair_sgd": fair_sgd,
              "runs": runs, "seconds": round(time.time() - t0, 1),
              "paper": "WRN-40-10 without BN on CIFAR-10 (Foret et al. 2021, sec. 4.2, Fig. 3 "
                       "left): lambda_max about 24 with SGD and 1.0 with SAM, lambda_max / "
                       "lambda_5 up to 11.4 and 2.6"}
    from ..plots import plot_hessian
    return save(out_dir, record, plot_hessian)

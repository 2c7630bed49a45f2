"""m-sharpness against generalisation (the SAM paper, sec. 4.1, Fig. 3 middle and right).

The paper trains with SAM where every accelerator perturbs with its own m examples, and
finds that (middle) smaller m gives lower test error, and (right) the m-sharpness of the
trained models predicts their generalisation gap better the smaller m is (measured as the
rank correlation over many models). In miniature: a WRN-10-1 on 8x8 digits trained with
micro-batch m-SAM (``variants.microbatch_step``: each micro-batch of m examples its own
perturbation, in one process) for each m and rho on a grid, then, for every trained model
and every m, its m-sharpness on a fixed set of training examples, both first-order (one
ascent step, e = rho g / ||g||, what SAM uses) and by projected ascent (five steps, the
paper's max over the ball, from below); and the Spearman rank correlation, over all the
models, between each m-sharpness and the generalisation gap (test error - train error, on
the evaluation sets).

Confound to keep in mind: BN normalises with the batch it sees, so training with
micro-batches of m also trains BN on batches of m, and measuring m-sharpness runs BN on
batches of m.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..config import TrainConfig
from ..evaluate import evaluate
from ..sharpness import m_sharpness
from ..train import Trainer
from .common import float64_weights, save, settings, sgd_epochs, train_config

FULL = dict(ms=(4, 16, 64), rhos=(0.0, 0.05, 0.1, 0.2), seeds=(0, 1), epochs=6,
            batch_size=64, image_size=8, model="wrn10_1", examples=256, ascent_steps=5,
            measure_rho=0.05)
QUICK = dict(ms=(8, 32), rhos=(0.0, 0.1), seeds=(0,), epochs=1, batch_size=32, image_size=8,
             model="wrn10_1", examples=64, ascent_steps=3, measure_rho=0.05)


def spearman(a, b) -> float:
    """The Spearman rank correlation: Pearson's r of the ranks (ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):          # ties: the mean of their ranks
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def run(out_dir: str, *, quick: bool = False, epochs: int | None = None, device: str = "cpu",
        seed: int = 0, fair_sgd: bool = False, progress: bool = True, dataset="digits",
        data_dir=None, model=None, batch_size=None, **_ignored) -> dict:
    """Train the grid, measure, write m-sharpness.json and m-sharpness.png. ``fair_sgd``:
    the SGD models also train for twice the epochs, and the figure's SGD point is the
    better of the two budgets (every model counts in the correlations)."""
    s = settings(FULL, QUICK, quick=quick, epochs=epochs, dataset=dataset, data_dir=data_dir,
                 model=model, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    models = []
    grid = [(sd, m, rho, e) for sd in s["seeds"] for m in s["ms"] for rho in s["rhos"]
            for e in (sgd_epochs(s["epochs"], fair_sgd) if rho == 0 else (s["epochs"],))
            if rho > 0 or m == s["ms"][-1]]   # SGD does not depend on m: once per seed
    for sd, m, rho, n_epochs in grid:
        cfg = TrainConfig(**train_config(
            s, epochs=n_epochs, rho=rho, micro_batch=m if rho > 0 and m < s["batch_size"] else 0,
            seed=seed + sd, device=device))
        t = Trainer(cfg, None, progress=False)
        t.fit()
        train = evaluate(t.replicas, t.models, t.params, t.eval_state(), t.clean_train,
                         256, 0.0, device)
        test = t.last_record
        params, state = float64_weights(t)
        x, y = t.clean_train.images[:s["examples"]], t.clean_train.labels[:s["examples"]]
        sharp = {}
        for mm in s["ms"]:
            for steps in (1, s["ascent_steps"]):
                r = m_sharpness(t.models[0], params, state, x, y, m=mm,
                                rho=s["measure_rho"], dtype=np.float64, ascent_steps=steps)
                sharp[f"m={mm},steps={steps}"] = r["loss"]
        t.close()
        row = {"train_m": m if rho > 0 else None, "rho": rho, "seed": seed + sd,
               "epochs": n_epochs,
               "train_error_rate": train["error_rate"],
               "test_error_rate": test["test_error_rate"],
               "gap": test["test_error_rate"] - train["error_rate"], "m_sharpness": sharp}
        models.append(row)
        if progress:
            print(f"  seed {seed + sd} rho {rho:<5g} m {row['train_m'] or '-':<3}: test error "
                  f"{row['test_error_rate']:.2%}, gap {row['gap']:+.2%}", flush=True)
    gaps = [r["gap"] for r in models]
    correlation = {key: spearman([r["m_sharpness"][key] for r in models], gaps)
                   for key in models[0]["m_sharpness"]}
    record = {"experiment": "m-sharpness", "quick": quick, "settings": s, "seed": seed,
              "fair_sgd": fair_sgd,
              "device": device, "models": models, "spearman_vs_gap": correlation,
              "seconds": round(time.time() - t0, 1),
              "paper": "Foret et al. 2021, sec. 4.1, Fig. 3 middle and right: smaller m trains "
                       "to lower test error, and m-sharpness predicts the generalisation gap "
                       "better (higher rank correlation) for smaller m"}
    from ..plots import plot_m_sharpness
    return save(out_dir, record, plot_m_sharpness)

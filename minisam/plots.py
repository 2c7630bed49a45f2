"""Figures: training curves from a run directory, SGD-vs-SAM comparisons, loss landscapes.

matplotlib is an optional extra (``pip install 'minisam[plots]'``); it is imported only when
a figure is drawn, with the non-interactive Agg backend, so plotting works on machines
without a display. Every function writes a PNG and returns its path.
"""
from __future__ import annotations

import os

from .experiments.common import data_label
from .rundir import read_config, read_metrics


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib, which is not installed; install the plots "
                          "extra: pip install 'minisam[plots]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _config(run_dir: str) -> dict:
    """The run's TrainConfig fields, or {} if its config.json is missing or unreadable."""
    try:
        return read_config(run_dir)
    except (OSError, KeyError, ValueError):
        return {}


def _run_label(run_dir: str) -> str:
    c = _config(run_dir)
    if "rho" not in c or "model" not in c or "dataset" not in c:
        return os.path.basename(os.path.normpath(run_dir))
    opt = f"SAM rho={c['rho']:g}" if c["rho"] > 0 else "SGD"
    noise = f", {c['label_noise']:.0%} label noise" if c.get("label_noise") else ""
    return f"{opt} ({c['model']}, {c['dataset']}{noise})"


def _is_sam(run_dir: str) -> bool:
    return _config(run_dir).get("rho", 0) > 0


def _eval_name(run_dir: str) -> str:
    return "validation" if _config(run_dir).get("validation") else "test"


def _records(run_dir: str):
    recs = [r for r in read_metrics(run_dir) if "test_loss" in r]
    if not recs:
        raise ValueError(f"{run_dir!r} has no completed epoch in its metrics.jsonl yet; "
                         "nothing to plot")
    return recs


def _save(fig, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


def plot_training_curves(run_dir: str, out: str | None = None) -> str:
    """Loss and error rate per epoch, train (mean over the epoch's batches, augmented) and
    test (or validation), from ``run_dir/metrics.jsonl``. Default out: run_dir/curves.png."""
    return plot_comparison({_run_label(run_dir): run_dir},
                           out or os.path.join(run_dir, "curves.png"))


def plot_comparison(runs, out: str, landscape: dict | None = None, title: str | None = None) -> str:
    """Curves of several runs on shared axes, e.g. {"SGD": dir1, "SAM": dir2}.

    runs:      dict label -> run directory, or a list of run directories.
    landscape: optional dict label -> ``sharpness.loss_slice_1d`` result, drawn as a third
               panel (the loss along a filter-normalised random direction).
    Train curves (dashed) are the epoch means of the training batches' metrics as logged
    during training (augmented data; for SAM at the perturbed weights w + e, as the JAX code
    logs them); test curves are solid; one colour per run."""
    plt = _pyplot()
    if not isinstance(runs, dict):
        runs = {_run_label(d): d for d in runs}
    panels = 3 if landscape else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run_dir) in enumerate(runs.items()):
        recs, c = _records(run_dir), colors[i % len(colors)]
        ep = [r["epoch"] for r in recs]
        ev = _eval_name(run_dir)
        # the JAX code logs SAM's training metrics at the perturbed weights w + e
        tr = "train batches" + (" at w+e" if _is_sam(run_dir) else "")
        for ax, key in zip(axes[:2], ("loss", "error_rate")):
            ax.plot(ep, [r[f"train_{key}"] for r in recs], "--", color=c, label=f"{label}, {tr}")
            ax.plot(ep, [r[f"test_{key}"] for r in recs], "-", color=c, label=f"{label}, {ev}")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="error rate", title="error rate")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if landscape:
        for i, (label, s) in enumerate(landscape.items()):
            axes[2].plot(s["alphas"], s["loss"], "-o", ms=3, color=colors[i % len(colors)],
                         label=label)
        axes[2].set(xlabel="alpha (filter-normalised direction)", ylabel="training loss",
                    title="1-D loss slice (Li et al. 2018)")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_landscape_1d(slices: dict, out: str, title: str = "1-D loss slice") -> str:
    """Loss and error along one direction for each labelled ``loss_slice_1d`` result."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for label, s in slices.items():
        axes[0].plot(s["alphas"], s["loss"], "-o", ms=3, label=label)
        axes[1].plot(s["alphas"], s["error_rate"], "-o", ms=3, label=label)
    axes[0].set(xlabel="alpha", ylabel="loss", title=title)
    axes[1].set(xlabel="alpha", ylabel="error rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_landscape_2d(surface: dict, out: str, title: str = "2-D loss surface",
                      levels: int = 30) -> str:
    """Contour plot of a ``loss_surface_2d`` result (Li et al. 2018, their Fig. 1 style)."""
    plt = _pyplot()
    import numpy as np
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    a, b = np.meshgrid(surface["alphas"], surface["betas"])
    cs = ax.contour(a, b, surface["loss"], levels=levels, cmap="viridis")
    ax.clabel(cs, inline=True, fontsize=6, fmt="%.2f")
    ax.plot([0], [0], "r+", ms=10)
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)", title=title)
    return _save(fig, out)


def plot_hessian(record: dict, out: str) -> str:
    """``experiments.hessian``'s record: lambda_max and lambda_max / lambda_5 after every
    epoch, SGD against SAM, and the top of the spectrum at the end (the paper's Fig. 3 left)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"SGD": "tab:blue", "SAM": "tab:red", "SGD, 2x epochs": "tab:cyan"}
    for name, run in record["runs"].items():
        rows = run["epochs"]
        ep = [r["epoch"] for r in rows]
        label = name if not run["rho"] else f"{name} (rho {run['rho']:g})"
        axes[0].plot(ep, [r["eigenvalues"][0] for r in rows], "o-", color=colors[name],
                     label=label)
        axes[1].plot(ep, [r["lambda_max_over_lambda_5"] for r in rows], "o-",
                     color=colors[name], label=label)
        top = rows[-1]["eigenvalues"]
        axes[2].plot(range(1, len(top) + 1), top, "o-", color=colors[name],
                     label=f"{label}, epoch {rows[-1]['epoch']}")
    axes[0].set(title="top Hessian eigenvalue", xlabel="epoch", ylabel="lambda_max")
    axes[1].set(title="lambda_max / lambda_5", xlabel="epoch", ylabel="ratio")
    axes[2].set(title="top of the spectrum, end of training", xlabel="eigenvalue index i",
                ylabel="lambda_i")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    bn = "with batch norm" if record["batch_norm"] else "without batch norm"
    st = record["settings"]
    fig.suptitle(f"Hessian of the training loss, {st['model']} {bn} on {data_label(st)} "
                 f"({record['runs']['SGD']['epochs'][0]['hvps']} Lanczos steps on "
                 f"{st['examples']} training images, float64)" + (" [quick]" if record["quick"]
                                                                   else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_m_sharpness(record: dict, out: str) -> str:
    """``experiments.msharpness``'s record: test error against rho for each training m, and
    the rank correlation of each measured m-sharpness with the generalisation gap (the
    paper's Fig. 3 middle and right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    st = record["settings"]
    def mean_error(rows):
        return 100 * sum(r["test_error_rate"] for r in rows) / len(rows)
    sgd_rows = [r for r in record["models"] if r["rho"] == 0]
    sgd = min(mean_error([r for r in sgd_rows if r.get("epochs", st["epochs"]) == e])
              for e in {r.get("epochs", st["epochs"]) for r in sgd_rows})  # fair_sgd: the better
    for m in st["ms"]:
        rhos = sorted({r["rho"] for r in record["models"] if r["train_m"] == m})
        errs = [mean_error([r for r in record["models"] if r["train_m"] == m and r["rho"] == rho])
                for rho in rhos]
        axes[0].plot([0.0] + rhos, [sgd] + errs, "o-", label=f"m = {m}")
    n_seeds = len(st.get("seeds", (0,)))
    axes[0].set(title="test error after training with m-SAM"
                + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""), xlabel="rho",
                ylabel="test error (%)")
    for steps, style in ((1, "o-"), (st["ascent_steps"], "s--")):
        corr = [record["spearman_vs_gap"][f"m={m},steps={steps}"] for m in st["ms"]]
        label = ("first-order (one ascent step)" if steps == 1 else
                 f"projected ascent ({steps} steps)")
        axes[1].plot(st["ms"], corr, style, label=label)
    axes[1].set(title="m-sharpness vs generalisation gap", xlabel="m (examples per perturbation)",
                ylabel="Spearman rank correlation", xscale="log")
    axes[1].minorticks_off()
    axes[1].set_xticks(st["ms"], [str(m) for m in st["ms"]])
    axes[1].axhline(0, color="gray", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"m-sharpness, {st['model']} on {data_label(st)}, "
                 f"{len(record['models'])} models, {st['epochs']} epochs each"
                 + (" [quick]" if record["quick"] else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_label_noise(record: dict, out: str) -> str:
    """``experiments.labelnoise``'s record: clean test accuracy against the noise rate per
    method, the miniature beside the paper's Table 4 (each panel labelled with its setting)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    styles = {"SGD": ("tab:blue", "o-"), "SGD, early stopped": ("tab:cyan", "v:"),
              "SAM": ("tab:red", "s-"), "Bootstrap + SAM": ("tab:purple", "D--")}
    rates = [100 * r["rate"] for r in record["rows"]]
    for m in record["methods"]:
        color, style = styles[m]
        label = m if m != "SGD" or not record["fair_sgd"] else "SGD (better of 1x, 2x epochs)"
        axes[0].plot(rates, [100 * r[m]["test_acc"] for r in record["rows"]], style,
                     color=color, label=label)
    paper = record["paper"]
    for m in ("SGD", "SAM", "Bootstrap + SAM"):
        color, style = styles[m]
        axes[1].plot([100 * r for r in paper["rates"]], paper[m], style, color=color, label=m)
    st = record["settings"]
    axes[0].set(title=f"minisam: {st['model']}, {data_label(st)}, "
                      f"{st['epochs']} epochs" + (" [quick]" if record["quick"] else ""),
                xlabel="label noise (%)", ylabel="clean test accuracy (%)")
    axes[1].set(title="the paper's Table 4: ResNet-32, CIFAR-10, 200 epochs",
                xlabel="label noise (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, out)

"""The SAM paper's experiments in miniature, one module each, run by ``minisam experiment NAME``.

Each ``run(out_dir, quick=..., ...)`` trains what it needs, measures, writes
``NAME.json`` (every number it plots) and ``NAME.png`` into ``out_dir``, and returns the
record. ``quick`` is the setting the tests use (seconds, not minutes). Each runs on the
embedded digits by default; ``dataset="cifar10"`` or ``"cifar100"`` (with ``data_dir``,
``model``, ``epochs``, ``batch_size``) runs the same experiment at CIFAR's 32x32
(``common.settings``).
"""
from __future__ import annotations

EXPERIMENTS = ("hessian", "m-sharpness", "label-noise")


def run(name: str, out_dir: str, **kwargs) -> dict:
    """Run experiment ``name`` (one of ``EXPERIMENTS``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {EXPERIMENTS}")
    from . import hessian, labelnoise, msharpness
    return {"hessian": hessian.run, "m-sharpness": msharpness.run,
            "label-noise": labelnoise.run}[name](out_dir, **kwargs)

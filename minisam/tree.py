"""Maths over flat dicts of arrays ("trees": parameters, gradients, BN state).

The JAX code does these with ``jax.tree_util`` maps; here a tree is a flat dict keyed by
flax paths, so each operation is a one-line dict comprehension. Every function works on
NumPy and CuPy arrays alike and leaves scalars on the device (no host sync) unless its
docstring says otherwise.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy


def global_norm(tree: dict):
    """sqrt(sum of squares over every array of the dict): the norm of the concatenated vector."""
    return sum((v * v).sum() for v in tree.values()) ** 0.5


def axpy(a, x: dict, y: dict) -> dict:
    """``a * x + y`` key by key (BLAS's name): a step of size ``a`` along ``x`` from ``y``."""
    return {k: y[k] + a * x[k] for k in y}


def inner(a: dict, b: dict):
    """The inner product of two trees, left on the device (no host sync: for train steps)."""
    return sum((a[k] * b[k]).sum() for k in a)


def dot(a: dict, b: dict) -> float:
    """The inner product of two trees as one host float (a host sync)."""
    return float(inner(a, b))


def mean_in_rank_order(trees: list) -> dict:
    """The mean of several trees, ``(t_0 + t_1 + ... + t_{n-1}) / n``, summed in list order.

    The one place replicas are averaged on the host: ``ThreadComm.allreduce_mean`` and the
    trainer both call it, so every replica (and every topology that holds the same
    replicas) gets the same bits. One tree is returned as it is."""
    if len(trees) == 1:
        return trees[0]
    out = {}
    for k in trees[0]:
        acc = trees[0][k]
        for t in trees[1:]:
            acc = acc + t[k]
        out[k] = acc / len(trees)
    return out


def to_vector(tree: dict) -> np.ndarray:
    """All arrays of a dict as one host vector (sorted keys), e.g. to compare directions."""
    return np.concatenate([to_numpy(tree[k]).ravel() for k in sorted(tree)])

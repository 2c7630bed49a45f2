"""Maths over flat dicts of arrays ("trees": parameters, gradients, BN state).

The JAX code does these with ``jax.tree_util`` maps; here a tree is a flat dict keyed by
flax paths, so each operation is a one-line dict comprehension (``tree_map``). Every
function works on NumPy and CuPy arrays alike and leaves scalars on the device (no host
sync) unless its docstring says otherwise.

A ``FlatTree`` is such a dict whose arrays are views into one contiguous buffer. The
trainer keeps parameters, gradients and momentum that way, so ``tree_map`` of an
elementwise function is one array operation on the buffer instead of one per key (on a
GPU, one kernel instead of a hundred), and an all-reduce sends the buffer without packing
it. The results are the same bits as key by key: an elementwise operation does not care
how its elements are grouped, and the reductions (``global_norm``, ``inner``) still sum
key by key in the dict's order, as they do on a plain dict.
"""
from __future__ import annotations

import numpy as np

from .backend import get_xp, to_numpy
from .flat import FlatLayout, flatten, plan_layout, unflatten


class FlatTree(dict):
    """A dict of arrays that are views into the 1-D buffer ``flat``, laid out by ``layout``
    (``flat.plan_layout`` of the tree: sorted keys, one dtype, one bucket).

    Keys keep the order of the tree it was made from, so anything that walks the dict sees
    what it saw before. Build one with ``flat_tree`` (a copy) or ``FlatTree.over(buffer,
    like)`` (views into a buffer laid out like ``like``). Nothing in minisam writes into a
    tree's arrays in place; a FlatTree relies on that, since its views share one buffer."""

    __slots__ = ("flat", "layout")

    @classmethod
    def build(cls, flat, layout: FlatLayout, keys) -> "FlatTree":
        views = unflatten([flat], layout)
        out = cls((k, views[k]) for k in keys)
        out.flat, out.layout = flat, layout
        return out

    @classmethod
    def over(cls, flat, like: "FlatTree") -> "FlatTree":
        """Views into ``flat`` (a buffer laid out like ``like``), keys in ``like``'s order."""
        return cls.build(flat, like.layout, like.keys())


def flat_tree(tree: dict, like: FlatTree | None = None):
    """A ``FlatTree`` copy of ``tree``: one buffer, one copy of every array into it.

    ``like``: use its layout (``tree`` must have its keys and shapes), e.g. to pack a
    model's gradients the way the parameters are packed. A tree of several dtypes, or an
    empty one, is returned as it is: there is no single buffer to hold it."""
    layout = like.layout if like is not None else plan_layout(tree)
    if len(layout.buckets) != 1:
        return tree
    (flat,) = flatten(tree, layout, get_xp(*tree.values()))   # one concatenate
    return FlatTree.build(flat, layout, tree.keys())


def same_layout(*trees) -> bool:
    """True when every tree is a FlatTree of one layout (so their buffers line up)."""
    first = trees[0]
    return isinstance(first, FlatTree) and all(
        isinstance(t, FlatTree) and (t.layout is first.layout or t.layout == first.layout)
        for t in trees[1:])


def tree_map(fn, tree: dict, *rest: dict) -> dict:
    """``{k: fn(tree[k], *(r[k] for r in rest))}``: jax.tree_util.tree_map over flat dicts.

    ``fn`` must be elementwise (NumPy broadcasting with scalars and 0-d arrays is fine).
    When every tree is a FlatTree of one layout, ``fn`` runs once on the buffers and the
    result is a FlatTree too: the same bits, one operation instead of one per key."""
    if same_layout(tree, *rest):
        return FlatTree.over(fn(tree.flat, *(r.flat for r in rest)), tree)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def like_tree(tree: dict, like: dict) -> dict:
    """``tree`` packed the way ``like`` is: a FlatTree of its layout when ``like`` is one
    (e.g. a model's fresh gradients, to match the parameters), else ``tree`` as it is."""
    return flat_tree(tree, like) if isinstance(like, FlatTree) else tree


def sum_of_squares(tree: dict):
    """sum of w^2 over every array: one squaring (on the buffer of a FlatTree), then one sum
    per key, added in the dict's order."""
    return sum(s.sum() for s in tree_map(lambda v: v * v, tree).values())


def global_norm(tree: dict):
    """sqrt(sum of squares over every array of the dict): the norm of the concatenated vector."""
    return sum_of_squares(tree) ** 0.5


def axpy(a, x: dict, y: dict) -> dict:
    """``a * x + y`` key by key (BLAS's name): a step of size ``a`` along ``x`` from ``y``."""
    return tree_map(lambda yv, xv: yv + a * xv, y, x)


def inner(a: dict, b: dict):
    """The inner product of two trees, left on the device (no host sync: for train steps)."""
    return sum(p.sum() for p in tree_map(lambda x, y: x * y, a, b).values())


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
    if same_layout(*trees):
        acc = trees[0].flat
        for t in trees[1:]:
            acc = acc + t.flat
        return FlatTree.over(acc / len(trees), trees[0])
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

"""Batch normalisation with the semantics of ``flax.nn.BatchNorm`` (flax 0.2.2).

Train mode normalises with the batch's statistics over N, H, W, using the *biased*
variance computed as ``E[x^2] - E[x]^2`` (that is how flax computes it, and float32
results depend on it), and updates the running statistics
``ra = momentum * ra + (1 - momentum) * batch``. Eval mode uses the running statistics.
The output is ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, in flax's order.

Backward (train mode), with xhat = (x - mean) * inv, M = N*H*W:
``dx = scale * inv / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))``; the two sums are
the gradients of bias and scale. In eval mode mean and var are constants, so
``dx = dy * scale * inv``.

How it is computed (``batchnorm_reference`` is the same maths written plainly, for
reading and for the tests): every per-channel statistic is a sum over the M rows of an
[M, C] view, and ``sum(dy * xhat)`` comes from the kept ``x - mean`` (xhat itself is
never formed), so the backward is three passes over the data,
``dx = dy * a - (x - mean) * b - c`` with per-channel a, b, c, instead of the eight
temporaries of the formula as written. The sums keep NumPy's row-by-row order, which is
XLA's: a GEMV against a ones vector is twice as fast on the CPU but rounds differently,
and that alone moved float32 ReLU ties of the JAX reference cases past what verify
resolves (measured: benchmarks/README.md).
"""
from __future__ import annotations

import numpy as np

from ..backend import DTYPE, get_xp
from .layer import Layer


def channel_sums(x2d):
    """Sum over the rows of an [M, C] array, row by row (XLA's order; see above)."""
    return x2d.sum(axis=0)


def channel_dots(a2d, b2d):
    """``sum(a * b, axis=0)`` of two [M, C] arrays. NumPy: ``einsum``, which multiplies and
    sums in one pass with no temporary, in the same row-by-row order."""
    if get_xp(a2d) is np:
        return np.einsum("mc,mc->c", a2d, b2d)
    return channel_sums(a2d * b2d)


def batchnorm_reference(x, scale, bias, mean=None, var=None, eps=1e-5):
    """The forward as the formula reads: batch statistics when ``mean`` is None."""
    axes = tuple(range(x.ndim - 1))
    if mean is None:
        mean = x.mean(axis=axes)
        var = (x * x).mean(axis=axes) - mean * mean
    return (x - mean) * (scale / get_xp(x).sqrt(var + eps)) + bias, mean, var


def batchnorm_reference_backward(x, dy, scale, mean, var, eps=1e-5, train=True):
    """(dx, dscale, dbias) by the formulas of the module docstring."""
    axes = tuple(range(x.ndim - 1))
    inv = 1.0 / get_xp(x).sqrt(var + eps)
    xhat = (x - mean) * inv
    dbias, dscale = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    if not train:
        return dy * (scale * inv), dscale, dbias
    m = dy.size // dy.shape[-1]
    return (scale * inv / m) * (m * dy - dbias - xhat * dscale), dscale, dbias


class BatchNorm(Layer):
    def __init__(self, channels, momentum=0.9, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.params = {"scale": np.ones(channels, DTYPE), "bias": np.zeros(channels, DTYPE)}
        self.state = {"mean": np.zeros(channels, DTYPE), "var": np.ones(channels, DTYPE)}

    def forward(self, x, train=True):
        xp = get_xp(x)
        c = self.params["scale"].shape[0]
        if x.shape[-1] != c:
            raise ValueError(f"BatchNorm over {c} channels got input of shape {tuple(x.shape)}")
        if train:
            x2 = x.reshape(-1, c)
            m = x2.shape[0]
            mean = channel_sums(x2) / m
            var = channel_dots(x2, x2) / m - mean * mean
            r = self.momentum
            self.state = {"mean": r * self.state["mean"] + (1 - r) * mean,
                          "var": r * self.state["var"] + (1 - r) * var}
        else:
            mean, var = self.state["mean"], self.state["var"]
        self.train = train
        self.inv = 1.0 / xp.sqrt(var + self.eps)
        self.centred = x - mean
        y = self.centred * (self.inv * self.params["scale"])
        y += self.params["bias"]
        return y

    def backward(self, dy, overwrite=False):
        """dL/dx from dL/dy. ``overwrite``: dy is the caller's own fresh array, needed no
        more, so dx is computed in its memory (and the kept x - mean serves as the scratch
        for its term): the same values with no full-size allocation."""
        xp, c = get_xp(dy), dy.shape[-1]
        scale, inv, centred = self.params["scale"], self.inv, self.centred
        self.centred = None
        dy2 = dy.reshape(-1, c)
        dbias = channel_sums(dy2)
        dscale = channel_dots(dy2, centred.reshape(-1, c)) * inv
        self.grads = {"scale": dscale, "bias": dbias}
        a = scale * inv
        dx = xp.multiply(dy, a, out=dy if overwrite else None)
        if not self.train:
            return dx
        m = dy2.shape[0]
        dx -= xp.multiply(centred, a * inv * dscale / m, out=centred if overwrite else None)
        dx -= a * dbias / m
        return dx

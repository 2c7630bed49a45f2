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
"""
from __future__ import annotations

import numpy as np

from ..backend import DTYPE, get_xp
from .layer import Layer


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
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = x.mean(axis=axes)
            var = (x * x).mean(axis=axes) - mean * mean
            m = self.momentum
            self.state = {"mean": m * self.state["mean"] + (1 - m) * mean,
                          "var": m * self.state["var"] + (1 - m) * var}
        else:
            mean, var = self.state["mean"], self.state["var"]
        self.train = train
        self.inv = 1.0 / xp.sqrt(var + self.eps)
        self.centred = x - mean
        return self.centred * (self.inv * self.params["scale"]) + self.params["bias"]

    def backward(self, dy):
        axes = tuple(range(dy.ndim - 1))
        scale = self.params["scale"]
        xhat = self.centred * self.inv
        self.centred = None
        dbias = dy.sum(axis=axes)
        dscale = (dy * xhat).sum(axis=axes)
        self.grads = {"scale": dscale, "bias": dbias}
        if not self.train:
            return dy * (scale * self.inv)
        m = dy.size // dy.shape[-1]
        dx = (scale * self.inv / m) * (m * dy - dbias - xhat * dscale)
        return dx.astype(dy.dtype, copy=False)

"""Dense layer, y = x @ kernel + bias with the kernel [in, out] (flax layout)."""
from __future__ import annotations

import math

import numpy as np

from ..backend import DTYPE
from .layer import Layer


class Dense(Layer):
    """``flax.nn.Dense`` with sam_jax's ``dense_layer_init_fn``: kernel ~ U(-1/sqrt(out),
    1/sqrt(out)), bias zero. Backward: dkernel = x^T dy, dbias = sum_n dy, dx = dy kernel^T."""

    def __init__(self, in_features, out_features, rng=None):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        r = 1.0 / math.sqrt(out_features)
        self.params = {"kernel": rng.uniform(-r, r, (in_features, out_features)).astype(DTYPE),
                       "bias": np.zeros(out_features, DTYPE)}

    def forward(self, x, train=True):
        k = self.params["kernel"]
        if x.ndim != 2 or x.shape[1] != k.shape[0]:
            raise ValueError(f"Dense expects input [N, {k.shape[0]}], got {tuple(x.shape)}")
        self.x = x
        return x @ k + self.params["bias"]

    def backward(self, dy):
        self.grads = {"kernel": self.x.T @ dy, "bias": dy.sum(axis=0)}
        return dy @ self.params["kernel"].T

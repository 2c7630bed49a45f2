"""Average pooling, the WideResNet shortcut, and global average pooling."""
from __future__ import annotations

from ..backend import get_xp
from .layer import Layer


class AvgPool(Layer):
    """``flax.nn.avg_pool(x, (s, s), (s, s))`` (VALID): mean over non-overlapping s x s windows.

    Backward spreads each output gradient evenly, dy / s^2, over its window (rows and
    columns dropped by VALID padding get zero)."""

    def __init__(self, stride):
        super().__init__()
        self.s = stride

    def forward(self, x, train=True):
        s = self.s
        n, h, w, c = x.shape
        self.x_shape = x.shape
        x = x[:, :h // s * s, :w // s * s, :]
        return x.reshape(n, h // s, s, w // s, s, c).mean(axis=(2, 4))

    def backward(self, dy):
        xp, s = get_xp(dy), self.s
        n, oh, ow, c = dy.shape
        g = xp.broadcast_to((dy / (s * s))[:, :, None, :, None, :], (n, oh, s, ow, s, c))
        dx = g.reshape(n, oh * s, ow * s, c)
        if dx.shape != self.x_shape:  # VALID dropped a remainder: it gets no gradient
            full = xp.zeros(self.x_shape, dy.dtype)
            full[:, :oh * s, :ow * s, :] = dx
            dx = full
        return dx


class Shortcut(Layer):
    """The WRN shortcut when channels change (sam_jax wide_resnet ``_output_add``):
    ``avg_pool(window=stride, stride=stride)`` then zero channels appended at the end.
    Backward: drop the padded channels' gradient, then the avg-pool backward."""

    def __init__(self, stride, out_channels):
        super().__init__()
        self.children["pool"] = AvgPool(stride)
        self.out_channels = out_channels

    def forward(self, x, train=True):
        xp, pool = get_xp(x), self.children["pool"]
        self.in_channels = x.shape[-1]
        y = pool.forward(x) if pool.s > 1 else x
        return xp.pad(y, ((0, 0), (0, 0), (0, 0), (0, self.out_channels - self.in_channels)))

    def backward(self, dy):
        dy, pool = dy[..., :self.in_channels], self.children["pool"]
        return pool.backward(dy) if pool.s > 1 else dy


class GlobalAvgPool(Layer):
    """Mean over H and W: [N, H, W, C] -> [N, C] (flax: avg_pool over x.shape[1:3], reshape)."""

    def forward(self, x, train=True):
        self.x_shape = x.shape
        return x.mean(axis=(1, 2))

    def backward(self, dy):
        xp = get_xp(dy)
        n, h, w, c = self.x_shape
        return xp.broadcast_to((dy / (h * w))[:, None, None, :], self.x_shape)

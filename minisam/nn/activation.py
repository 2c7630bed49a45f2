"""ReLU: y = max(x, 0); dL/dx = dL/dy where x > 0, else 0."""
from ..backend import get_xp
from .layer import Layer


class ReLU(Layer):
    def forward(self, x, train=True):
        self.mask = x > 0
        return get_xp(x).maximum(x, 0)

    def backward(self, dy):
        return dy * self.mask

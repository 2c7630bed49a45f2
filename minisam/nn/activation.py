"""ReLU: y = max(x, 0); dL/dx = dL/dy where x > 0, else 0.

``fixed``: a mask to use instead of ``x > 0`` (None: the usual ReLU). With every ReLU's
mask fixed to its value at w, the network is smooth around w, so finite differences of the
gradient give the Hessian that autodiff reports for a ReLU net (ReLU'' = 0) without the
jumps of inputs that cross zero (``sharpness.BatchLoss.hvp``)."""
from ..backend import get_xp
from .layer import Layer


class ReLU(Layer):
    fixed = None

    def forward(self, x, train=True):
        if self.fixed is not None:
            self.mask = self.fixed
            return x * self.fixed
        self.mask = x > 0
        return get_xp(x).maximum(x, 0)

    def backward(self, dy):
        return dy * self.mask

"""Hand-written layers: each a small class with forward(x, train) and backward(dy)."""
from .activation import ReLU
from .batchnorm import BatchNorm
from .conv import Conv, conv2d_loop, conv2d_loop_backward, im2col, col2im, same_padding
from .dense import Dense
from .layer import Identity, Layer
from .loss import error_rate, log_softmax, one_hot, softmax_cross_entropy
from .pooling import AvgPool, GlobalAvgPool, Shortcut

__all__ = ["AvgPool", "BatchNorm", "Conv", "Dense", "GlobalAvgPool", "Identity", "Layer", "ReLU",
           "Shortcut", "col2im", "conv2d_loop", "conv2d_loop_backward", "error_rate",
           "im2col", "log_softmax", "one_hot", "same_padding", "softmax_cross_entropy"]

"""The WideResNet of google-research/sam (``sam_jax/models/wide_resnet.py``), layer for layer.

Same structure, same flax parameter names (so reference_results load by name), same
initialisers. Each module's backward is written out: read ``WideResnetBlock.backward``
beside its ``forward`` to see the gradient split at the residual and meet again.
``bn_relu_backward`` is a BatchNorm+ReLU pair's two backward calls, with BatchNorm's dx
computed in the ReLU's fresh gradient instead of new arrays (fewer full-size allocations,
which cost page faults on the CPU; the same bits, tests/test_model.py).
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import get_xp
from ..nn import BatchNorm, Conv, Dense, GlobalAvgPool, Identity, Layer, ReLU, Shortcut


def bn_relu_backward(bn, relu, dy):
    """``bn.backward(relu.backward(dy))``. The ReLU's gradient is a fresh array that nothing
    else holds, so BatchNorm computes its dx in that memory (``overwrite``) instead of two
    new full-size arrays: the same bits, fewer page faults on the CPU. An Identity (no batch
    norm) just passes the gradient on."""
    g = relu.backward(dy)
    return bn.backward(g, overwrite=True) if isinstance(bn, BatchNorm) else bn.backward(g)


def _norm(channels, batch_norm):
    """BatchNorm, or an Identity for the BN-free WideResnet (no parameters, no state)."""
    return BatchNorm(channels) if batch_norm else Identity()


class WideResnetBlock(Layer):
    """Pre-activation residual block (sam_jax ``WideResnetBlock``).

    forward:  [init_bn, relu] -> conv1 (stride) -> bn_2, relu -> conv2, plus the shortcut.
    With ``activate_before_residual`` the first BN+ReLU is applied *before* the split, so
    the shortcut carries the activated input; otherwise it carries the raw input.
    """

    def __init__(self, in_channels, channels, stride=1, activate_before_residual=False, rng=None,
                 batch_norm=True):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.children = {
            "init_bn": _norm(in_channels, batch_norm),
            "relu1": ReLU(),
            "conv1": Conv(in_channels, channels, 3, stride, rng),
            "bn_2": _norm(channels, batch_norm),
            "relu2": ReLU(),
            "conv2": Conv(channels, channels, 3, 1, rng),
        }
        # `_output_add`: pool + zero-pad the shortcut only when the channel count changes.
        self.has_shortcut = channels != in_channels
        if self.has_shortcut:
            self.children["shortcut"] = Shortcut(stride, channels)

    def forward(self, x, train=True):
        c = self.children
        if self.activate_before_residual:
            x = c["relu1"].forward(c["init_bn"].forward(x, train))
            orig = branch = x
        else:
            orig = x
            branch = c["relu1"].forward(c["init_bn"].forward(x, train))
        branch = c["conv1"].forward(branch, train)
        branch = c["relu2"].forward(c["bn_2"].forward(branch, train))
        branch = c["conv2"].forward(branch, train)
        if self.has_shortcut:
            orig = c["shortcut"].forward(orig)
        if orig.shape != branch.shape:
            raise ValueError(f"residual shapes differ: shortcut {tuple(orig.shape)} vs branch "
                             f"{tuple(branch.shape)}; image height and width must be divisible by 4")
        return branch + orig

    def backward(self, dy):
        c = self.children
        # y = branch + shortcut: dy flows unchanged into both paths.
        d_branch = c["conv2"].backward(dy)
        d_branch = bn_relu_backward(c["bn_2"], c["relu2"], d_branch)
        d_branch = c["conv1"].backward(d_branch)
        d_orig = c["shortcut"].backward(dy) if self.has_shortcut else dy
        if self.activate_before_residual:
            # both paths started from the activated input: their gradients meet before BN+ReLU
            return bn_relu_backward(c["init_bn"], c["relu1"], d_branch + d_orig)
        # the branch went through BN+ReLU, the shortcut did not: they meet at the input
        return bn_relu_backward(c["init_bn"], c["relu1"], d_branch) + d_orig


class WideResnetGroup(Layer):
    """``blocks_per_group`` blocks; only the first one strides (and may activate first)."""

    def __init__(self, in_channels, blocks_per_group, channels, stride=1,
                 activate_before_residual=False, rng=None, batch_norm=True):
        super().__init__()
        for i in range(blocks_per_group):
            self.children[f"WideResnetBlock_{i}"] = WideResnetBlock(
                in_channels if i == 0 else channels, channels, stride if i == 0 else 1,
                activate_before_residual and i == 0, rng, batch_norm)

    def forward(self, x, train=True):
        for block in self.children.values():
            x = block.forward(x, train)
        return x

    def backward(self, dy):
        for block in reversed(list(self.children.values())):
            dy = block.backward(dy)
        return dy


class WideResnet(Layer):
    """WRN-(6 * blocks_per_group + 4)-(channel_multiplier) with ``num_outputs`` classes.

    init_conv (16 channels) -> groups of 16k, 32k, 64k channels (strides 1, 2, 2) ->
    pre-pool-bn + ReLU -> global average pool -> Dense_3 (flax's auto-name for the head).
    ``batch_norm=False`` puts an ``Identity`` where every BatchNorm was (the same names,
    no BN parameters or state): the BN-free network of the SAM paper's Hessian (sec. 4.2).
    """

    def __init__(self, blocks_per_group, channel_multiplier, num_outputs=10, in_channels=3,
                 seed=0, batch_norm=True):
        super().__init__()
        for name, v in (("blocks_per_group", blocks_per_group),
                        ("channel_multiplier", channel_multiplier), ("num_outputs", num_outputs),
                        ("in_channels", in_channels)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"WideResnet {name} must be a positive integer, got {v!r}")
        self.config = dict(blocks_per_group=int(blocks_per_group),
                           channel_multiplier=int(channel_multiplier),
                           num_outputs=int(num_outputs), in_channels=int(in_channels),
                           batch_norm=bool(batch_norm))
        rng = np.random.default_rng(seed)
        k = channel_multiplier
        self.children["init_conv"] = Conv(in_channels, 16, 3, 1, rng)
        widths, strides, cin = (16 * k, 32 * k, 64 * k), (1, 2, 2), 16
        for g, (w, s) in enumerate(zip(widths, strides)):
            self.children[f"WideResnetGroup_{g}"] = WideResnetGroup(
                cin, blocks_per_group, w, s, activate_before_residual=(g == 0), rng=rng,
                batch_norm=batch_norm)
            cin = w
        self.children["pre-pool-bn"] = _norm(cin, batch_norm)
        self.children["relu"] = ReLU()
        self.children["pool"] = GlobalAvgPool()
        self.children["Dense_3"] = Dense(cin, num_outputs, rng)

    def forward(self, x, train=True):
        cin = self.config["in_channels"]
        if getattr(x, "ndim", None) != 4 or x.shape[-1] != cin:
            raise ValueError(f"WideResnet expects NHWC images [N, H, W, {cin}], "
                             f"got shape {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in (np.float32, np.float64):  # float64 only for gradient checks
            raise TypeError(f"WideResnet expects float32 images, got {x.dtype}; "
                            "cast with images.astype('float32')")
        c = self.children
        x = c["init_conv"].forward(x, train)
        for g in range(3):
            x = c[f"WideResnetGroup_{g}"].forward(x, train)
        x = c["relu"].forward(c["pre-pool-bn"].forward(x, train))
        return c["Dense_3"].forward(c["pool"].forward(x), train)

    def backward(self, dlogits, input_grad=True):
        """Gradients into every layer's ``grads``; returns dL/dimages, or None with
        ``input_grad=False`` (training needs none: ``sam.loss_and_grad``)."""
        c = self.children
        d = c["pool"].backward(c["Dense_3"].backward(dlogits))
        d = bn_relu_backward(c["pre-pool-bn"], c["relu"], d)
        for g in reversed(range(3)):
            d = c[f"WideResnetGroup_{g}"].backward(d)
        return c["init_conv"].backward(d, input_grad)


WRN_PRESETS = {"wrn16_4": (2, 4), "wrn16_8": (2, 8), "wrn28_10": (4, 10)}


def parse_wrn_name(name: str):
    """'wrn28_10', 'WRN-28-10' or 'wrn10x2' -> (blocks_per_group, channel_multiplier)."""
    m = re.fullmatch(r"wrn[-_]?(\d+)[-_x](\d+)", name.strip().lower())
    if m:
        depth, k = int(m.group(1)), int(m.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0 and k >= 1:
            return (depth - 4) // 6, k
    raise ValueError(f"unknown model {name!r}: expected one of {sorted(WRN_PRESETS)} or "
                     "'wrn<depth>_<width>' with depth = 6*n + 4 (10, 16, 22, 28, ...)")


def wide_resnet(name: str, num_outputs=10, in_channels=3, seed=0, batch_norm=True) -> WideResnet:
    """Build a WideResnet from a preset name such as 'wrn28_10' (WRN-28-10); without batch
    norm (``batch_norm=False``) as the SAM paper measured its Hessian (sec. 4.2)."""
    return WideResnet(*parse_wrn_name(name), num_outputs=num_outputs, in_channels=in_channels,
                      seed=seed, batch_norm=batch_norm)

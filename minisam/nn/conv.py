"""2-D convolution, NHWC activations and HWIO kernels, XLA "SAME" padding, no bias.

Two forms of the same maths:

* ``conv2d_loop`` / ``conv2d_loop_backward``: one output pixel at a time, the
  definition written out. Slow; for reading and for testing the fast form.
* ``Conv``: im2col + one matrix multiply (GEMM). Every output pixel's receptive field
  ``[kh, kw, C]`` is copied into a row of ``cols``; then ``y = cols @ kernel`` with the
  kernel flattened to ``[kh*kw*C, out]``. Backward is two more GEMMs,
  ``dkernel = cols^T @ dy`` and ``dcols = dy @ kernel^T``, and col2im scatters
  ``dcols`` back onto the input pixels (the adjoint of the im2col copy).

``im2col`` writes the copy as kh*kw slice assignments, the way to read it. ``Conv`` uses
``im2col_strided``: the same matrix as one copy out of a strided *view* of the padded
input (no data moves to build the view: its strides revisit each pixel kh*kw times).
NumPy copies a view in runs of contiguous memory, and a window row ``[kw, C]`` is
contiguous in the input, so the runs are kw*C long instead of C: on 2 CPU cores the copy
takes a third of the time of the nine slices (``benchmarks/README.md``).

Padding mirrors XLA's ``SAME`` (what ``flax.nn.Conv(padding='SAME')`` asks for):
``out = ceil(in / s)``, ``total = max((out - 1) * s + k - in, 0)``, ``low = total // 2``,
``high = total - low``. A stride-2 3x3 conv on an even input therefore pads 0 before
and 1 after, not 1 and 1.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import DTYPE, get_xp, reusable_buffer, workspace
from .layer import Layer


def same_padding(size: int, k: int, s: int):
    """(pad_low, pad_high, out_size) of XLA SAME padding along one spatial axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def zero_pad(x, pads, scratch=False):
    """x [N, H, W, C] with (top, bottom, left, right) rows/columns of zeros around it.

    With ``scratch`` the result lives in this thread's workspace, valid until the next
    workspace user with that shape: the border is zeroed and the interior copied, which
    saves an allocation and is faster than ``pad`` on NumPy."""
    top, bottom, left, right = pads
    if not (top or bottom or left or right):
        return x
    if not scratch:
        return get_xp(x).pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, h, w, c = x.shape
    xpad = workspace((n, top + h + bottom, left + w + right, c), x)
    xpad[:, :top], xpad[:, top + h:] = 0, 0
    xpad[:, top:top + h, :left], xpad[:, top:top + h, left + w:] = 0, 0
    xpad[:, top:top + h, left:left + w] = x
    return xpad


def _pad_same(x, kh, kw, s, scratch=False):
    """(x zero-padded as XLA SAME does, the pads, oh, ow)."""
    n, h, w, c = x.shape
    top, bottom, oh = same_padding(h, kh, s)
    left, right, ow = same_padding(w, kw, s)
    pads = (top, bottom, left, right)
    return zero_pad(x, pads, scratch), pads, oh, ow


def _check(x, kernel):
    if x.ndim != 4:
        raise ValueError(f"conv expects NHWC input of rank 4, got shape {tuple(x.shape)}")
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv kernel must be HWIO [kh, kw, {x.shape[3]}, out] for input "
                         f"with {x.shape[3]} channels, got {tuple(kernel.shape)}")


def conv2d_loop(x, kernel, stride=1):
    """Reference convolution by its definition: y[n,i,j,o] = sum_{a,b,c} xpad[n,i*s+a,j*s+b,c] k[a,b,c,o]."""
    _check(x, kernel)
    xp = get_xp(x)
    kh, kw, _, cout = kernel.shape
    xpad, _, oh, ow = _pad_same(x, kh, kw, stride)
    y = xp.zeros((x.shape[0], oh, ow, cout), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            patch = xpad[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            y[:, i, j, :] = xp.tensordot(patch, kernel, axes=3)
    return y


def conv2d_loop_backward(x, kernel, dy, stride=1):
    """(dx, dkernel) of ``conv2d_loop`` by the chain rule, one output pixel at a time."""
    xp = get_xp(x)
    kh, kw, _, _ = kernel.shape
    xpad, (top, _, left, _), oh, ow = _pad_same(x, kh, kw, stride)
    dxpad = xp.zeros_like(xpad)
    dk = xp.zeros_like(kernel)
    for i in range(oh):
        for j in range(ow):
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            g = dy[:, i, j, :]                                    # [N, out]
            dk += xp.tensordot(xpad[:, rows, cols, :], g, axes=([0], [0]))
            dxpad[:, rows, cols, :] += xp.tensordot(g, kernel, axes=([1], [3]))
    h, w = x.shape[1:3]
    return dxpad[:, top:top + h, left:left + w, :], dk


def im2col(xpad, kh, kw, stride, oh, ow, out=None):
    """Copy each receptive field into a row: [N, oh, ow, kh, kw, C] (reshape to 2-D is free)."""
    xp = get_xp(xpad)
    n, _, _, c = xpad.shape
    cols = xp.empty((n, oh, ow, kh, kw, c), dtype=xpad.dtype) if out is None else out
    for a in range(kh):
        for b in range(kw):
            cols[:, :, :, a, b, :] = xpad[:, a:a + stride * oh:stride, b:b + stride * ow:stride, :]
    return cols


def im2col_strided(xpad, kh, kw, stride, oh, ow, out=None):
    """``im2col`` as one copy of a strided view: ``view[n, i, j, a, b, c] =
    xpad[n, i*s + a, j*s + b, c]``, so i and a step along the same axis of the input (rows
    of the window overlap in memory) and so do j and b. Same result as ``im2col``."""
    xp = get_xp(xpad)
    n, _, _, c = xpad.shape
    sn, sh, sw, sc = xpad.strides
    view = xp.lib.stride_tricks.as_strided(
        xpad, (n, oh, ow, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc))
    if out is None:
        return view.copy()
    out[...] = view
    return out


def col2im(cols, padded_shape, stride):
    """Adjoint of im2col: add every row back onto the pixels it was copied from."""
    xp = get_xp(cols)
    n, oh, ow, kh, kw, c = cols.shape
    dxpad = xp.zeros(padded_shape, dtype=cols.dtype)
    for a in range(kh):
        for b in range(kw):
            dxpad[:, a:a + stride * oh:stride, b:b + stride * ow:stride, :] += cols[:, :, :, a, b, :]
    return dxpad


def variance_scaling_fan_out(rng, shape, scale=2.0):
    """He init as in sam_jax/models/utils.py `conv_kernel_init_fn`:
    ``jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')``, a normal truncated
    at two standard deviations, rescaled (/0.8796) so the variance is scale / fan_out."""
    kh, kw, _, cout = shape
    std = math.sqrt(scale / (kh * kw * cout)) / 0.87962566103423978
    z = rng.standard_normal(shape)
    while (bad := np.abs(z) > 2).any():   # resample the tails: truncated normal
        z[bad] = rng.standard_normal(int(bad.sum()))
    return (z * std).astype(DTYPE)


# Where the im2col matrix waits between forward and backward, per array module. True:
# in the layer's own buffer (nine activations' worth per conv, all alive at the end of the
# forward; the backward reuses it). False: only the input is kept, and the backward builds
# the matrix again in a buffer every layer of that shape shares (one more copy per conv,
# a fraction of the memory). Measured on the CPU (benchmarks/README.md): keeping is faster.
# On a GPU, the kept matrices are most of the memory (about 9 GiB, WRN-28-10 at batch 128).
KEEP_COLS = {"numpy": True, "cupy": False}


class Conv(Layer):
    """``flax.nn.Conv(features, (k, k), strides, padding='SAME', bias=False)`` by im2col + GEMM.

    ``keep_cols``: keep the im2col matrix from forward to backward (True), or rebuild it
    in the backward from the kept input (False); None: ``KEEP_COLS`` of the array module.
    Either way the same bits."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, rng=None,
                 keep_cols=None):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.stride, self.keep_cols = stride, keep_cols
        self._buffers, self.cols, self.x = {}, None, None
        self.params["kernel"] = variance_scaling_fan_out(
            rng, (kernel_size, kernel_size, in_channels, out_channels))

    def forward(self, x, train=True):
        k = self.params["kernel"]
        _check(x, k)
        kh, kw, cin, cout = k.shape
        xpad, self.pads, oh, ow = _pad_same(x, kh, kw, self.stride, scratch=True)
        self.x_shape, self.xpad_shape = x.shape, xpad.shape
        keep = self.keep_cols
        if keep is None:
            keep = KEEP_COLS.get(get_xp(x).__name__, True)
        shape = (x.shape[0], oh, ow, kh, kw, cin)
        cols = reusable_buffer(self._buffers, "cols", shape, x) if keep else workspace(shape, x)
        cols = im2col_strided(xpad, kh, kw, self.stride, oh, ow, cols).reshape(-1, kh * kw * cin)
        self.cols, self.x = (cols, None) if keep else (None, x)
        y = cols @ k.reshape(-1, cout)
        return y.reshape(x.shape[0], oh, ow, cout)

    def _rebuilt_cols(self, oh, ow):
        """The forward's im2col matrix again, from the kept input (``keep_cols`` False)."""
        kh, kw, cin, _ = self.params["kernel"].shape
        n = self.x_shape[0]
        xpad = zero_pad(self.x, self.pads, scratch=True)
        cols = workspace((n, oh, ow, kh, kw, cin), self.x)
        return im2col_strided(xpad, kh, kw, self.stride, oh, ow, cols).reshape(-1, kh * kw * cin)

    def backward(self, dy, input_grad=True):
        """dL/dx, and dL/dkernel into ``grads``. ``input_grad=False`` skips dL/dx (returns
        None): the network's first conv, whose input is the images, as autodiff does."""
        k = self.params["kernel"]
        kh, kw, cin, cout = k.shape
        n, oh, ow, _ = dy.shape
        dy2 = dy.reshape(-1, cout)
        cols = self.cols if self.x is None else self._rebuilt_cols(oh, ow)
        self.grads["kernel"] = (cols.T @ dy2).reshape(k.shape)
        self.cols = self.x = cols = None  # the buffers stay for the next step; the references go
        if not input_grad:
            return None
        if self.stride == 1:
            return self._input_grad_as_conv(dy)
        dcols = self._scratch((n, oh, ow, kh, kw, cin), dy).reshape(n * oh * ow, -1)
        get_xp(dy).matmul(dy2, k.reshape(-1, cout).T, out=dcols)
        dxpad = col2im(dcols.reshape(n, oh, ow, kh, kw, cin), self.xpad_shape, self.stride)
        top, _, left, _ = self.pads
        h, w = self.x_shape[1:3]
        return dxpad[:, top:top + h, left:left + w, :]

    def _scratch(self, shape, like):
        """Room for the backward's second im2col-sized matrix. Once the kernel gradient has
        read the forward's cols, their buffer is free until the next forward, so it serves
        when it is large enough (every conv whose input and output widths match: no second
        cols-sized buffer per layer shape, which on a GPU is the largest memory there is);
        otherwise the thread's workspace."""
        buf, size = self._buffers.get("cols"), math.prod(shape)
        if (buf is not None and buf.size >= size and buf.dtype == like.dtype
                and get_xp(buf) is get_xp(like)):
            return buf.reshape(-1)[:size].reshape(shape)
        return workspace(shape, like)

    def _input_grad_as_conv(self, dy):
        """Stride 1: dx is dy convolved with the kernel flipped in space and transposed in
        channels, ``dx = conv(pad(dy), k[::-1, ::-1].swap(in, out))``, with the padding
        mirrored (k - 1 - pad on each side). Same result as GEMM + col2im, but an im2col
        copy is cheaper than col2im's scattered additions."""
        k = self.params["kernel"]
        kh, kw, cin, cout = k.shape
        n, h, w, _ = self.x_shape
        top, bottom, left, right = self.pads
        dypad = zero_pad(dy, (kh - 1 - top, kh - 1 - bottom, kw - 1 - left, kw - 1 - right),
                         scratch=True)
        flipped = k[::-1, ::-1].transpose(0, 1, 3, 2).reshape(-1, cin)
        cols = im2col_strided(dypad, kh, kw, 1, h, w, self._scratch((n, h, w, kh, kw, cout), dy))
        return (cols.reshape(-1, kh * kw * cout) @ flipped).reshape(n, h, w, cin)

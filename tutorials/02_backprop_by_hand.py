# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Backprop by hand (deep dive, optional)
#
# > **Optional.** This notebook opens the layers that the SAM notebooks call. A reader in a
# > hurry can skip straight to [notebook 03](03_sam_step_by_step.ipynb), which uses these layers
# > as black boxes; come back here to see why their gradients can be trusted. (It follows
# > [notebook 01](01_sharpness_intuition.ipynb), the idea of SAM on toy losses.)
#
# SAM needs two gradients per step, so everything rests on the gradient being right. minisam
# has no autodiff: every layer is a small class with a `forward(x, train)` that keeps what it
# needs on `self`, and a hand-written `backward(dy)` that takes $\partial L/\partial y$, stores
# $\partial L/\partial\theta$ for its parameters in `self.grads` and returns
# $\partial L/\partial x$. This notebook goes through each layer of the WideResnet, shows its
# source and its maths, and checks its backward against finite differences in float64.
#
# Layout conventions (those of the JAX code): activations are NHWC `[batch, height, width,
# channels]`, conv kernels HWIO `[kh, kw, in, out]`, dense kernels `[in, out]`.
#
# Two exercises let you write a backward yourself (the input gradient of a convolution, and
# batch norm's backward); a check cell grades your function against minisam's layer, and a
# collapsed solution follows each.

# %%
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`
sys.path.insert(0, str(ROOT / "tutorials"))
from grading import check           # grades the exercises

import inspect
import time

import numpy as np
import matplotlib.pyplot as plt

from minisam.nn import (AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut, col2im,
                        conv2d_loop, conv2d_loop_backward, im2col, one_hot, same_padding,
                        softmax_cross_entropy)
from minisam.models.wide_resnet import WideResnet, WideResnetBlock

plt.rcParams.update({"figure.dpi": 80})
np.set_printoptions(precision=4, suppress=True)
print(inspect.getsource(ReLU))

# %% [markdown]
# ## A gradient checker
#
# For a layer $y = f(x; \theta)$ pick a random "upstream gradient" $\bar y$ (the $\partial
# L/\partial y$ a later layer would send) and look at the scalar
# $\ell(x, \theta) = \langle f(x;\theta), \bar y\rangle$. Its gradient with respect to $x$ is exactly
# what `backward(dy=ȳ)` returns, and its gradient with respect to $\theta$ is what it stores
# in `grads`. Rather than compare whole gradient arrays with finite differences (one pair of
# forward passes per entry), compare a **directional derivative** along a random direction $v$:
#
# $$
# \big\langle \nabla_x \ell,\, v\big\rangle \;\approx\; \frac{\ell(x + hv) - \ell(x - hv)}{2h}.
# $$
#
# Two errors limit how well the two sides can agree. The central difference has a
# *truncation* error $O(h^2)$ (the Taylor terms it ignores), and each $\ell$ is computed in
# floating point with a *rounding* error of about $\varepsilon|\ell|$ ($\varepsilon \approx 2.2\cdot10^{-16}$
# in float64), which the division by $2h$ magnifies into about $\varepsilon|\ell|/h$. With
# $h = 10^{-6}$ in float64 the rounding term is the larger one, and the agreement is far
# better than any bug would allow (the deep dive right after the checker measures both
# terms). In float32 ($\varepsilon \approx 1.2\cdot10^{-7}$)
# rounding would swamp it: always check in float64. One pair of forward passes per tensor,
# and a wrong entry anywhere shows up, since $v$ touches every entry. This is the shape of Chainer's `check_backward`, and the
# checker minisam's test suite uses.
#
# The checker works on any `Layer`: `get_params()` / `set_params()` and `get_grads()` walk a
# composite layer's children, so the same function checks a conv, a residual block or the
# whole network.

# %%
RESULTS = []   # (name, relative error) of every check, for the summary at the end


def to64(layer):
    """Cast a layer's parameters and state to float64 (gradient checks only)."""
    layer.set_params({k: v.astype(np.float64) for k, v in layer.get_params().items()})
    layer.set_state({k: v.astype(np.float64) for k, v in layer.get_state().items()})
    return layer


def check_layer(name, layer, x, train=True, seed=0, h=1e-6):
    """Directional-derivative check of layer.backward for the input and every parameter."""
    rng = np.random.default_rng(seed)
    to64(layer)
    x = x.astype(np.float64)
    params, state = layer.get_params(), layer.get_state()
    y = layer.forward(x, train)
    dy = rng.standard_normal(y.shape)                     # the upstream gradient
    analytic = {"x": layer.backward(dy), **layer.get_grads()}

    def ell(x_, params_):                                 # <f(x; params), dy>
        layer.set_params(params_)
        layer.set_state(state)                            # BN running stats: keep them fixed
        out = float((layer.forward(x_, train) * dy).sum())
        layer.set_params(params)
        return out

    print(f"{name}: output {tuple(y.shape)}")
    for key, grad in analytic.items():
        v = rng.standard_normal(grad.shape)
        if key == "x":
            plus, minus = ell(x + h * v, params), ell(x - h * v, params)
        else:
            plus = ell(x, {**params, key: params[key] + h * v})
            minus = ell(x, {**params, key: params[key] - h * v})
        numeric, exact = (plus - minus) / (2 * h), float((grad * v).sum())
        rel = abs(exact - numeric) / max(abs(numeric), 1e-12)
        RESULTS.append((f"{name}: {key}", rel))
        print(f"   d/d{key:<44s} backward {exact:+.10e}   finite diff {numeric:+.10e}   rel err {rel:.1e}")


# %% [markdown]
# ### Deep dive (optional): how small should $h$ be?
#
# Take a layer that is far from linear in its input, batch norm in training mode (section 2),
# and redo its input check for $h$ from $10^{-1}$ down to $10^{-11}$. Two lines bound the
# relative error on a log-log plot:
#
# * **truncation**: the central difference ignores the $\tfrac{h^2}{6}\,\partial_v^3\ell$ term of
#   the Taylor series, so its error grows like $h^2$ (slope 2); its constant is fitted at $h = 10^{-2}$;
# * **rounding**: about $\varepsilon|\ell|/(h\,|D|)$ with $D$ the exact directional derivative
#   (slope $-1$).
#
# The best $h$ is near where they cross, which scales like $\varepsilon^{1/3}$ (the measured
# error near the crossing scatters, since rounding errors are effectively random). (A convolution is linear in $x$, and
# for a linear or quadratic $\ell$ the central difference is exact: its check shows rounding only.)

# %%
rng = np.random.default_rng(2)
bn = to64(BatchNorm(5))
bn.params = {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.standard_normal(5)}
x = 3 + 2 * rng.standard_normal((4, 3, 3, 5))
dy, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
ell = lambda x_: float((bn.forward(x_, True) * dy).sum())     # train mode: batch statistics
ell0 = ell(x)
D = float((bn.backward(dy) * v).sum())                         # the exact directional derivative

eps64 = np.finfo(np.float64).eps
hs = 10.0 ** -np.arange(1, 11.5, 0.5)
measured = np.array([abs((ell(x + h * v) - ell(x - h * v)) / (2 * h) - D) / abs(D) for h in hs])
i2 = int(np.argmin(abs(hs - 1e-2)))
truncation = measured[i2] * (hs / hs[i2]) ** 2
rounding = eps64 * abs(ell0) / (hs * abs(D))

print(f"{'h':>8s} {'measured':>10s} {'truncation':>11s} {'rounding':>10s}")
for h, m, t, r in zip(hs, measured, truncation, rounding):
    if np.isclose(np.log10(h) % 1, 0):                          # whole decades only
        print(f"{h:8.0e} {m:10.1e} {t:11.1e} {r:10.1e}")

fig, ax = plt.subplots(figsize=(7, 4.5))
ax.loglog(hs, measured, "o-", label="measured relative error")
ax.loglog(hs, truncation, "--", label=r"truncation $\propto h^2$")
ax.loglog(hs, rounding, ":", lw=2, label=r"rounding $\approx \varepsilon|\ell|/(h|D|)$")
ax.axvline(1e-6, color="gray", lw=1)
ax.text(1.3e-6, measured.max(), "h = 1e-6\n(the checks)", va="top", fontsize=9)
ax.set(xlabel="step h of the central difference", ylabel="relative error of the directional derivative",
       title="BatchNorm (train mode) input check in float64: error vs h")
ax.legend(loc="lower right")
plt.tight_layout()
plt.show()

k = int(np.argmin(abs(hs - 1e-6)))
h_cross = (rounding[0] * hs[0] / (truncation[0] / hs[0] ** 2)) ** (1 / 3)   # where the lines meet
print(f"at h = 1e-6: measured {measured[k]:.1e}, truncation alone would give {truncation[k]:.1e}, "
      f"rounding estimate {rounding[k]:.1e}; the two lines cross at h = {h_cross:.0e} "
      f"(eps^(1/3) = {eps64 ** (1 / 3):.0e})")
assert measured[k] > 10 * truncation[k]      # h = 1e-6 is in the rounding regime
assert measured[k] < 1e-8                    # and still agrees far better than a bug would

# %% [markdown]
# The table and the plot show the two regimes: for large $h$ the measured error follows the
# $h^2$ line, for small $h$ the $1/h$ line, and the $h = 10^{-6}$ that every check below uses sits
# on the **rounding** side, where the truncation error is orders of magnitude smaller (the last
# line above prints both). So the relative errors printed below say how much rounding there
# was, not how accurate the central difference is; a bug in a backward would show as an error
# of order one, not $10^{-9}$.
#
# **Try this.** Rerun the sweep in float32: build `x`, `dy`, `v` and the batch norm's
# parameters with `.astype(np.float32)` (and skip `to64`), and use `eps32 = np.finfo(np.float32).eps`
# for the rounding line.
#
# <details><summary>What to expect</summary>
#
# The rounding line moves up by $\varepsilon_{32}/\varepsilon_{64} \approx 5\cdot10^{8}$, the
# truncation line stays where it was, so the crossing (the best $h$) moves up by about three
# decades, since it scales like $\varepsilon^{1/3}$, and the best error you can reach is many
# orders of magnitude worse. At $h = 10^{-6}$ the finite difference is mostly rounding noise. That is why
# `to64` casts every layer before a check.
# </details>


# %% [markdown]
# ## 1. Convolution
#
# A 2-D convolution (no bias, as in the WideResnet) with stride $s$:
#
# $$
# y_{n,i,j,o} = \sum_{a,b,c} x^{pad}_{n,\, is+a,\, js+b,\, c}\; k_{a,b,c,o}.
# $$
#
# The padding is XLA's `SAME`: the output has $\lceil \text{in}/s\rceil$ pixels and the total
# padding $\max((\text{out}-1)s + k - \text{in}, 0)$ is split with the smaller half *before*. A
# stride-2 $3\times3$ conv on an even input therefore pads 0 before and 1 after, not 1 and 1,
# one of the details that must match the JAX code to the last bit:

# %%
for size, k, s in [(32, 3, 1), (32, 3, 2), (7, 3, 2)]:
    low, high, out = same_padding(size, k, s)
    print(f"input {size:2d}, kernel {k}, stride {s}: pad {low} before, {high} after -> output {out}")
print()
print(inspect.getsource(conv2d_loop))

# %% [markdown]
# The loop form is the definition, one output pixel at a time. Its backward is the chain rule
# on that one line: output pixel $(i, j)$ read the patch $x^{pad}_{:, is:is+k_h, js:js+k_w, :}$, so
#
# $$
# \frac{\partial L}{\partial k_{a,b,c,o}} = \sum_{n,i,j} x^{pad}_{n,is+a,js+b,c}\,\bar y_{n,i,j,o},
# \qquad
# \frac{\partial L}{\partial x^{pad}_{n,is+a,js+b,c}} \mathrel{+}= \sum_o k_{a,b,c,o}\,\bar y_{n,i,j,o},
# $$
#
# and the padding is cut off at the end.

# %%
print(inspect.getsource(conv2d_loop_backward))

# %% [markdown]
# ### im2col: the same sums as one matrix product
#
# Copy every receptive field (the $k_h \times k_w \times C$ patch an output pixel reads) into one
# row of a matrix `cols` of shape $[N \cdot H_{out} \cdot W_{out},\; k_h k_w C]$. Then the whole
# convolution is one GEMM, `cols @ kernel.reshape(kh*kw*C, out)`, which BLAS runs at full speed.
# The picture below is `im2col` of a $4\times4$ one-channel image with pixels numbered 1 to 16,
# a $3\times3$ kernel and SAME padding (zeros shown as blanks): row $r$ is the patch of output pixel
# $r$.

# %%
print(inspect.getsource(im2col))

img = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
low, high, out = same_padding(4, 3, 1)
xpad = np.pad(img, ((0, 0), (low, high), (low, high), (0, 0)))
cols = im2col(xpad, 3, 3, 1, out, out).reshape(-1, 9)

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 5), gridspec_kw={"width_ratios": [1, 1.3]})
a.imshow(xpad[0, :, :, 0] > 0, cmap="Blues", vmin=0, vmax=2)
for (i, j), v in np.ndenumerate(xpad[0, :, :, 0]):
    a.text(j, i, f"{v:.0f}" if v else "", ha="center", va="center")
a.set(title="padded image (SAME, pad 1)", xlabel="column", ylabel="row", xticks=[], yticks=[])
b.imshow(cols > 0, cmap="Blues", vmin=0, vmax=2, aspect="auto")
for (i, j), v in np.ndenumerate(cols):
    b.text(j, i, f"{v:.0f}" if v else "", ha="center", va="center", fontsize=8)
b.set(title="im2col: one row per output pixel", xlabel="(a, b) position in the 3x3 window",
      ylabel="output pixel", xticks=range(9), yticks=range(16))
plt.tight_layout()
plt.show()

# %% [markdown]
# `Conv.forward` is im2col plus one GEMM. It calls `im2col_strided`, which builds the same
# matrix as one copy out of a strided *view* of the padded input (the view's strides step
# through each pixel kh*kw times; no data moves until the copy), faster than the nine slice
# copies above because NumPy then copies kw*C contiguous floats at a time instead of C
# (the tests hold the two equal).
#
# `Conv.backward` starts with one more GEMM, the kernel gradient
# $\partial L/\partial k = \text{cols}^\top \bar y$. For the input gradient it takes one of two routes:
#
# * **stride 2** (and any stride above 1): a GEMM $\partial L/\partial\,\text{cols} = \bar y\, k^\top$,
#   then `col2im`, the adjoint of the im2col copy, which adds every row back onto the pixels it
#   came from (pixels read by several windows collect several contributions);
# * **stride 1**: no col2im at all. `_input_grad_as_conv` computes $\partial L/\partial x$ as a
#   *convolution* of $\bar y$ with the kernel flipped in space and transposed in channels, the
#   classic "the backward of a convolution is a convolution" (next subsection).

# %%
print(inspect.getsource(Conv.forward))
print(inspect.getsource(Conv.backward))
print(inspect.getsource(Conv._input_grad_as_conv))

# %% [markdown]
# ### The backward of a convolution is a convolution
#
# At stride 1 the forward reads $y_{n,i,j,o} = \sum_{a,b,c} x^{pad}_{n,i+a,j+b,c}\,k_{a,b,c,o}$, so the
# chain rule gives, for every padded input pixel $(p, q)$,
#
# $$
# \frac{\partial L}{\partial x^{pad}_{n,p,q,c}} = \sum_{a,b,o} \bar y_{n,\,p-a,\,q-b,\,o}\; k_{a,b,c,o}
# \qquad(\text{terms with } p-a \text{ or } q-b \text{ outside } \bar y \text{ are zero}).
# $$
#
# Substitute $a' = k_h-1-a$, $b' = k_w-1-b$: the sum becomes
# $\sum_{a',b',o} \bar y^{full}_{n,\,p+a',\,q+b',\,o}\; \tilde k_{a',b',o,c}$, where
#
# * $\bar y^{full}$ is $\bar y$ with $k-1$ rows and columns of zeros on each side ("full" padding),
# * $\tilde k_{a',b',o,c} = k_{k_h-1-a',\,k_w-1-b',\,c,\,o}$ is the kernel **rotated by 180 degrees**
#   (`k[::-1, ::-1]`) with its **in and out channels swapped** (`.transpose(0, 1, 3, 2)`).
#
# That is an ordinary stride-1 convolution of $\bar y$ with $\tilde k$, with $C_{out}$ channels in and
# $C_{in}$ out. Cutting the padding off $\partial L/\partial x^{pad}$ afterwards is the same as padding
# $\bar y$ by $k-1-\text{pad}$ instead of $k-1$ on each side: the "padding mirrored" of the docstring.
# For an odd kernel with SAME padding, $\text{pad} = (k-1)/2$ on both sides, which is its own
# mirror, so the backward is literally `conv2d_loop(dy, flipped)`, the same SAME convolution.
#
# Why only at stride 1? At stride $s$ an output pixel moves $s$ input pixels, so the same
# derivation needs $\bar y$ *dilated*, $s-1$ zeros inserted between its entries (a "transposed
# convolution"); at stride 2 three quarters of the products would be with those zeros, so minisam
# scatters with `col2im` there instead. At stride 1 the flipped-kernel form wins because an im2col
# copy is cheaper than col2im's overlapping additions.

# %% [markdown]
# ### Exercise 1: the conv input gradient as a convolution
#
# Write `my_conv_input_grad(dy, kernel)`: the input gradient $\partial L/\partial x$ of a stride-1,
# SAME convolution with an odd square kernel `kernel` (HWIO, `[k, k, C_in, C_out]`), given
# `dy` $= \partial L/\partial y$ (`[N, H, W, C_out]`). Build the flipped, channel-swapped kernel and
# call `conv2d_loop` (it pads SAME itself). It is graded against minisam's `Conv` layer's
# `backward`, for $3\times3$, $1\times1$ and $5\times5$ kernels.
#
# Hint: a HWIO kernel for a convolution from $C_{out}$ to $C_{in}$ channels has shape
# `[k, k, C_out, C_in]`.

# %% tags=["exercise"]
def my_conv_input_grad(dy, kernel):
    # YOUR CODE HERE (two lines: the flipped kernel, then one conv2d_loop call)
    raise NotImplementedError


# %%
def conv_layer_input_grad(dy, kernel):
    """The reference: minisam's Conv layer, forward on an input of the right shape, then backward."""
    conv = Conv(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride=1)
    conv.params["kernel"] = kernel
    conv.forward(np.zeros(dy.shape[:3] + kernel.shape[2:3]))   # dx does not depend on x
    return conv.backward(dy)


rng = np.random.default_rng(10)
conv_cases = [(rng.standard_normal((2, 6, 6, 4)), rng.standard_normal((3, 3, 3, 4))),
              (rng.standard_normal((2, 5, 5, 6)), rng.standard_normal((1, 1, 2, 6))),
              (rng.standard_normal((1, 7, 7, 3)), rng.standard_normal((5, 5, 4, 3)))]
check("Exercise 1 (conv input gradient)", my_conv_input_grad, conv_layer_input_grad, conv_cases)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_conv_input_grad_solution(dy, kernel):
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)    # rotate 180 degrees, swap in/out
    return conv2d_loop(dy, flipped, 1)


check("Exercise 1, solution", my_conv_input_grad_solution, conv_layer_input_grad, conv_cases)

# %% [markdown]
# The three forms of the stride-1 input gradient, side by side in float64: the loop form (the
# chain rule one output pixel at a time), GEMM + `col2im` (the route minisam takes at stride 2,
# written out here for stride 1), and the flipped-kernel convolution (the solution above, and
# what `Conv.backward` runs). They agree to float64 rounding:

# %%
rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())   # relative to the largest entry
rng = np.random.default_rng(11)
x = rng.standard_normal((2, 6, 6, 3))
kernel = rng.standard_normal((3, 3, 3, 4))
dy = rng.standard_normal((2, 6, 6, 4))
dx_loop, _ = conv2d_loop_backward(x, kernel, dy, 1)
low, high, _ = same_padding(6, 3, 1)
dcols = dy.reshape(-1, 4) @ kernel.reshape(-1, 4).T                  # [N*H*W, kh*kw*C_in]
dxpad = col2im(dcols.reshape(2, 6, 6, 3, 3, 3), (2, 6 + low + high, 6 + low + high, 3), 1)
dx_col2im = dxpad[:, low:low + 6, low:low + 6, :]
dx_flip = my_conv_input_grad_solution(dy, kernel)
dx_layer = conv_layer_input_grad(dy, kernel)
for name, d in [("GEMM + col2im", dx_col2im), ("flipped-kernel conv", dx_flip), ("Conv.backward", dx_layer)]:
    print(f"{name:20s} vs the loop form: max relative difference {rel(d, dx_loop):.1e}")
    assert rel(d, dx_loop) < 1e-12

# %% [markdown]
# The two forms agree to float32 rounding (errors relative to each array's largest entry), forward and backward, for both strides. Then a timing: what the single GEMM buys depends on the shape and on the machine's BLAS (the loop pays Python's overhead once per output pixel):

# %%
rng = np.random.default_rng(0)
for stride in (1, 2):
    x = rng.standard_normal((4, 12, 12, 8)).astype(np.float32)
    conv = Conv(8, 16, 3, stride, rng)
    y = conv.forward(x)
    y_loop = conv2d_loop(x, conv.params["kernel"], stride)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = conv.backward(dy)
    dx_loop, dk_loop = conv2d_loop_backward(x, conv.params["kernel"], dy, stride)
    print(f"stride {stride}: y {tuple(y.shape)}, relative differences loop vs im2col: y {rel(y, y_loop):.1e}, "
          f"dx {rel(dx, dx_loop):.1e}, dkernel {rel(conv.grads['kernel'], dk_loop):.1e}")

def best_ms(f, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


for shape, cout in [((8, 32, 32, 16), 32), ((8, 16, 16, 64), 64)]:
    x = rng.standard_normal(shape).astype(np.float32)
    conv = Conv(shape[-1], cout, 3, 1, rng)
    print(f"{'x'.join(map(str, shape))} -> {cout} channels: im2col + GEMM {best_ms(lambda: conv.forward(x)):5.1f} ms, "
          f"loop {best_ms(lambda: conv2d_loop(x, conv.params['kernel'], 1)):5.1f} ms")

# %% [markdown]
# And the finite-difference check of the fast form, with and without stride (7 is odd, so the stride-2 case pads 1 before and 1 after):

# %%
rng = np.random.default_rng(1)
check_layer("Conv 3x3 stride 1", Conv(3, 4, 3, 1, rng), rng.standard_normal((2, 6, 6, 3)))
check_layer("Conv 3x3 stride 2", Conv(3, 4, 3, 2, rng), rng.standard_normal((2, 6, 6, 3)))
check_layer("Conv 3x3 stride 2, odd input", Conv(3, 4, 3, 2, rng), rng.standard_normal((2, 7, 7, 3)))

# %% [markdown]
# ## 2. Batch normalisation
#
# In training mode, per channel, over the $M = N \cdot H \cdot W$ positions (flax's semantics,
# biased variance, $\varepsilon = 10^{-5}$):
#
# $$
# \mu = \tfrac1M\textstyle\sum x,\qquad \sigma^2 = \tfrac1M\sum x^2 - \mu^2,\qquad
# \hat x = \frac{x-\mu}{\sqrt{\sigma^2+\varepsilon}},\qquad y = \gamma\,\hat x + \beta .
# $$
#
# The backward is the one derivation in this notebook worth doing on paper once. $\beta$ and
# $\gamma$ are easy: $\partial L/\partial\beta = \sum \bar y$, $\partial L/\partial\gamma = \sum \bar y\,\hat x$.
# For $x$, every $\hat x$ depends on every $x$ of its channel through $\mu$ and $\sigma^2$; summing
# the three paths gives
#
# $$
# \frac{\partial L}{\partial x} = \frac{\gamma}{M\sqrt{\sigma^2+\varepsilon}}
# \Big(M\,\bar y - \textstyle\sum \bar y - \hat x \sum \bar y\,\hat x\Big),
# $$
#
# which reuses the two parameter gradients. In eval mode $\mu, \sigma^2$ are the running
# statistics, constants, and $\partial L/\partial x = \bar y\,\gamma/\sqrt{\sigma^2+\varepsilon}$.

# %% [markdown]
# ### Exercise 2: batch norm's backward
#
# Write `my_batchnorm_backward(x, dy, scale, eps)`: for training-mode batch norm of an NHWC
# input `x` (statistics over the axes $N, H, W$, one per channel), given the upstream gradient
# `dy` and the per-channel `scale` $\gamma$, return the tuple `(dx, dscale, dbias)`, i.e.
# $\partial L/\partial x$, $\partial L/\partial\gamma$ and $\partial L/\partial\beta$ (the bias $\beta$ does
# not enter any of them). Use the formulas above. It is graded against minisam's `BatchNorm`
# layer (`forward(x, train=True)`, then `backward(dy)`), before we read its source.
#
# Hints: `axes = (0, 1, 2)`; the biased variance (`x.var(axis=axes)` is biased); $M$ is
# `x.size // x.shape[-1]`; per-channel arrays of shape `[C]` broadcast against `[N, H, W, C]`.

# %% tags=["exercise"]
def my_batchnorm_backward(x, dy, scale, eps=1e-5):
    # YOUR CODE HERE (about six lines: mu, var and x-hat, then dbias, dscale and dx)
    raise NotImplementedError


# %%
def bn_layer_backward(x, dy, scale, eps=1e-5):
    """The reference: minisam's BatchNorm layer in training mode."""
    bn = BatchNorm(x.shape[-1], eps=eps)
    bn.params = {"scale": scale, "bias": np.zeros_like(scale)}
    bn.forward(x, train=True)
    dx = bn.backward(dy)
    return dx, bn.grads["scale"], bn.grads["bias"]


rng = np.random.default_rng(12)
bn_cases = [(3 + 2 * rng.standard_normal((4, 3, 3, 5)), rng.standard_normal((4, 3, 3, 5)),
             rng.uniform(0.5, 1.5, 5)),
            (rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((2, 4, 4, 3)), rng.uniform(0.5, 1.5, 3), 1e-3),
            (rng.standard_normal((8, 1, 1, 6)), rng.standard_normal((8, 1, 1, 6)), rng.uniform(0.5, 1.5, 6))]
check("Exercise 2 (batch norm backward)", my_batchnorm_backward, bn_layer_backward, bn_cases)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_batchnorm_backward_solution(x, dy, scale, eps=1e-5):
    axes = (0, 1, 2)
    m = x.size // x.shape[-1]
    mu, var = x.mean(axis=axes), x.var(axis=axes)             # biased variance
    xhat = (x - mu) / np.sqrt(var + eps)
    dbias, dscale = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    dx = scale / (m * np.sqrt(var + eps)) * (m * dy - dbias - xhat * dscale)
    return dx, dscale, dbias


check("Exercise 2, solution", my_batchnorm_backward_solution, bn_layer_backward, bn_cases)

# %% [markdown]
# The code computes exactly this, rearranged for speed: expanding the bracket gives
# $\partial L/\partial x = a\,\bar y - b\,(x-\mu) - c$ with per-channel
# $a = \gamma/\sqrt{\sigma^2+\varepsilon}$, $b = a\sum\bar y\,\hat x / (M\sqrt{\sigma^2+\varepsilon})$ and
# $c = a\sum\bar y/M$: three passes over the data, and $\hat x$ is never stored
# (`batchnorm_reference_backward` in the same file is the formula as written, and the tests
# hold the two equal).

# %%
print(inspect.getsource(BatchNorm.backward))
rng = np.random.default_rng(2)
bn = BatchNorm(5)
bn.params = {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.standard_normal(5)}
x = 3 + 2 * rng.standard_normal((4, 3, 3, 5))
check_layer("BatchNorm, train mode", bn, x, train=True)
bn.state = {"mean": rng.standard_normal(5), "var": rng.uniform(0.5, 2, 5)}
check_layer("BatchNorm, eval mode", bn, x, train=False)

# %% [markdown]
# ## 3. ReLU
#
# $y = \max(x, 0)$ and $\partial L/\partial x = \bar y\cdot[x > 0]$: the mask saved by forward
# (source at the top). The check is fine as long as no input lies within $h$ of the kink, where
# the function is not differentiable and a finite difference straddles two slopes; with random
# normal inputs and $h = 10^{-6}$ the chance is about $10^{-6}$ per entry. Notebook 03 meets the
# float32 version of this problem in a real network: one ReLU input out of about a million sits
# within rounding of zero, and it matters.

# %%
rng = np.random.default_rng(3)
x = rng.standard_normal((2, 4, 4, 3))
print("closest input to the kink:", np.abs(x).min())
check_layer("ReLU", ReLU(), x)

# %% [markdown]
# **Try this.** Put one input right at the kink, `x[0, 0, 0, 0] = 1e-7` (closer to zero than
# $h = 10^{-6}$), and run `check_layer("ReLU at the kink", ReLU(), x)` in a new cell.
#
# <details><summary>What to expect</summary>
#
# The check fails by orders of magnitude: `backward` says that entry's gradient is
# $\bar y$ (the input is positive), but $x \pm hv$ lands on both sides of zero for that entry,
# so the finite difference sees roughly the average of the two slopes there. Neither side is
# wrong; the function has no derivative at the kink, and the check only holds where it has one.
# (Add it to `RESULTS` and the final `assert` would fail, which is why it is not run here.)
# </details>

# %% [markdown]
# ## 4. Pooling and the residual shortcut
#
# * `AvgPool(s)`: the mean over non-overlapping $s\times s$ windows. Backward spreads each output
#   gradient evenly: $\bar y/s^2$ to each pixel of its window.
# * `Shortcut`: when a residual block changes the number of channels, the WideResnet's
#   shortcut average-pools by the stride and appends zero channels. Backward drops the gradient
#   of the padded channels, then runs the pool's backward.
# * `GlobalAvgPool`: the mean over $H, W$ before the classifier; backward broadcasts
#   $\bar y/(HW)$.

# %%
print(inspect.getsource(Shortcut))
rng = np.random.default_rng(4)
check_layer("AvgPool 2x2", AvgPool(2), rng.standard_normal((2, 6, 6, 3)))
check_layer("Shortcut (pool 2, 3 -> 5 channels)", Shortcut(2, 5), rng.standard_normal((2, 6, 6, 3)))
check_layer("GlobalAvgPool", GlobalAvgPool(), rng.standard_normal((2, 5, 5, 3)))

# %% [markdown]
# ## 5. Dense
#
# $y = xK + b$ with $K$ of shape $[\text{in}, \text{out}]$:
# $\partial L/\partial K = x^\top \bar y$, $\partial L/\partial b = \sum_n \bar y_n$,
# $\partial L/\partial x = \bar y K^\top$.

# %%
print(inspect.getsource(Dense.backward))
rng = np.random.default_rng(5)
dense = Dense(6, 4, rng)
dense.params["bias"] = rng.standard_normal(4).astype(np.float32)
check_layer("Dense", dense, rng.standard_normal((3, 6)))

# %% [markdown]
# ## 6. Softmax cross-entropy
#
# With logits $z \in \mathbb R^{B\times K}$, one-hot labels $y$ and label smoothing $s$ (targets
# $y' = (1-s)\,y + s/K$, each row summing to one):
#
# $$
# \mathcal L = -\frac1B \sum_{n,k} y'_{nk} \log \operatorname{softmax}(z_n)_k,
# \qquad
# \frac{\partial\mathcal L}{\partial z} = \frac{\operatorname{softmax}(z) - y'}{B}.
# $$
#
# (Differentiate $\log\operatorname{softmax}(z)_k = z_k - \log\sum_j e^{z_j}$: the first term
# gives $-y'$, the second $\operatorname{softmax}(z)\sum_k y'_k = \operatorname{softmax}(z)$.)
# The loss is the start of backprop, so it returns the loss and $\partial\mathcal L/\partial z$
# together, and its check is of a scalar function:

# %%
print(inspect.getsource(softmax_cross_entropy))
rng = np.random.default_rng(6)
z = 3 * rng.standard_normal((5, 10))
onehot = one_hot(rng.integers(0, 10, 5), 10, dtype="float64")
for ls in (0.0, 0.1):
    loss, dz = softmax_cross_entropy(z, onehot, ls)
    v, h = rng.standard_normal(z.shape), 1e-6
    numeric = (softmax_cross_entropy(z + h * v, onehot, ls)[0] - softmax_cross_entropy(z - h * v, onehot, ls)[0]) / (2 * h)
    exact = float((dz * v).sum())
    rel = abs(exact - numeric) / abs(numeric)
    RESULTS.append((f"cross-entropy, smoothing {ls}: logits", rel))
    print(f"label smoothing {ls}: loss {loss:.6f}, directional derivative {exact:+.10e} vs {numeric:+.10e}, rel err {rel:.1e}")

# %% [markdown]
# ## 7. Putting them together: a residual block, then the whole network
#
# A composite layer spells out its own backward in reverse order of its forward. In a residual
# block $y = \text{branch}(x) + \text{shortcut}(x)$, the upstream gradient flows unchanged into
# **both** paths, and the two gradients are **added** where the paths started. In the first block
# of the WideResnet (`activate_before_residual`) both paths start after the first BN + ReLU, so
# the sum is taken before that BN + ReLU's backward; in the other blocks the shortcut carries the
# raw input and the sum is taken at the input.

# %%
print(inspect.getsource(WideResnetBlock.backward))
rng = np.random.default_rng(7)
check_layer("Block (stride 2, 4 -> 6 channels)", WideResnetBlock(4, 6, stride=2, rng=rng),
            rng.standard_normal((2, 8, 8, 4)))
check_layer("Block (activate_before_residual)", WideResnetBlock(4, 4, activate_before_residual=True, rng=rng),
            rng.standard_normal((2, 6, 6, 4)))

# %% [markdown]
# Finally the whole WideResnet (WRN-10-1 here: one block per group, width 16/16/32/64) with its
# loss on a batch of two $8\times8$ images, in float64. The gradient of the loss with respect to
# *all* parameters at once is checked along one random direction in the 75,290-dimensional
# parameter space: the directional derivative is $\sum_k\langle g_k, v_k\rangle$ over every
# parameter array $k$. This is the gradient SAM uses, twice per step.

# %%
rng = np.random.default_rng(8)
model = to64(WideResnet(1, 1, num_outputs=10, seed=0))
params = model.get_params()
print(f"WideResnet(1, 1, 10): {model.num_params():,} parameters in {len(params)} arrays")
assert model.num_params() == 75_290
x = rng.standard_normal((2, 8, 8, 3))
onehot = one_hot(np.array([3, 7]), 10, dtype="float64")


def loss_at(p):
    model.set_params(p)
    return softmax_cross_entropy(model.forward(x, train=True), onehot)[0]


model.set_params(params)
loss, dlogits = softmax_cross_entropy(model.forward(x, train=True), onehot)
model.backward(dlogits)
grads = model.get_grads()
v = {k: rng.standard_normal(p.shape) for k, p in params.items()}
h = 1e-6
numeric = (loss_at({k: p + h * v[k] for k, p in params.items()}) -
           loss_at({k: p - h * v[k] for k, p in params.items()})) / (2 * h)
exact = sum(float((grads[k] * v[k]).sum()) for k in params)
rel = abs(exact - numeric) / abs(numeric)
RESULTS.append(("WideResnet + loss: all params", rel))
print(f"loss {loss:.6f}; directional derivative: backward {exact:+.10e}, finite diff {numeric:+.10e}, rel err {rel:.1e}")

# %% [markdown]
# ## Summary

# %%
names, errs = zip(*RESULTS)
fig, ax = plt.subplots(figsize=(9, 0.2 * len(names) + 1))
ax.barh(range(len(names)), errs, color="C0")
ax.set_xscale("log")
ax.axvline(1e-6, color="C3", ls="--", lw=1, label="the test suite's tolerance, 1e-6")
ax.set_yticks(range(len(names)), names, fontsize=8)
ax.invert_yaxis()
ax.set(xlabel="relative error of the directional derivative (float64, h = 1e-6)",
       ylabel="gradient checked (layer: tensor)",
       title=f"Every gradient check of this notebook: {len(names)} checks, worst {max(errs):.1e}")
ax.legend(loc="best")
plt.tight_layout()
plt.show()
print(f"{len(names)} checks: median relative error {np.median(errs):.1e}, worst {max(errs):.1e} ({names[int(np.argmax(errs))]})")
assert max(errs) < 1e-6

# %% [markdown]
# Every backward agrees with finite differences within the test suite's tolerance (asserted
# above; the line above prints the median and the worst), and, as the deep dive on $h$ showed,
# what is left is rounding in the finite difference, not a difference in the gradients. The
# same checks run in `tests/test_layers.py` and `tests/test_model.py` on every commit.
#
# ## Recap
#
# * Every minisam layer is a `forward` that keeps what it needs and a hand-written `backward`;
#   a directional-derivative check in float64, one pair of forward passes per tensor, tests it.
# * At $h = 10^{-6}$ in float64 the check's error is rounding ($\approx\varepsilon|\ell|/h$), not the
#   $O(h^2)$ truncation of the central difference; in float32 rounding would swamp it.
# * A convolution is im2col + GEMM. Its input gradient at stride 1 is itself a convolution, of
#   $\bar y$ with the kernel rotated by 180 degrees and its channels swapped (Exercise 1); at
#   stride 2 minisam uses a GEMM and `col2im` instead.
# * Batch norm's backward couples every position of a channel through $\mu$ and $\sigma^2$; it
#   reuses $\partial L/\partial\beta$ and $\partial L/\partial\gamma$ (Exercise 2).
# * A residual block adds the gradients of its two paths where they meet; the whole network's
#   gradient, the one SAM takes twice per step, passes the same check.
#
# **Next:** [notebook 03 · One SAM step, step by step](03_sam_step_by_step.ipynb) runs these
# layers in float32 on a real WideResnet and compares every intermediate of a SAM step with the
# original JAX code.

"""Every layer: float64 finite-difference checks of input and parameter gradients."""
import numpy as np
import pytest

from minisam.nn import (AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut,
                        conv2d_loop, conv2d_loop_backward, same_padding, softmax_cross_entropy)
from minisam.backend import workspace
from minisam.nn.batchnorm import batchnorm_reference, batchnorm_reference_backward
from minisam.nn.conv import im2col, im2col_strided, zero_pad
from minisam.nn.loss import error_rate, one_hot
from tests.gradcheck import directional_check


def layer_check(layer, x, rng, train=True, rtol=1e-6):
    layer.params = {k: v.astype(np.float64) for k, v in layer.params.items()}
    layer.state = {k: v.astype(np.float64) for k, v in layer.state.items()}
    state0 = dict(layer.state)

    def forward(inp):
        layer.state = dict(state0)
        layer.params = {k: inp[k] for k in layer.params}
        return layer.forward(inp["x"], train)

    def grads(inp, dy):
        forward(inp)
        dx = layer.backward(dy)
        return dict(layer.grads, x=dx)

    directional_check(forward, grads, dict(layer.params, x=x), rng, rtol=rtol)


@pytest.mark.parametrize("stride,size,k", [(1, 6, 3), (2, 6, 3), (2, 7, 3), (3, 8, 3), (1, 5, 1)])
def test_conv_gradients(stride, size, k):
    rng = np.random.default_rng(0)
    layer = Conv(3, 4, k, stride, rng)
    layer_check(layer, rng.standard_normal((2, size, size, 3)), rng)


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 6), (2, 7), (3, 8)])
def test_fast_conv_matches_loop_conv(stride, size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, size, size, 3))
    layer = Conv(3, 5, 3, stride, rng)
    k = layer.params["kernel"] = layer.params["kernel"].astype(np.float64)
    y = layer.forward(x)
    np.testing.assert_allclose(y, conv2d_loop(x, k, stride), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    dx_loop, dk_loop = conv2d_loop_backward(x, k, dy, stride)
    np.testing.assert_allclose(dx, dx_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["kernel"], dk_loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (4, 4, 2), (3, 5, 2), (3, 5, 1)])
def test_conv_backward_reuses_the_cols_buffer_when_it_is_large_enough(cin, cout, stride,
                                                                       monkeypatch):
    """The input gradient's im2col matrix goes into the forward's cols buffer (free once
    the kernel gradient has read it) when that is large enough: no cols-sized workspace
    then; the results stay those of the loop convolution, step after step."""
    import minisam.nn.conv as conv_mod
    asked = []
    real = conv_mod.workspace
    monkeypatch.setattr(conv_mod, "workspace", lambda shape, like: asked.append(shape) or
                        real(shape, like))
    rng = np.random.default_rng(2)
    layer = Conv(cin, cout, 3, stride, rng, keep_cols=True)
    k = layer.params["kernel"] = layer.params["kernel"].astype(np.float64)
    for _ in range(2):
        x = rng.standard_normal((2, 6, 6, cin))
        y = layer.forward(x)
        dy = rng.standard_normal(y.shape)
        asked.clear()
        dx = layer.backward(dy)
        dx_loop, dk_loop = conv2d_loop_backward(x, k, dy, stride)
        np.testing.assert_allclose(dx, dx_loop, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grads["kernel"], dk_loop, rtol=1e-12, atol=1e-12)
        big = [s for s in asked if int(np.prod(s)) >= y.shape[0] * y.shape[1] * y.shape[2] * 9 * cin]
        assert (big == []) == (stride == 2 or cin >= cout), asked


@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (4, 4, 2), (3, 5, 1), (5, 3, 2)])
def test_conv_rebuilding_cols_in_backward_gives_the_bits_of_keeping_them(cin, cout, stride):
    """keep_cols=False keeps only the input and builds the im2col matrix again for dW:
    the same output, kernel gradient and input gradient, bit for bit, step after step,
    with no per-layer cols buffer."""
    rng = np.random.default_rng(6)
    kept, rebuilt = (Conv(cin, cout, 3, stride, np.random.default_rng(1), keep_cols=keep)
                     for keep in (True, False))
    for _ in range(2):
        x = rng.standard_normal((2, 7, 7, cin)).astype(np.float32)
        y_ref = kept.forward(x)
        y = rebuilt.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(rebuilt.backward(dy), kept.backward(dy))
        np.testing.assert_array_equal(rebuilt.grads["kernel"], kept.grads["kernel"])
    assert "cols" in kept._buffers and "cols" not in rebuilt._buffers


@pytest.mark.parametrize("stride,size,k", [(1, 6, 3), (2, 6, 3), (2, 7, 3), (3, 8, 3), (1, 5, 1)])
def test_strided_im2col_is_the_slice_copy(stride, size, k):
    """The fast im2col (one copy of a strided view) gives the slice-by-slice matrix exactly."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, size, size, 3))
    oh = -(-(size - k + 1) // stride)   # VALID output size of the already padded input
    plain = im2col(x, k, k, stride, oh, oh)
    np.testing.assert_array_equal(im2col_strided(x, k, k, stride, oh, oh), plain)
    out = np.full_like(plain, np.nan)
    assert im2col_strided(x, k, k, stride, oh, oh, out) is out
    np.testing.assert_array_equal(out, plain)


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 1, 0, 1), (2, 0, 1, 3), (0, 0, 0, 0)])
def test_zero_pad_into_a_dirty_workspace_equals_pad(pads):
    """The scratch form zeroes the border each time: a workspace left full of garbage by
    another user still gives exactly np.pad's result."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 4, 3))
    t, b, l, r = pads
    expected = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    workspace(expected.shape, x)[...] = 7.0
    np.testing.assert_array_equal(zero_pad(x, pads, scratch=True), expected)
    np.testing.assert_array_equal(zero_pad(x, pads), expected)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_fast_form_matches_the_formula(train):
    """BatchNorm's three-pass backward and single-pass statistics against the formulas
    written plainly (batchnorm_reference*), in float64."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5, 6)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    bn = BatchNorm(6)
    bn.params = {"scale": rng.uniform(0.5, 1.5, 6), "bias": rng.standard_normal(6)}
    bn.state = {"mean": rng.standard_normal(6), "var": rng.uniform(0.5, 2, 6)}
    scale, bias = bn.params["scale"], bn.params["bias"]
    given = (None, None) if train else (bn.state["mean"], bn.state["var"])
    y_ref, mean, var = batchnorm_reference(x, scale, bias, *given)
    y = bn.forward(x, train)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dx, dscale, dbias = bn.backward(dy)[...], bn.grads["scale"], bn.grads["bias"]
    for got, want in zip((dx, dscale, dbias),
                         batchnorm_reference_backward(x, dy, scale, mean, var, train=train)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_xla_same_padding():
    # stride 2, 3x3, even input: XLA pads 0 before and 1 after (not 1 and 1)
    assert same_padding(32, 3, 2) == (0, 1, 16)
    assert same_padding(32, 3, 1) == (1, 1, 32)
    assert same_padding(7, 3, 2) == (1, 1, 4)
    assert same_padding(8, 1, 1) == (0, 0, 8)


def test_stride2_conv_uses_asymmetric_padding():
    # A kernel that only looks at its top-left tap reads x[2i - pad_low, 2j - pad_low]:
    # with XLA SAME (pad_low = 0) that is x[2i, 2j].
    x = np.arange(2 * 6 * 6 * 1, dtype=np.float64).reshape(2, 6, 6, 1)
    layer = Conv(1, 1, 3, 2)
    layer.params["kernel"] = np.zeros((3, 3, 1, 1))
    layer.params["kernel"][0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(layer.forward(x)[..., 0], x[:, ::2, ::2, 0])


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradients(train):
    rng = np.random.default_rng(2)
    bn = BatchNorm(3)
    bn.params = {"scale": rng.uniform(0.5, 1.5, 3), "bias": rng.standard_normal(3)}
    bn.state = {"mean": rng.standard_normal(3), "var": rng.uniform(0.5, 2, 3)}
    layer_check(bn, rng.standard_normal((4, 3, 3, 3)) * 2 + 1, rng, train=train)


def test_batchnorm_flax_semantics():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 4, 2)) * 3 + 2
    bn = BatchNorm(2)
    y = bn.forward(x, train=True)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # biased variance
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.state["mean"], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.state["var"], 0.9 + 0.1 * var, rtol=1e-6)
    y_eval = bn.forward(x, train=False)
    np.testing.assert_allclose(y_eval, (x - bn.state["mean"]) / np.sqrt(bn.state["var"] + 1e-5),
                               rtol=1e-6)


def test_relu_gradient():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 4, 2))
    x[np.abs(x) < 1e-3] = 0.5   # keep the finite difference away from the kink
    layer_check(ReLU(), x, rng)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_backward_overwriting_dy_gives_the_same_bits(train):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((4, 5, 5, 6)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    plain, fast = BatchNorm(6), BatchNorm(6)
    for bn in (plain, fast):
        bn.params = {"scale": np.linspace(0.5, 1.5, 6, dtype=np.float32),
                     "bias": np.linspace(-1, 1, 6, dtype=np.float32)}
        bn.forward(x, train)
    dx_ref = plain.backward(dy)
    dy_own = dy.copy()
    dx = fast.backward(dy_own, overwrite=True)
    assert dx is dy_own
    np.testing.assert_array_equal(dx, dx_ref)
    for k in ("scale", "bias"):
        np.testing.assert_array_equal(fast.grads[k], plain.grads[k])


@pytest.mark.parametrize("size", [4, 5])
def test_avg_pool_gradient_and_values(size):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, size, size, 3))
    y = AvgPool(2).forward(x)
    np.testing.assert_allclose(y[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))
    layer_check(AvgPool(2), x, rng)


def test_shortcut_pools_then_pads_channels():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 4, 3))
    y = Shortcut(2, 5).forward(x)
    assert y.shape == (2, 2, 2, 5)
    np.testing.assert_allclose(y[..., :3], AvgPool(2).forward(x))
    assert not y[..., 3:].any()
    layer_check(Shortcut(2, 5), x, rng)
    layer_check(Shortcut(1, 6), x, rng)


def test_global_avg_pool_and_dense_gradients():
    rng = np.random.default_rng(7)
    layer_check(GlobalAvgPool(), rng.standard_normal((2, 3, 3, 4)), rng)
    dense = Dense(4, 3, rng)
    dense.params["bias"] = rng.standard_normal(3)
    layer_check(dense, rng.standard_normal((5, 4)), rng)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_softmax_cross_entropy_gradient(ls):
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 5)) * 3
    y = one_hot(np.array([0, 1, 2, 3, 4, 0]), 5, "float64")
    loss, d = softmax_cross_entropy(logits, y, ls)
    target = (1 - ls) * y + ls / 5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(loss, -(target * np.log(p)).sum() / 6, rtol=1e-12)
    v, h = rng.standard_normal(logits.shape), 1e-6
    num = (softmax_cross_entropy(logits + h * v, y, ls)[0] -
           softmax_cross_entropy(logits - h * v, y, ls)[0]) / (2 * h)
    np.testing.assert_allclose((d * v).sum(), num, rtol=1e-6)


def test_error_rate():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert error_rate(logits, np.array([1, 1, 1])) == pytest.approx(1 / 3)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="rank 4"):
        Conv(3, 4).forward(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="HWIO"):
        Conv(3, 4).forward(np.zeros((2, 8, 8, 5), np.float32))
    with pytest.raises(ValueError, match="channels"):
        BatchNorm(3).forward(np.zeros((2, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        Dense(4, 2).forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        softmax_cross_entropy(np.zeros((2, 3)), np.zeros((2, 4)))

"""The whole WideResnet: gradient check, parameter names and counts, bad input."""
import importlib

import numpy as np
import pytest

from minisam.models import WRN_PRESETS, WideResnet, parse_wrn_name, wide_resnet
from minisam.nn import one_hot, softmax_cross_entropy
from tests.gradcheck import directional_check


@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_wrn_gradient_check_float64(batch_norm):
    rng = np.random.default_rng(0)
    model = WideResnet(1, 1, num_outputs=3, in_channels=2, seed=1, batch_norm=batch_norm)
    params = {k: v.astype(np.float64) + 0.1 * rng.standard_normal(v.shape)
              for k, v in model.get_params().items()}
    state = {k: v.astype(np.float64) for k, v in model.get_state().items()}
    x = rng.standard_normal((3, 8, 8, 2))
    y = one_hot(np.array([0, 1, 2]), 3, "float64")

    def forward(inp):
        model.set_state(state)
        model.set_params({k: inp[k] for k in params})
        logits = model.forward(inp["x"], train=True)
        return np.asarray(softmax_cross_entropy(logits, y)[0])

    def grads(inp, dy):
        model.set_state(state)
        model.set_params({k: inp[k] for k in params})
        logits = model.forward(inp["x"], train=True)
        _, dlogits = softmax_cross_entropy(logits, y)
        dx = model.backward(dlogits * dy)
        return dict(model.get_grads(), x=dx)

    directional_check(forward, grads, dict(params, x=x), rng, rtol=1e-5)


def test_wrn28_10_parameter_count():
    assert wide_resnet("wrn28_10", num_outputs=100).num_params() == 36_278_324


def test_flax_parameter_names():
    names = set(WideResnet(1, 2, 10).get_params())
    assert "init_conv/kernel" in names and "Dense_3/kernel" in names
    assert "WideResnetGroup_2/WideResnetBlock_0/bn_2/scale" in names
    assert "pre-pool-bn/bias" in names
    assert set(WideResnet(1, 2, 10).get_state()) >= {"pre-pool-bn/mean", "pre-pool-bn/var"}


def test_initialisers_follow_jax():
    model = WideResnet(2, 4, 10, seed=3)
    k = model.get_params()["WideResnetGroup_1/WideResnetBlock_1/conv2/kernel"]  # 3x3x128x128
    assert np.abs(k).max() <= 2 * np.sqrt(2 / (9 * 128)) / 0.87962566103423978 + 1e-7
    np.testing.assert_allclose(k.std(), np.sqrt(2 / (9 * 128)), rtol=0.02)
    d = model.get_params()["Dense_3/kernel"]
    assert np.abs(d).max() <= 1 / np.sqrt(10) and d.std() > 0.25 / np.sqrt(10)
    assert not model.get_params()["Dense_3/bias"].any()


def test_presets_and_names():
    assert parse_wrn_name("WRN-28-10") == (4, 10) == WRN_PRESETS["wrn28_10"]
    assert parse_wrn_name("wrn16_8") == (2, 8)
    assert parse_wrn_name("wrn10x2") == (1, 2)
    for bad in ("resnet50", "wrn17_4", "wrn28"):
        with pytest.raises(ValueError, match="unknown model"):
            parse_wrn_name(bad)


def test_bad_input_raises_clear_errors():
    model = WideResnet(1, 1, 10)
    with pytest.raises(ValueError, match=r"NHWC.*\[N, H, W, 3\]"):
        model.forward(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model.forward(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="float32"):
        model.forward(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.forward(np.zeros((2, 30, 30, 3), np.float32))
    with pytest.raises(ValueError, match="positive integer"):
        WideResnet(0, 1, 10)
    with pytest.raises(ValueError, match="missing"):
        model.set_params({"init_conv/kernel": np.zeros((3, 3, 3, 16), np.float32)})
    params = model.get_params()
    params["init_conv/kernel"] = np.zeros((3, 3, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"expected shape \(3, 3, 3, 16\)"):
        model.set_params(params)


def test_the_bn_free_wide_resnet_has_no_bn_parameters_or_state():
    """The SAM paper's Hessian network (sec. 4.2): every BatchNorm replaced by an identity."""
    with_bn, without = WideResnet(1, 2, 10), WideResnet(1, 2, 10, batch_norm=False)
    bn_keys = {k for k in with_bn.get_params() if "bn" in k.split("/")[-2]}
    assert bn_keys and set(without.get_params()) == set(with_bn.get_params()) - bn_keys
    assert without.get_state() == {} and without.config["batch_norm"] is False
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert without.forward(x).shape == (2, 10)


def _pass(model, x, y, **backward_kw):
    """One train-mode forward and backward: (logits, dL/dx, the parameter gradients)."""
    logits = model.forward(x, train=True)
    dx = model.backward(softmax_cross_entropy(logits, y)[1], **backward_kw)
    return logits, dx, model.get_grads()


def _assert_same_bits(a, b):
    """Two _pass results equal bit for bit (a None dx only against a None dx)."""
    for got, want in zip(a[:2], b[:2]):
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_array_equal(got, want)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k], err_msg=k)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_bn_relu_backward_gives_the_bits_of_the_separate_layers(monkeypatch, batch_norm):
    """Each BatchNorm+ReLU pair's backward computes BN's dx in the ReLU's gradient
    (wide_resnet.bn_relu_backward); the two layer calls as written must give the same
    gradients and input gradient, bit for bit, with and without batch norm."""
    wrn = importlib.import_module("minisam.models.wide_resnet")  # the module, not the function
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    y = one_hot(np.array([0, 1, 2, 1]), 3)
    fast = _pass(WideResnet(1, 2, num_outputs=3, seed=2, batch_norm=batch_norm), x, y)
    monkeypatch.setattr(wrn, "bn_relu_backward", lambda bn, relu, d: bn.backward(relu.backward(d)))
    plain = _pass(WideResnet(1, 2, num_outputs=3, seed=2, batch_norm=batch_norm), x, y)
    _assert_same_bits(fast, plain)


def test_backward_without_the_input_gradient_gives_the_same_parameter_gradients():
    """Training asks for no dL/dimages (sam.loss_and_grad): the first conv then skips its
    input gradient, and every parameter gradient keeps its bits."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    y = one_hot(np.array([0, 2, 1]), 3)
    full = _pass(WideResnet(1, 1, num_outputs=3, seed=5), x, y, input_grad=True)
    short = _pass(WideResnet(1, 1, num_outputs=3, seed=5), x, y, input_grad=False)
    assert full[1] is not None and short[1] is None
    _assert_same_bits(full[:1] + (None,) + full[2:], short)


def test_a_wide_resnet_that_rebuilds_its_cols_gives_the_same_bits():
    """Every conv with keep_cols=False (the GPU's default: nn.conv.KEEP_COLS) against
    every conv keeping them, through a full forward and backward of a WRN with strides
    and channel changes."""
    from minisam.nn import Conv
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    y = one_hot(np.array([0, 2, 1]), 3)
    out = []
    for keep in (True, False):
        model = WideResnet(1, 2, num_outputs=3, seed=6)
        for _, layer in model.named_layers():
            if isinstance(layer, Conv):
                layer.keep_cols = keep
        out.append(_pass(model, x, y))
    _assert_same_bits(*out)

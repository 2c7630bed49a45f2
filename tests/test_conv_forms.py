"""benchmarks/conv_forms.py: the alternative convolution forms it times compute the same
convolution as minisam's Conv (checked inside ``measure``), here on small shapes."""
import importlib.util
import os

import numpy as np
import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "conv_forms.py")
spec = importlib.util.spec_from_file_location("conv_forms", PATH)
conv_forms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv_forms)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 6, 4, 2), (2, 4, 3, 3)])
def test_every_timed_form_is_the_same_convolution(shape, monkeypatch):
    monkeypatch.setattr(conv_forms, "best_ms", lambda f, repeats=7: 0.0)  # no timing here
    row = conv_forms.measure(shape)
    assert set(row["forward_ms"]) == {"im2col (9 slices)", "im2col (strided view)",
                                      "implicit GEMM", "Winograd F(2x2,3x3)"}
    assert max(row["forward_max_rel_err"].values()) < 1e-5
    # measure() asserts that implicit GEMM's input gradient is Conv's (square shapes only)
    # and that BN+ReLU written into the padded buffer is the padded contiguous result
    assert ("input_grad_ms" in row) == (shape[2] == shape[3])
    assert len(row["bn_relu_into_conv_input_ms"]) == 3


def test_winograd_is_exact_in_float64():
    """F(2x2,3x3) is an exact identity: in float64 it matches the direct sum to rounding."""
    from minisam.nn import conv2d_loop
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 8, 3))
    k = rng.standard_normal((3, 3, 3, 4))
    w = conv_forms.Winograd(x, 4)
    np.testing.assert_allclose(w.forward(x, k), conv2d_loop(x, k), rtol=1e-12, atol=1e-12)

"""Finite-difference gradient checks in float64 (Chainer's check_backward shape).

For a function y = f(x, params) and a random upstream gradient dy, the scalar
L = <f(x), dy> has directional derivative <dL/dx, v> along any direction v. We compare
the hand-written backward's value with the central difference (L(x + h v) - L(x - h v)) / 2h
for a random v, for the input and for every parameter.
"""
import numpy as np


def directional_check(forward, backward_grads, inputs: dict, rng, h=1e-6, rtol=1e-6):
    """forward(inputs) -> y; backward_grads(inputs, dy) -> {name: dL/dname}; all float64."""
    y = forward(inputs)
    dy = rng.standard_normal(y.shape)
    grads = backward_grads(inputs, dy)
    for name, value in inputs.items():
        v = rng.standard_normal(value.shape)
        plus = dict(inputs, **{name: value + h * v})
        minus = dict(inputs, **{name: value - h * v})
        numeric = (np.sum(forward(plus) * dy) - np.sum(forward(minus) * dy)) / (2 * h)
        analytic = np.sum(grads[name] * v)
        assert np.isclose(analytic, numeric, rtol=rtol, atol=1e-8 * max(1.0, abs(numeric))), (
            f"gradient of {name}: backward gives {analytic!r}, finite difference {numeric!r}")

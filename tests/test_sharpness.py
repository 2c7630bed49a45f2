"""Sharpness measures: Hessian power iteration (against a known quadratic and a dense
finite-difference Hessian of a tiny WideResnet in float64), filter-normalised directions,
loss slices, m-sharpness."""
import numpy as np
import pytest

from minisam.models import WideResnet
from minisam.optim import global_norm
from minisam.tree import to_vector as flatten
from minisam.sharpness import (
    BatchLoss,
    filter_normalized_direction,
    hessian_vector_product,
    loss_slice_1d,
    loss_surface_2d,
    m_sharpness,
    top_hessian_eigenvalue,
)


def test_power_iteration_on_a_quadratic():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    lam = np.array([6.0, 3.0, 2.5, 1.0, 0.5, 0.2, 0.1, 0.0, -0.3, -1.0, -2.0, -4.0])
    a = (q * lam) @ q.T
    shapes = {"a": (3, 2), "b": (6,)}

    def grad(p):  # L(w) = 0.5 w^T A w with w the concatenation of the dict's arrays
        w = np.concatenate([p["a"].ravel(), p["b"]])
        g = a @ w
        return {"a": g[:6].reshape(3, 2), "b": g[6:]}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    e = top_hessian_eigenvalue(grad, params, iters=200, tol=1e-10, seed=1)
    assert e.converged and e.value == pytest.approx(6.0, rel=1e-6)
    v = np.concatenate([e.vector["a"].ravel(), e.vector["b"]])
    assert abs(v @ q[:, 0]) == pytest.approx(1.0, abs=1e-5)
    assert e.residual < 1e-3
    # a Hessian whose largest |eigenvalue| is negative: the sign is kept
    e2 = top_hessian_eigenvalue(lambda p: {k: -2 * g for k, g in grad(p).items()}, params,
                                iters=300, tol=1e-10)
    assert e2.value == pytest.approx(-12.0, rel=1e-5)


def tiny(seed=0, n=8):
    rng = np.random.default_rng(seed)
    model = WideResnet(1, 1, 3, in_channels=1, seed=seed)
    x = rng.standard_normal((n, 8, 8, 1))
    y = rng.integers(0, 3, n).astype(np.int32)
    params = {k: v.astype(np.float64) for k, v in model.get_params().items()}
    return model, params, model.get_state(), x, y


def subspace_hessian(k, seed):
    """f(z) = L(w0 + U z) on a tiny WideResnet for k random orthonormal directions U: its
    dense k x k Hessian by second differences of the *loss* (no gradient code involved),
    and grad_z, f's gradient by the chain rule through the hand-written gradient."""
    model, w0, state, x, y = tiny()
    f = BatchLoss(model, state, x, y, weight_decay=1e-3, dtype=np.float64)
    keys = sorted(w0)
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((flatten(w0).size, k)))
    sizes = [w0[key].size for key in keys]
    offsets = np.cumsum([0] + sizes)

    def point(z):
        d = u @ z
        return {key: w0[key] + d[o:o + s].reshape(w0[key].shape)
                for key, o, s in zip(keys, offsets[:-1], sizes)}

    def loss(z):
        return f.value(point(z))[0]

    h = 1e-5   # small: a random-init ReLU net has kinks within 1e-3 of w0 in most directions
    dense = np.zeros((k, k))
    eye = np.eye(k) * h
    for i in range(k):
        for j in range(i, k):
            dense[i, j] = dense[j, i] = (
                loss(eye[i] + eye[j]) - loss(eye[i] - eye[j])
                - loss(-eye[i] + eye[j]) + loss(-eye[i] - eye[j])) / (4 * h * h)

    def grad_z(p):  # chain rule: df/dz = U^T g(w0 + U z)
        _, g = f.grad(point(p["z"]))
        return {"z": u.T @ flatten(g)}
    return dense, grad_z


def test_dense_hessian_of_a_tiny_wide_resnet_in_a_subspace():
    """In 5 random directions: the dense subspace Hessian must match the finite-difference
    HVPs of the gradient, and power iteration must find its top eigenvalue."""
    k = 5
    dense, grad_z = subspace_hessian(k, seed=3)
    z0 = {"z": np.zeros(k)}
    hv_cols = np.stack([hessian_vector_product(grad_z, z0, {"z": np.eye(k)[i]}, 1e-6)["z"]
                        for i in range(k)], axis=1)
    np.testing.assert_allclose(hv_cols, dense, rtol=2e-3, atol=2e-4 * np.abs(dense).max())
    eig = np.linalg.eigvalsh(dense)
    top = eig[np.argmax(np.abs(eig))]
    e = top_hessian_eigenvalue(grad_z, z0, iters=500, tol=1e-9, h=1e-6)
    assert e.value == pytest.approx(top, rel=2e-3)


def test_power_iteration_on_a_trained_model_float32_vs_float64():
    """After one epoch on digits: float64 with a tiny h gives the pointwise Hessian (stable
    in h), float32's default h a curvature smoothed over ~1e-3 ||w||, close to it; the top
    eigenvalue bounds v.Hv along random directions. (At a random init the ReLU kinks are
    too dense for any finite difference; see top_hessian_eigenvalue's docstring.)"""
    from minisam.train import TrainConfig, Trainer
    tr = Trainer(TrainConfig(dataset="digits", image_size=8, model="wrn10_1", epochs=1,
                             batch_size=64, rho=0.0), progress=False)
    tr.fit()
    model, state = tr.models[0], tr.eval_state()
    x, y = tr.train_data.images[:64], tr.train_data.labels[:64]
    w32 = tr.params
    w64 = {k: v.astype(np.float64) for k, v in w32.items()}
    f32, f64 = BatchLoss(model, state, x, y), BatchLoss(model, state, x, y, dtype=np.float64)
    e64 = top_hessian_eigenvalue(f64.grad, w64, iters=15, tol=1e-3)        # default h
    e64b = top_hessian_eigenvalue(f64.grad, w64, iters=15, tol=1e-3, h=1e-7)
    e32 = top_hessian_eigenvalue(f32.grad, w32, iters=15, tol=1e-3)
    assert e64.value > 0 and e64.value == pytest.approx(e64b.value, rel=1e-3)
    assert e32.value == pytest.approx(e64.value, rel=0.2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = {k: rng.standard_normal(w.shape) for k, w in w64.items()}
        n = global_norm(v)
        v = {k: a / n for k, a in v.items()}
        hv = hessian_vector_product(f64.grad, w64, v, 1e-6)
        assert sum((v[k] * hv[k]).sum() for k in v) < e64.value
    # measuring leaves the BN running statistics untouched
    for k, s in model.get_state().items():
        np.testing.assert_array_equal(s, state[k])


def test_filter_normalized_direction():
    model, params, *_ = tiny()
    d = filter_normalized_direction(params, 0)
    assert d.keys() == params.keys()
    for k, w in params.items():
        if w.ndim == 1:
            assert not d[k].any()          # biases and BN: zero (ignore='biasbn')
        else:
            axes = tuple(range(w.ndim - 1))
            np.testing.assert_allclose(np.sqrt((d[k] ** 2).sum(axis=axes)),
                                       np.sqrt((w ** 2).sum(axis=axes)), rtol=1e-6)
    d2 = filter_normalized_direction(params, 0, ignore_1d=False)
    bias = [k for k in params if params[k].ndim == 1 and np.linalg.norm(params[k]) > 0][0]
    assert np.linalg.norm(d2[bias]) == pytest.approx(np.linalg.norm(params[bias]), rel=1e-6)
    np.testing.assert_array_equal(flatten(d), flatten(filter_normalized_direction(params, 0)))


def test_loss_slices():
    model, params, state, x, y = tiny()
    f = BatchLoss(model, state, x, y)
    d1 = filter_normalized_direction(params, 1)
    d2 = filter_normalized_direction(params, 2)
    s = loss_slice_1d(f, params, d1, [-0.5, 0.0, 0.5])
    assert s["loss"].shape == (3,) and s["loss"][1] == pytest.approx(f(params)[0])
    surf = loss_surface_2d(f, params, d1, d2, [-0.5, 0.0, 0.5], [-0.25, 0.0])
    assert surf["loss"].shape == (2, 3)
    assert surf["loss"][1, 1] == pytest.approx(f(params)[0])
    assert surf["loss"][1, 0] == pytest.approx(s["loss"][0])


def test_m_sharpness_is_first_order_rho_times_gradient_norm():
    model, params, state, x, y = tiny(2, n=16)
    rho = 1e-4
    ms = m_sharpness(model, params, state, x, y, m=4, rho=rho, dtype=np.float64)
    assert ms["per_batch_loss"].shape == (4,)
    expect = [rho * float(global_norm(BatchLoss(model, state, x[i:i + 4], y[i:i + 4],
                                                dtype=np.float64).grad(params)[1]))
              for i in range(0, 16, 4)]
    np.testing.assert_allclose(ms["per_batch_loss"], expect, rtol=2e-2)
    big = m_sharpness(model, params, state, x, y, m=16, rho=0.05)
    assert big["loss"] > 0 and big["per_batch_loss"].shape == (1,)
    with pytest.raises(ValueError, match="m must be"):
        m_sharpness(model, params, state, x, y, m=0, rho=0.05)


def test_lanczos_finds_the_top_of_a_known_spectrum():
    """0.5 w^T A w with a known spectrum: exact HVPs (h cancels), so the Ritz values are
    A's top eigenvalues to rounding once the Krylov space holds them, and the bounds hold."""
    from minisam.sharpness import lanczos
    rng = np.random.default_rng(0)
    n = 40
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[9.0, 7.5, 7.0, 4.0, 3.0], rng.uniform(-1.0, 1.0, n - 5)])
    a = (q * lam) @ q.T

    def grad(p):
        return {"w": a @ p["w"]}
    params = {"w": rng.standard_normal(n)}
    full = lanczos(grad, params, k=5, iters=n, h=1.0)
    np.testing.assert_allclose(full.values, [9.0, 7.5, 7.0, 4.0, 3.0], rtol=1e-9)
    short = lanczos(grad, params, k=3, iters=20, h=1.0, seed=2)
    true = np.sort(lam)[::-1][:3]
    assert np.all(np.abs(short.values - true) <= short.bounds + 1e-9)
    assert short.iterations == 20 and abs(short.values[0] - 9.0) < 1e-6
    with pytest.raises(ValueError, match="iters >= k"):
        lanczos(grad, params, k=5, iters=3)


def test_lanczos_against_the_dense_hessian_of_a_tiny_wide_resnet_in_a_subspace():
    """The same kind of subspace Hessian, in 8 directions: Lanczos on the finite-difference
    HVPs of the hand-written gradient finds its top 3."""
    from minisam.sharpness import lanczos
    k = 8
    dense, grad_z = subspace_hessian(k, seed=4)
    spec = lanczos(grad_z, {"z": np.zeros(k)}, k=3, iters=k, h=1e-6)
    want = np.sort(np.linalg.eigvalsh(dense))[::-1][:3]
    np.testing.assert_allclose(spec.values, want, rtol=3e-3, atol=3e-4 * np.abs(want).max())


def test_relu_with_a_fixed_mask_uses_it():
    from minisam.nn import ReLU
    r = ReLU()
    x = np.array([[-1.0, 2.0, -3.0, 4.0]])
    r.fixed = np.array([[True, False, False, True]])
    np.testing.assert_array_equal(r.forward(x), [[-1.0, 0.0, 0.0, 4.0]])
    np.testing.assert_array_equal(r.backward(np.ones_like(x)), r.fixed * 1.0)
    r.fixed = None
    np.testing.assert_array_equal(r.forward(x), [[0.0, 2.0, 0.0, 4.0]])


def test_masked_hvp_is_the_plain_one_without_crossings_and_does_not_depend_on_the_step():
    """BatchLoss.hvp holds every ReLU mask at w: with a step too small for any ReLU input
    to cross zero it is the plain central difference, and it stays the same (to the
    O(h^2) of a smooth function) for steps 10^4 times larger, where plain differences
    pick up crossing jumps larger than Hv itself."""
    model, w0, state, x, y = tiny()
    f = BatchLoss(model, state, x, y, dtype=np.float64)
    rng = np.random.default_rng(5)
    v = {k: rng.standard_normal(p.shape) for k, p in w0.items()}
    n = float(global_norm(v))
    v = {k: t / n for k, t in v.items()}
    small = f.hvp(w0, 1e-7)(v)
    plain = hessian_vector_product(f.grad, w0, v, 1e-7)
    scale = np.abs(flatten(plain)).max()
    np.testing.assert_allclose(flatten(small), flatten(plain), atol=1e-5 * scale)
    large = f.hvp(w0, 1e-3)(v)
    np.testing.assert_allclose(flatten(large), flatten(small), atol=1e-5 * scale)
    jumpy = hessian_vector_product(f.grad, w0, v, 1e-3)
    assert np.abs(flatten(jumpy) - flatten(small)).max() > scale   # a crossing jump


def test_projected_ascent_finds_the_max_of_a_quadratic_on_the_ball():
    """L(w) = 0.5 w^T A w + b^T w from w = 0: the max over ||e|| <= rho is on the circle
    (A is positive definite), found here by a dense scan; one step is SAM's first-order
    point rho b / ||b||, which falls short, and projected ascent closes the gap."""
    from minisam.sharpness import projected_ascent
    a = np.array([[4.0, 0.0], [0.0, 0.5]])
    b = np.array([0.2, 1.0])

    class F:
        def value(self, p):
            w = p["w"]
            return 0.5 * w @ a @ w + b @ w, 0.0

        def grad(self, p):
            return self.value(p)[0], {"w": a @ p["w"] + b}
    rho = 1.0
    theta = np.linspace(0, 2 * np.pi, 200001)
    circle = rho * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    true = np.max(0.5 * np.einsum("ni,ij,nj->n", circle, a, circle) + circle @ b)
    w0 = {"w": np.zeros(2)}
    (first, _), e1 = projected_ascent(F(), w0, rho, 1)
    np.testing.assert_allclose(e1["w"], rho * b / np.linalg.norm(b))
    (many, _), e = projected_ascent(F(), w0, rho, 50)
    assert first < true - 0.1 and many == pytest.approx(true, abs=1e-6)
    assert np.linalg.norm(e["w"]) <= rho + 1e-12


def test_m_sharpness_with_ascent_steps_is_at_least_the_first_order_one():
    model, params, state, x, y = tiny(2, n=16)
    one = m_sharpness(model, params, state, x, y, m=8, rho=0.05, dtype=np.float64)
    five = m_sharpness(model, params, state, x, y, m=8, rho=0.05, dtype=np.float64,
                       ascent_steps=5)
    assert one["ascent_steps"] == 1 and five["ascent_steps"] == 5
    assert np.all(five["per_batch_loss"] >= one["per_batch_loss"] - 1e-12)
    with pytest.raises(ValueError, match="ascent_steps must be a positive integer"):
        m_sharpness(model, params, state, x, y, m=8, rho=0.05, ascent_steps=0)

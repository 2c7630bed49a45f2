"""How sharp is a solution? Three measures, all built on the hand-written gradient.

* ``top_hessian_eigenvalue`` (power iteration) and ``lanczos`` (the top k): eigenvalues of
  the Hessian of the training loss, from Hessian-vector products taken by central finite
  differences of the gradient, ``Hv ~ (g(w + h v) - g(w - h v)) / 2h`` (Pearlmutter's trick needs a second
  backward pass minisam does not have; two gradients are exact to O(h^2) instead). The SAM
  paper (Foret et al. 2021, sec. 4.2, fig. 3 left) reports this spectrum; SAM's solutions
  have a much smaller top eigenvalue than SGD's.
* ``loss_slice_1d`` / ``loss_surface_2d`` along ``filter_normalized_direction``s: the loss
  landscape pictures of Li et al., "Visualizing the Loss Landscape of Neural Nets" (2018):
  each filter of a random Gaussian direction is rescaled to the norm of the matching filter
  of the weights, so that directions are comparable across networks of different scale.
* ``m_sharpness``: the SAM paper's m-sharpness (sec. 4.1): over batches of m examples, the
  worst loss in the rho-ball, approximated as SAM does by one ascent step,
  ``L(w + rho g / ||g||) - L(w)``, averaged over the batches.

All three evaluate the loss as training does: BN in train mode (batch statistics) on a
fixed batch, the weight-decay term optional (it adds ``weight_decay`` to every Hessian
eigenvalue). ``BatchLoss`` wraps that function; running BN statistics are restored after
every call, so measuring never changes the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_xp
from .nn.loss import error_rate, one_hot, softmax_cross_entropy
from .sam import SAMConfig, dual_vector, loss_and_grad
from .tree import axpy, dot, global_norm


class BatchLoss:
    """L(w) on fixed data, BN in train mode, as a function of the parameters.

    images, labels: the data (any size). ``batch_size`` splits it into consecutive batches
    that are normalised separately, as in training (None: one batch). ``dtype`` (e.g.
    numpy.float64) casts the images and every parameter dict passed in, for accurate
    finite differences. ``weight_decay`` adds ``0.5 * wd * ||w||^2`` as in sam.loss_and_grad.
    """

    def __init__(self, model, state, images, labels, *, batch_size=None, weight_decay=0.0,
                 label_smoothing=0.0, dtype=None):
        n = len(labels)
        bs = n if batch_size is None else int(batch_size)
        if n == 0 or bs < 1 or bs > n:
            raise ValueError(f"BatchLoss needs 1 <= batch_size <= number of examples ({n}), "
                             f"got {batch_size}")
        self.model, self.state, self.dtype = model, state, dtype
        self.cfg = SAMConfig(rho=0.0, weight_decay=weight_decay, label_smoothing=label_smoothing)
        k = model.config["num_outputs"]
        self.batches = []
        for i in range(0, n - bs + 1, bs):  # a partial last batch is dropped, as in training
            x = images[i:i + bs]
            self.batches.append((x if dtype is None else x.astype(dtype), labels[i:i + bs],
                                 one_hot(labels[i:i + bs], k)))
        self.evaluations = 0

    def _cast(self, params):
        if self.dtype is None:
            return params
        return {k: v.astype(self.dtype, copy=False) for k, v in params.items()}

    def value(self, params):
        """(loss, error rate) averaged over the batches; forward passes only."""
        params = self._cast(params)
        self.model.set_params(params)
        loss = err = 0.0
        for x, y, onehot in self.batches:
            self.model.set_state(self.state)
            logits = self.model.forward(x, train=True)
            ce, _ = softmax_cross_entropy(logits, onehot, self.cfg.label_smoothing)
            loss += float(ce)
            err += float(error_rate(logits, y))
        self.model.set_state(self.state)
        self.evaluations += len(self.batches)
        l2 = sum(float((w * w).sum()) for w in params.values()) if self.cfg.weight_decay else 0.0
        nb = len(self.batches)
        return loss / nb + 0.5 * self.cfg.weight_decay * l2, err / nb

    def grad(self, params):
        """(loss, gradient dict) averaged over the batches (``sam.loss_and_grad``)."""
        params = self._cast(params)
        total, loss = None, 0.0
        for x, _, onehot in self.batches:
            self.model.set_state(self.state)
            batch_loss, _, _, g = loss_and_grad(self.model, params, x, onehot, self.cfg)
            loss += float(batch_loss)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        self.model.set_state(self.state)
        self.evaluations += 2 * len(self.batches)
        nb = len(self.batches)
        return loss / nb, {k: v / nb for k, v in total.items()}

    __call__ = value

    def hvp(self, params, h: float | None = None):
        """``v -> H v`` at ``params``: central differences of the gradient with every ReLU's
        mask fixed at ``params`` (per batch), so no ReLU input crosses zero between w - hv
        and w + hv. That is the Hessian autodiff gives a ReLU net (ReLU'' taken as 0); plain
        differences of the gradient (``hessian_vector_product``) add a jump / h for every
        input that crosses, which on a trained net can swamp the top eigenvalues."""
        from .nn import ReLU
        params = self._cast(params)
        h = default_step(params) if h is None else h
        relus = [layer for _, layer in self.model.named_layers() if isinstance(layer, ReLU)]
        masks = []
        self.model.set_params(params)
        for x, _, _ in self.batches:           # the masks at w, batch by batch
            self.model.set_state(self.state)
            self.model.forward(x, train=True)
            masks.append([r.mask for r in relus])
        self.model.set_state(self.state)

        def product(v):
            v = self._cast(v)
            total = None
            for (x, _, onehot), mask in zip(self.batches, masks):
                for r, m in zip(relus, mask):
                    r.fixed = m
                try:
                    g = []
                    for sign in (1.0, -1.0):
                        self.model.set_state(self.state)
                        g.append(loss_and_grad(self.model, axpy(sign * h, v, params), x,
                                               onehot, self.cfg)[3])
                finally:
                    for r in relus:
                        r.fixed = None
                hv = {k: (g[0][k] - g[1][k]) / (2 * h) for k in g[0]}
                total = hv if total is None else {k: total[k] + hv[k] for k in hv}
            self.model.set_state(self.state)
            self.evaluations += 4 * len(self.batches)
            return {k: t / len(self.batches) for k, t in total.items()}
        return product


# ---------------------------------------------------------------------------------------
# Hessian

def hessian_vector_product(grad_fn, params: dict, v: dict, h: float) -> dict:
    """``(g(w + h v) - g(w - h v)) / 2h``: H v up to O(h^2 ||v||^3) for a unit v.

    ``grad_fn(params) -> gradient dict`` (or ``(loss, gradient dict)``)."""
    def g(p):
        out = grad_fn(p)
        return out[1] if isinstance(out, tuple) else out
    gp, gm = g(axpy(h, v, params)), g(axpy(-h, v, params))
    return {k: (gp[k] - gm[k]) / (2 * h) for k in gp}


@dataclass
class Eigen:
    value: float          # the eigenvalue estimate (Rayleigh quotient v.Hv of the last v)
    vector: dict          # its unit eigenvector, keyed like params
    history: list         # the estimate after every iteration
    iterations: int
    converged: bool
    residual: float       # ||Hv - value v|| / |value|, for the last v


def top_hessian_eigenvalue(grad_fn, params: dict, *, iters: int = 20, tol: float = 1e-3,
                           h: float | None = None, seed: int = 0) -> Eigen:
    """The largest-magnitude eigenvalue of the Hessian at ``params`` by power iteration.

    v_0 is a seeded Gaussian; each iteration takes one finite-difference Hessian-vector
    product (two gradients), estimates lambda = v.Hv and sets v = Hv / ||Hv||; it stops when
    lambda changes by less than ``tol`` (relative). At a minimum the top eigenvalue is
    positive and this is the top of the spectrum; elsewhere a large negative eigenvalue may
    win (its sign is kept). The top eigenvalues of a network's Hessian come in a cluster
    (about one per class), so the vector converges slowly; the Rayleigh quotient, which is
    what is returned, converges much faster.

    ``h``, the step along the unit vector, matters because a ReLU network's loss has kinks
    everywhere: a difference that straddles a kink adds a spurious jump / h. Measured on a
    WRN-10-1 trained one epoch on digits (||w|| = 25; tests/test_sharpness.py): float64
    with h = 1e-7 or 1e-6 gives the pointwise Hessian (8.71 both), h = 1e-5..1e-3 is
    dominated by kinks (-173, 40, 19), h = 1e-2..3e-2 gives 9.3-9.5 (curvature averaged
    over that scale), h = 0.1 gives 7.9. Defaults: float64 ``5e-8 * max(1, ||w||)`` (the
    pointwise Hessian; rounding is still negligible), float32 ``1e-3 * max(1, ||w||)``
    (float32 gradients carry ~1e-7 relative rounding, so h cannot be tiny: this is the
    Hessian smoothed over a ball of radius ~1e-3 ||w||, within ~10% of the pointwise value
    in that check and free of kink outliers). The default follows the dtype of ``params``:
    for the pointwise value pass float64 parameters and a ``BatchLoss(...,
    dtype=numpy.float64)``, at about twice the cost.
    """
    h = default_step(params) if h is None else h
    v = _random_unit(params, seed)
    history, lam, converged, residual = [], None, False, float("nan")
    for _ in range(iters):
        hv = hessian_vector_product(grad_fn, params, v, h)
        new = dot(v, hv)
        history.append(new)
        converged = lam is not None and abs(new - lam) <= tol * abs(new)
        lam = new
        residual = float(global_norm({k: hv[k] - lam * v[k] for k in hv})) / max(abs(lam), 1e-30)
        hv_norm = float(global_norm(hv))
        if converged or hv_norm == 0.0 or not np.isfinite(hv_norm):
            break
        v = {k: x / hv_norm for k, x in hv.items()}
    return Eigen(float(lam), v, history, len(history), converged, residual)


def default_step(params: dict) -> float:
    """The finite-difference step of ``top_hessian_eigenvalue`` and ``lanczos`` (see the
    former's docstring for the measurements behind it): ``5e-8 * max(1, ||w||)`` for float64
    parameters, ``1e-3 * max(1, ||w||)`` if any is float32."""
    wide = any(np.dtype(getattr(v, "dtype", np.float64)) == np.float32 for v in params.values())
    return (1e-3 if wide else 5e-8) * max(1.0, float(global_norm(params)))


def _random_unit(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    v = {k: get_xp(p).asarray(rng.standard_normal(p.shape)).astype(p.dtype)
         for k, p in params.items()}
    norm = global_norm(v)
    return {k: x / norm for k, x in v.items()}


@dataclass
class Spectrum:
    values: np.ndarray    # the top-k Ritz values, largest first
    bounds: np.ndarray    # |beta_m s_mi|: each is within this of an eigenvalue (exact HVPs)
    iterations: int       # Lanczos steps taken (HVPs, two gradients each)
    h: float              # the finite-difference step used


def lanczos(grad_fn, params: dict, *, k: int = 5, iters: int = 30, h: float | None = None,
            seed: int = 0, hvp=None) -> Spectrum:
    """The top ``k`` eigenvalues of the Hessian at ``params`` by the Lanczos method.

    From a seeded unit v_1, m steps build an orthonormal basis V of the Krylov space
    span{v, Hv, ..., H^(m-1) v} in which H is the tridiagonal T = V^T H V (alphas on the
    diagonal, betas beside it); T's eigenvalues (Ritz values) converge to H's extreme ones
    first, so a few dozen HVPs give the top of the spectrum where power iteration gives one
    value. Each new vector is orthogonalised against every earlier one, twice (full
    reorthogonalisation: in floating point, plain Lanczos loses orthogonality and repeats
    converged eigenvalues). Each Ritz value is within ``|beta_m s_mi|`` of an eigenvalue of
    the operator (s_i its eigenvector of T), a bound that holds for exact HVPs; the finite
    differences add their own error (``top_hessian_eigenvalue`` on ``h``).

    ``grad_fn`` and ``h`` as in ``top_hessian_eigenvalue`` (default ``default_step``), or
    ``hvp``, a function v -> Hv (e.g. ``BatchLoss.hvp(params)``), instead of both."""
    if not (isinstance(k, int) and k >= 1 and isinstance(iters, int) and iters >= k):
        raise ValueError(f"lanczos needs integers k >= 1 and iters >= k, got k={k!r}, "
                         f"iters={iters!r}")
    h = default_step(params) if h is None else h
    basis, alphas, betas = [_random_unit(params, seed)], [], []
    for j in range(iters):
        v = basis[-1]
        w = hvp(v) if hvp is not None else hessian_vector_product(grad_fn, params, v, h)
        alphas.append(dot(w, v))
        for _ in range(2):          # full reorthogonalisation (the three-term recurrence too)
            for u in basis:
                w = axpy(-dot(w, u), u, w)
        beta = float(global_norm(w))
        betas.append(beta)
        if j == iters - 1 or beta <= 1e-12 * max(abs(a) for a in alphas):
            break                   # done, or an invariant subspace: T's values are exact
        basis.append({key: x / beta for key, x in w.items()})
    m = len(alphas)
    t = np.diag(alphas) + np.diag(betas[:m - 1], 1) + np.diag(betas[:m - 1], -1)
    values, vectors = np.linalg.eigh(t)
    top = np.argsort(values)[::-1][:k]
    return Spectrum(values[top], np.abs(betas[m - 1] * vectors[m - 1, top]), m, h)


# ---------------------------------------------------------------------------------------
# Loss landscape (Li et al. 2018)

def filter_normalized_direction(params: dict, rng: np.random.Generator | int = 0,
                                ignore_1d: bool = True) -> dict:
    """A random Gaussian direction, each filter rescaled to the norm of the weights' filter.

    A filter is one output unit: ``kernel[..., o]`` of an HWIO conv kernel or a column of
    a dense ``[in, out]`` kernel. 1-D parameters (biases, BN scale and shift) get a zero
    direction when ``ignore_1d`` (Li et al.'s ``ignore='biasbn'`` setting, the one their
    figures use), otherwise they are rescaled as a whole."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    out = {}
    for k in sorted(params):
        w = params[k]
        xp = get_xp(w)
        d = xp.asarray(rng.standard_normal(w.shape)).astype(w.dtype)
        if w.ndim <= 1:
            if ignore_1d:
                d = xp.zeros_like(w)
            else:
                d = d * (xp.linalg.norm(w) / (xp.linalg.norm(d) + 1e-10))
        else:
            axes = tuple(range(w.ndim - 1))   # everything but the output axis
            wn = xp.sqrt((w * w).sum(axis=axes, keepdims=True))
            dn = xp.sqrt((d * d).sum(axis=axes, keepdims=True))
            d = d * (wn / (dn + 1e-10))
        out[k] = d
    return out


def loss_slice_1d(loss_fn, params: dict, direction: dict, alphas) -> dict:
    """Loss and error at ``params + alpha * direction`` for each alpha.

    ``loss_fn(params) -> (loss, error rate)``, e.g. a ``BatchLoss``."""
    alphas = np.asarray(alphas, dtype=np.float64)
    vals = [loss_fn(axpy(float(a), direction, params)) for a in alphas]
    return {"alphas": alphas, "loss": np.array([v[0] for v in vals]),
            "error_rate": np.array([v[1] for v in vals])}


def loss_surface_2d(loss_fn, params: dict, d1: dict, d2: dict, alphas, betas) -> dict:
    """Loss and error on the grid ``params + a * d1 + b * d2``; arrays [len(betas), len(alphas)]."""
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    loss = np.zeros((len(betas), len(alphas)))
    err = np.zeros_like(loss)
    for i, b in enumerate(betas):
        row = axpy(float(b), d2, params)
        for j, a in enumerate(alphas):
            loss[i, j], err[i, j] = loss_fn(axpy(float(a), d1, row))
    return {"alphas": alphas, "betas": betas, "loss": loss, "error_rate": err}


# ---------------------------------------------------------------------------------------
# m-sharpness (Foret et al. 2021, sec. 4.1)

def projected_ascent(f, params: dict, rho: float, steps: int):
    """max over ||e|| <= rho of f.value(w + e), approximated from below by ``steps`` steps of
    normalised gradient ascent projected back onto the ball: e_1 = rho g(w) / ||g(w)|| (SAM's
    first-order point), e_{t+1} = P(e_t + rho g(w + e_t) / ||g(w + e_t)||). ``f`` has
    ``value(params) -> (loss, error)`` and ``grad(params) -> (loss, grads)`` (a
    ``BatchLoss``). Returns the (loss, error) of the iterate with the highest loss, and e."""
    e = {k: v * 0 for k, v in params.items()}
    best, best_e = None, e
    for _ in range(steps):
        _, g = f.grad(axpy(1.0, e, params))
        direction, _ = dual_vector(g)
        e = axpy(rho, direction, e)
        n = float(global_norm(e))
        if n > rho:
            e = {k: v * (rho / n) for k, v in e.items()}
        val = f.value(axpy(1.0, e, params))
        if best is None or val[0] > best[0]:
            best, best_e = val, e
    return best, best_e


def m_sharpness(model, params: dict, state: dict, images, labels, *, m: int, rho: float,
                weight_decay: float = 0.0, label_smoothing: float = 0.0, dtype=None,
                ascent_steps: int = 1) -> dict:
    """Mean over consecutive batches of m examples of ``max_{||e||<=rho} L_B(w + e) - L_B(w)``.

    ``ascent_steps = 1`` is the first-order estimate SAM itself uses, e = rho g_B/||g_B||;
    more steps run ``projected_ascent`` (the paper's definition maximises over the ball,
    sec. 4.1), a lower bound on the max that grows with the steps. g_B is the gradient on
    batch B itself, so each batch gets its own worst-case direction (the per-replica
    perturbation of SAM with m examples per replica). Returns the mean and per-batch
    values for the loss and for the error rate (the paper's Fig. 7 uses the error rate)."""
    if not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be a positive integer, got {ascent_steps!r}")
    n = len(labels)
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, {n}] (the number of examples), got {m}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    per_loss, per_err = [], []
    for i in range(0, n - m + 1, m):
        f = BatchLoss(model, state, images[i:i + m], labels[i:i + m],
                      weight_decay=weight_decay, label_smoothing=label_smoothing, dtype=dtype)
        p = f._cast(params)
        l0, e0 = f.value(p)
        (l1, e1), _ = projected_ascent(f, p, rho, ascent_steps)
        per_loss.append(l1 - l0)
        per_err.append(e1 - e0)
    return {"m": m, "rho": rho, "ascent_steps": ascent_steps, "loss": float(np.mean(per_loss)),
            "error_rate": float(np.mean(per_err)), "per_batch_loss": np.array(per_loss),
            "per_batch_error_rate": np.array(per_err)}

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
# # 01 · Sharp and flat minima, and what SAM does about them
#
# *Sharpness-Aware Minimization* (SAM; Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021) trains a
# network to sit in a region where the loss is low **and stays low in a whole neighbourhood**.
# This notebook builds the intuition on toy losses of one and two variables, where everything
# (loss, gradient, the worst-case neighbour) can be computed exactly and drawn. No network yet:
# only NumPy, analytic gradients, and one function from minisam, `minisam.sam.dual_vector`,
# which is the very function the WideResnet training uses.
#
# What you will see:
#
# 1. a 1-D loss with a **sharp** and a **flat** minimum, and the SAM objective
#    $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$ that tells them apart;
# 2. SAM's first-order answer to the inner maximisation, $\hat\epsilon = \rho\, g/\|g\|$
#    (eq. 2 of the paper), and how good an approximation it is;
# 3. why SAM cannot sit at the bottom of a sharp basin;
# 4. gradient descent and SAM side by side on a 2-D loss with a sharp and a flat basin;
# 5. the effect of $\rho$.

# %%
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`

import inspect

import numpy as np
import matplotlib.pyplot as plt

import minisam
from minisam.sam import dual_vector

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})


# %% [markdown]
# ## 1. A loss with a sharp and a flat minimum
#
# Our toy loss glues two quadratic bowls together with a smooth minimum:
#
# $$
# L_1(w) = m_1 + \tfrac{\lambda_1}{2}\|w-c_1\|^2 \;\;(\text{sharp: } \lambda_1 = 40),\qquad
# L_2(w) = m_2 + \tfrac{\lambda_2}{2}\|w-c_2\|^2 \;\;(\text{flat: } \lambda_2 = 1),
# $$
# $$
# L(w) = -T \log\left(e^{-L_1(w)/T} + e^{-L_2(w)/T}\right) \approx \min(L_1, L_2),\qquad T = 0.05 .
# $$
#
# The curvature $\lambda$ (the Hessian's eigenvalue at the minimum) is what we call **sharpness**
# here. The sharp minimum is also the *deeper* one ($m_1 = -0.1 < m_2 = 0$): judged by the
# training loss alone, it is the better of the two. The gradient is the softmax-weighted mix of
# the two bowls' gradients, $\nabla L = p_1 \nabla L_1 + (1-p_1)\nabla L_2$ with
# $p_1 = e^{-L_1/T} / (e^{-L_1/T} + e^{-L_2/T})$. The same class serves for 1-D and 2-D:
# points have shape `(..., d)`.

# %%
class TwoBasins:
    """Smooth minimum of a sharp and a flat quadratic bowl; points have shape (..., d)."""

    def __init__(self, c1, lam1, m1, c2, lam2, m2, T=0.05):
        self.c1, self.c2 = np.asarray(c1, float), np.asarray(c2, float)
        self.lam1, self.m1, self.lam2, self.m2, self.T = lam1, m1, lam2, m2, T

    def _bowls(self, w):
        d1, d2 = w - self.c1, w - self.c2
        L1 = self.m1 + 0.5 * self.lam1 * (d1 * d1).sum(-1)
        L2 = self.m2 + 0.5 * self.lam2 * (d2 * d2).sum(-1)
        return L1, L2, self.lam1 * d1, self.lam2 * d2

    def __call__(self, w):
        L1, L2, _, _ = self._bowls(np.asarray(w, float))
        return -self.T * np.logaddexp(-L1 / self.T, -L2 / self.T)

    def grad(self, w):
        L1, L2, g1, g2 = self._bowls(np.asarray(w, float))
        p1 = 0.5 * (1 + np.tanh((L2 - L1) / (2 * self.T)))[..., None]   # softmax weight of bowl 1
        return p1 * g1 + (1 - p1) * g2


loss1d = TwoBasins(c1=[-1.0], lam1=40.0, m1=-0.1, c2=[1.0], lam2=1.0, m2=0.0)

# Always check an analytic gradient against finite differences before trusting it.
w = np.array([[-0.8], [0.3], [1.7]])
h = 1e-6
numeric = (loss1d(w + h) - loss1d(w - h)) / (2 * h)
print("analytic:", loss1d.grad(w)[:, 0])
print("numeric: ", numeric)


# %% [markdown]
# ## 2. The SAM objective
#
# SAM replaces the training loss by the worst loss within a ball of radius $\rho$ around the
# weights and minimises that (plus weight decay):
#
# $$
# \min_w \; L^{SAM}(w) + \lambda_{wd}\|w\|_2^2, \qquad
# L^{SAM}(w) = \max_{\|\epsilon\|_p \le \rho} L(w+\epsilon).
# $$
#
# Writing it as
# $L^{SAM}(w) = \big[\max_{\|\epsilon\|_p\le\rho} L(w+\epsilon) - L(w)\big] + L(w)$ shows the
# two things it asks for: a low training loss $L(w)$, and a low **sharpness**, the bracket: how
# much the loss can rise when the weights move by $\rho$. (The paper motivates this by a
# PAC-Bayes bound in which exactly this sharpness term appears.)
#
# At the bottom of a quadratic bowl the sharpness is $\tfrac12\lambda\rho^2$: forty times larger
# in the sharp bowl than in the flat one. In 1-D we can compute $L^{SAM}$ by brute force,
# maximising over a fine grid of $\epsilon \in [-\rho, \rho]$:

# %%
def sam_objective(loss, ws, rho, n=401):
    """max_{|e| <= rho} loss(w + e) for each 1-D point in ws (shape [N, 1]), by brute force."""
    eps = np.linspace(-rho, rho, n)
    return loss(ws[:, None, :] + eps[None, :, None]).max(axis=1)


ws = np.linspace(-2.0, 2.6, 1201)[:, None]
fig, ax = plt.subplots(figsize=(8, 4))
ax.plot(ws[:, 0], loss1d(ws), "k", lw=2, label="$L(w)$")
for rho, col in [(0.05, "C0"), (0.1, "C1"), (0.2, "C3")]:
    ax.plot(ws[:, 0], sam_objective(loss1d, ws, rho), col, label=rf"$L^{{SAM}}$, $\rho$ = {rho}")
ax.set(xlabel="$w$", ylabel="loss", ylim=(-0.15, 1.0), title="sharp minimum at $w=-1$, flat minimum at $w=1$")
ax.legend()
plt.show()

print(f"{'rho':>5} | {'L^SAM at sharp min':>18} {'L^SAM at flat min':>18} | preferred")
for rho in [0.0, 0.05, 0.1, 0.2]:
    s = sam_objective(loss1d, np.array([[-1.0]]), rho)[0] if rho else loss1d(np.array([-1.0]))
    f = sam_objective(loss1d, np.array([[1.0]]), rho)[0] if rho else loss1d(np.array([1.0]))
    print(f"{rho:5.2f} | {float(s):18.4f} {float(f):18.4f} | {'sharp' if s < f else 'flat'}")

# %% [markdown]
# With $\rho = 0$ the sharp minimum wins (it is deeper). As soon as $\rho$ is large enough that
# $m_1 + \tfrac12\lambda_1\rho^2 > m_2 + \tfrac12\lambda_2\rho^2$ (here $\rho \gtrsim 0.07$), the
# SAM objective ranks the flat minimum first: the sharp valley is "filled in" while the flat one
# barely moves.
#
# ## 3. Solving the inner maximisation to first order
#
# In a network with millions of weights we cannot search the ball. SAM linearises the loss
# around $w$, $L(w+\epsilon) \approx L(w) + \epsilon^\top \nabla L(w)$, and maximises the linear
# function over the $p$-norm ball. That is a dual-norm problem with a closed-form answer
# (eq. 2 of the paper, with $1/p + 1/q = 1$):
#
# $$
# \hat\epsilon(w) = \rho\, \operatorname{sign}\!\big(\nabla L(w)\big)\,
# \frac{|\nabla L(w)|^{q-1}}{\big(\|\nabla L(w)\|_q^q\big)^{1/p}}
# \;\;\overset{p=q=2}{=}\;\; \rho\,\frac{\nabla L(w)}{\|\nabla L(w)\|_2}.
# $$
#
# With $p = 2$ (what the paper and its code use) the perturbation is a step of length $\rho$
# straight uphill. Then SAM approximates the gradient of $L^{SAM}$ by the gradient of $L$ *at
# the perturbed point*, dropping the term that would need the derivative of $\hat\epsilon$ with
# respect to $w$ (a Hessian-vector product):
#
# $$
# \nabla L^{SAM}(w) \approx \nabla L(w)\big|_{w+\hat\epsilon(w)} .
# $$
#
# So one SAM step costs two gradients: $g = \nabla L(w)$, then $g_{SAM} = \nabla L(w + \rho g/\|g\|)$,
# then $w \leftarrow w - \eta\, g_{SAM}$ (Algorithm 1). minisam's `dual_vector` computes
# $g/\|g\|$ for a whole dictionary of parameter arrays, with the **global** norm over all of them
# (as if all the arrays were one long vector), exactly like the JAX code:

# %%
print(inspect.getsource(minisam.optim.global_norm))
print(inspect.getsource(dual_vector))

# It works on any dict of arrays: a 1-D toy weight, or two named arrays at once.
direction, norm = dual_vector({"w": loss1d.grad(np.array([-0.8]))})
print("1-D: g =", loss1d.grad(np.array([-0.8])), "-> direction", direction["w"], "(the sign of g)")
direction, norm = dual_vector({"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])})
print("dict: ||g|| =", norm, " direction =", direction)

# %% [markdown]
# How good is the first-order answer? In 1-D, $\hat\epsilon = \rho\,\mathrm{sign}(L'(w))$: always
# the uphill end of the interval. The exact maximiser $\epsilon^*$ agrees everywhere except near
# the minima and near the ridge between the basins, where the loss is far from linear on the
# scale of $\rho$. The right panel compares the SAM gradient $L'(w+\hat\epsilon)$ with the true
# derivative of $L^{SAM}$ (by finite differences of the brute-force curve).

# %%
rho = 0.1
eps_grid = np.linspace(-rho, rho, 401)
exact_eps = eps_grid[loss1d(ws[:, None, :] + eps_grid[None, :, None]).argmax(axis=1)]
first_order = np.array([rho * dual_vector({"w": loss1d.grad(w)})[0]["w"][0] for w in ws])

sam_curve = sam_objective(loss1d, ws, rho)
d_sam = np.gradient(sam_curve, ws[:, 0])
g_sam = loss1d.grad(ws + first_order[:, None])[:, 0]

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
a.plot(ws[:, 0], exact_eps, "k", lw=3, alpha=0.4, label=r"exact $\epsilon^*$ (grid search)")
a.plot(ws[:, 0], first_order, "C1", label=r"first order $\hat\epsilon = \rho\, g/|g|$")
a.set(xlabel="$w$", ylabel=r"$\epsilon$", title=rf"the perturbation, $\rho$ = {rho}")
a.legend(loc="lower right")
b.plot(ws[:, 0], loss1d.grad(ws)[:, 0], "0.6", label="$L'(w)$")
b.plot(ws[:, 0], d_sam, "k", lw=3, alpha=0.4, label=r"$dL^{SAM}/dw$ (exact)")
b.plot(ws[:, 0], g_sam, "C1", label=r"SAM gradient $L'(w+\hat\epsilon)$")
b.set(xlabel="$w$", ylim=(-6, 6), title="gradients")
b.legend(loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Why SAM cannot sit at the bottom of a sharp basin
#
# Take one quadratic bowl $L = \tfrac{\lambda}{2}w^2$ and run SAM with learning rate $\eta$. Then
# $g = \lambda w$, $\hat\epsilon = \rho\,\mathrm{sign}(w)$ and the update is
#
# $$
# w \leftarrow w - \eta\lambda\big(w + \rho\,\mathrm{sign}(w)\big).
# $$
#
# Gradient descent ($\rho = 0$) converges to $0$ whenever $\eta\lambda < 2$. SAM does not: the
# perturbation always points away from the bottom, so the step always overshoots by
# $\eta\lambda\rho$. Looking for a 2-cycle $w \to -w \to w$ gives its amplitude
#
# $$
# a = \frac{\eta\lambda\rho}{2 - \eta\lambda}.
# $$
#
# It grows with the curvature and blows up as $\eta\lambda \to 2$. (The 2-cycle is not the only
# orbit: from some starts SAM wanders inside $|w| \le \eta\lambda\rho \approx 2a$ instead, but
# the scale is the same.) With $\eta = 0.045$ and $\rho = 0.05$: in the flat bowl
# ($\lambda = 1$) SAM stays about $0.001$ from the minimum; in the sharp bowl ($\lambda = 40$,
# $\eta\lambda = 1.8$) it swings $0.45$ away, which in our two-basin loss is already past the
# ridge into the flat basin.

# %%
lr, rho, steps = 0.045, 0.05, 120
fig, ax = plt.subplots(figsize=(8, 3.8))
for lam, col in [(1.0, "C0"), (40.0, "C3")]:
    for r, style in [(0.0, ":"), (rho, "-")]:
        w, path = 0.5, []
        for _ in range(steps):
            g = lam * w
            e = r * np.sign(g)                  # dual_vector in 1-D
            w = w - lr * lam * (w + e)          # gradient of the bowl at w + e
            path.append(abs(w))
        label = f"{'SAM' if r else 'GD '} lambda={lam:g}"
        ax.semilogy(path, style, color=col, label=label)
    a = lr * lam * rho / (2 - lr * lam)
    ax.axhline(a, color=col, lw=0.8, alpha=0.6)
    print(f"lambda = {lam:4g}: predicted 2-cycle amplitude a = {a:.5f}; SAM's |w| over the last 20 steps: "
          f"{min(path[-20:]):.5f} to {max(path[-20:]):.5f}")
ax.set(xlabel="step", ylabel="|w - minimum|", ylim=(1e-6, 1), title=rf"quadratic bowls, $\eta$ = {lr}, $\rho$ = {rho}")
ax.legend(ncol=2)
plt.show()

# %% [markdown]
# ## 5. Gradient descent and SAM on a 2-D loss
#
# The same construction in two dimensions: a sharp bowl at $c_1 = (-1, 0.5)$ ($\lambda_1 = 40$,
# minimum $-0.1$) and a flat one at $c_2 = (1, -0.5)$ ($\lambda_2 = 1$, minimum $0$). Both
# methods use the learning rate $\eta = 0.045$, small enough that gradient descent is stable in
# the sharp basin ($\eta\lambda_1 = 1.8 < 2$). The SAM step is written with minisam's
# `dual_vector` on a one-entry parameter dictionary, as it is for the WideResnet:

# %%
loss2d = TwoBasins(c1=[-1.0, 0.5], lam1=40.0, m1=-0.1, c2=[1.0, -0.5], lam2=1.0, m2=0.0)
LR = 0.045


def gd_step(w, lr=LR):
    return w - lr * loss2d.grad(w)


def sam_step(w, lr=LR, rho=0.1):
    g = {"w": loss2d.grad(w)}                       # 1. gradient at w
    direction, _ = dual_vector(g)                   # 2. e = rho g / ||g||  (eq. 2); _ is ||g||
    e = rho * direction["w"]
    return w - lr * loss2d.grad(w + e)              # 3. step with the gradient at w + e


def trajectory(step, w0, n=400):
    path = [np.asarray(w0, float)]
    for _ in range(n):
        path.append(step(path[-1]))
    return np.array(path)


starts = [(-1.66, 1.03), (-1.08, 0.97), (-1.32, 0.38), (-0.82, 0.31), (-0.3, 1.6), (-2.0, -1.4), (1.9, 1.3)]
xs, ys = np.meshgrid(np.linspace(-2.2, 2.2, 300), np.linspace(-1.6, 1.7, 240))
Z = loss2d(np.stack([xs, ys], -1))
levels = [-0.09, -0.05, 0.0, 0.02, 0.06, 0.12, 0.25, 0.5, 0.8, 1.2, 1.8, 2.6, 3.6]

fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
for ax, (name, step) in zip(axes, [("gradient descent", gd_step), (r"SAM, $\rho$ = 0.1", sam_step)]):
    ax.contourf(xs, ys, Z, levels=levels + [10], cmap="viridis", alpha=0.85)
    ax.contour(xs, ys, Z, levels=levels, colors="w", linewidths=0.4)
    for w0 in starts:
        p = trajectory(step, w0)
        ax.plot(p[:, 0], p[:, 1], ".-", color="orange", ms=2.5, lw=0.8)
        ax.plot(*p[0], "o", color="w", mec="k", ms=5)
        ax.plot(*p[-1], "*", color="red", ms=11, mec="k")
    ax.annotate("sharp, L=-0.1", loss2d.c1, xytext=(-2.1, -0.2), color="w", arrowprops=dict(color="w", arrowstyle="->"))
    ax.annotate("flat, L=0", loss2d.c2, xytext=(1.2, 0.6), color="w", arrowprops=dict(color="w", arrowstyle="->"))
    ax.set(title=name, xlabel="$w_1$", aspect="equal")
    ax.grid(False)
axes[0].set_ylabel("$w_2$")
plt.tight_layout()
plt.show()

for w0 in starts:
    g_end, s_end = trajectory(gd_step, w0)[-1], trajectory(sam_step, w0)[-1]
    where = lambda w: "sharp" if np.linalg.norm(w - loss2d.c1) < 0.5 else "flat"
    print(f"start {str(w0):14s} GD -> {where(g_end):5s} (L = {loss2d(g_end):+.3f})   "
          f"SAM -> {where(s_end):5s} (L = {loss2d(s_end):+.3f})")

# %% [markdown]
# Gradient descent goes downhill to whichever minimum is nearest and stays there: four of the
# starts end in the sharp, deeper minimum. SAM falls into the sharp basin too, but cannot stay
# (section 4): it bounces across the bottom with a growing swing, leaves over the ridge and
# settles in the flat basin, where its swing is a few thousandths. Its final *training*
# loss is higher ($0$ rather than $-0.1$); what it bought is a minimum where the loss stays low
# in a whole neighbourhood.
#
# Here is one run of each in detail, from the first start: the loss along the way and the
# distance to the sharp minimum.

# %%
w0 = starts[0]
p_gd, p_sam = trajectory(gd_step, w0, 150), trajectory(sam_step, w0, 150)
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.plot(loss2d(p_gd), label="GD")
a.plot(loss2d(p_sam), label="SAM")
a.set(xlabel="step", ylabel="$L(w_t)$", ylim=(-0.15, 1.0), title="training loss")
b.plot(np.linalg.norm(p_gd - loss2d.c1, axis=1), label="GD")
b.plot(np.linalg.norm(p_sam - loss2d.c1, axis=1), label="SAM")
b.set(xlabel="step", ylabel=r"$\|w_t - c_1\|$", title="distance to the sharp minimum")
a.legend(); b.legend()
plt.tight_layout()
plt.show()


# %% [markdown]
# ## 6. The effect of $\rho$
#
# Now 2000 random starts in the square of side 1.6 around the sharp minimum, each run for 600
# steps, for a range of $\rho$. (minisam's `dual_vector` normalises by the global norm of its
# whole dictionary, right for one model, wrong for 2000 independent runs stacked in one array,
# so here the normalisation is per row.) We count the runs that end in the sharp basin (within
# 0.5 of $c_1$) and the loss they end at, and measure how far SAM hovers from the flat minimum.
#
# Section 4 predicts where SAM stops fitting in the sharp basin: when its swing
# $\eta\lambda_1\rho/(2-\eta\lambda_1)$ exceeds the distance $R$ from $c_1$ to the ridge
# (towards $c_2$), i.e. $\rho^* = R\,(2-\eta\lambda_1)/(\eta\lambda_1)$.

# %%
def run_many(w, rho, n=600, lr=LR):
    for _ in range(n):
        g = loss2d.grad(w)
        if rho > 0:
            g = loss2d.grad(w + rho * g / np.linalg.norm(g, axis=-1, keepdims=True))
        w = w - lr * g
    return w


rng = np.random.default_rng(0)
w0 = loss2d.c1 + rng.uniform(-0.8, 0.8, (2000, 2))
rhos = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
at_sharp, loss_there, hover = [], [], []
for rho in rhos:
    end = run_many(w0, rho)
    d1, d2 = np.linalg.norm(end - loss2d.c1, axis=1), np.linalg.norm(end - loss2d.c2, axis=1)
    at_sharp.append((d1 < 0.5).mean())
    loss_there.append(np.median(loss2d(end[d1 < 0.5])) if (d1 < 0.5).any() else np.nan)
    hover.append(np.median(d2[d2 < 0.5]) if (d2 < 0.5).any() else np.nan)

# distance from c1 to the ridge along the line to c2
u = (loss2d.c2 - loss2d.c1) / np.linalg.norm(loss2d.c2 - loss2d.c1)
t = np.linspace(0, 1, 20001)
L1 = loss2d.m1 + 0.5 * loss2d.lam1 * t**2
L2 = loss2d.m2 + 0.5 * loss2d.lam2 * (np.linalg.norm(loss2d.c2 - loss2d.c1) - t) ** 2
R = t[np.argmax(L1 > L2)]
k = LR * loss2d.lam1
rho_star = R * (2 - k) / k
print(f"ridge at R = {R:.3f} from the sharp minimum; predicted rho* = {rho_star:.3f}")
for rho, f, l in zip(rhos, at_sharp, loss_there):
    print(f"rho = {rho:4.2f}: {100 * f:5.1f}% of runs end in the sharp basin"
          + (f", at a median loss of {l:+.3f}" if f else ""))

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
a.plot(rhos, 100 * np.array(at_sharp), "o-")
a.axvline(rho_star, color="k", ls="--", lw=1, label=r"predicted $\rho^*$")
a.set(xlabel=r"$\rho$", ylabel="% of runs", title="runs ending in the sharp basin")
a.legend()
r = np.array(rhos[1:])
b.loglog(r, hover[1:], "o", label="measured (median)")
b.loglog(r, LR * loss2d.lam2 * r / (2 - LR * loss2d.lam2), "k-", lw=1, label=r"$\eta\lambda_2\rho/(2-\eta\lambda_2)$")
b.set(xlabel=r"$\rho$", ylabel="distance", title="how far SAM hovers from the flat minimum")
b.legend()
plt.tight_layout()
plt.show()

# %%
# What happens at rho = 0.25? Follow one of the runs that ends near the sharp basin.
rho = 0.25
end = run_many(w0, rho)
w = end[np.linalg.norm(end - loss2d.c1, axis=1) < 0.5][0]
side = lambda p: "sharp" if loss2d._bowls(p)[0] < loss2d._bowls(p)[1] else "flat "
for t in range(6):
    e = rho * dual_vector({"w": loss2d.grad(w)})[0]["w"]
    print(f"w - c1 = {np.round(w - loss2d.c1, 3)} ({side(w)} basin, L = {loss2d(w):+.3f})   "
          f"w + e - c1 = {np.round(w + e - loss2d.c1, 3)} ({side(w + e)} basin)")
    w = w - LR * loss2d.grad(w + e)

# %% [markdown]
# Three regimes:
#
# * **$\rho$ too small** ($\rho < \rho^*$): SAM stays in the sharp basin like gradient descent,
#   but not at its bottom: it swings at the amplitude of section 4, so the loss it ends at rises
#   quickly with $\rho$. The perturbation is too short for the swing to leave the basin.
# * **$\rho$ in the useful range** (here about $0.05$ to $0.2$): no run stays in the sharp basin,
#   and in the flat one SAM hovers at the predicted, tiny distance $\propto\rho$ (right panel).
# * **$\rho$ as large as the landscape's features** ($\rho \approx 0.25$ to $0.3$, about the
#   distance $R$ to the ridge): many runs get caught in a cycle across the ridge, at a loss worse
#   than either minimum. From just past the ridge on the flat side, "uphill" points back towards
#   the sharp basin, the perturbed point $w + \rho g/\|g\|$ lands in it, and the sharp basin's
#   steep gradient throws $w$ back over the ridge. The linearisation behind eq. 2 assumes that $L$
#   is nearly linear across the ball, and here it is not. (With larger $\rho$ still, the
#   perturbation jumps over the sharp basin altogether and the runs reach the flat basin again; do
#   not read much into that.)
#
# For real networks the paper tunes $\rho$ by grid search over
# $\{0.01, 0.02, 0.05, 0.1, 0.2, 0.5\}$, and $\rho = 0.05$ is the usual choice for
# WideResnets on CIFAR: a perturbation of norm $0.05$ on a weight vector of norm about $34$
# (notebook 03), small next to the scale of the weights. Notebooks 04 and 06 repeat this
# experiment on real training runs.
#
# **Takeaways**
#
# * Sharpness is how much the loss rises within distance $\rho$; SAM minimises the loss plus
#   that rise, $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$.
# * The inner maximisation is solved to first order: $\hat\epsilon = \rho\, g/\|g\|$, one step of
#   length $\rho$ uphill; the SAM gradient is the ordinary gradient taken at $w + \hat\epsilon$.
#   Two gradient evaluations per step.
# * Near a minimum SAM keeps moving: its swing grows with the curvature, so sharp minima are
#   unstable for it while flat ones are not.
# * $\rho$ has to be large enough to see the sharpness and small enough for the first-order
#   picture to hold.
#
# Next: [02 · Backprop by hand](02_backprop_by_hand.ipynb) builds the gradient of a real network,
# layer by layer.

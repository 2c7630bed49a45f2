"""Write (and with --execute, run in place) the tutorial notebooks 01-03.

The notebooks are the product; this script is only how they were typed. Edit a cell here,
then regenerate and re-execute so the committed outputs match the code:

    python tutorials/_build.py --execute        # from the repository root

Needs nbformat (and nbclient + ipykernel for --execute): `pip install -e '.[dev]'`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every notebook starts with this cell: find the repository root from the working
# directory (tutorials/ or the root itself) so `import minisam` works without installing.
SETUP = '''\
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`
'''


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------------------
# 01: sharp and flat minima
# --------------------------------------------------------------------------------------
def nb01():
    c = []
    c.append(md(r"""
# 01 · Sharp and flat minima, and what SAM does about them

*Sharpness-Aware Minimization* (SAM; Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021) trains a
network to sit in a region where the loss is low **and stays low in a whole neighbourhood**.
This notebook builds the intuition on toy losses of one and two variables, where everything
(loss, gradient, the worst-case neighbour) can be computed exactly and drawn. No network yet:
only NumPy, analytic gradients, and one function from minisam, `minisam.sam.dual_vector`,
which is the very function the WideResnet training uses.

What you will see:

1. a 1-D loss with a **sharp** and a **flat** minimum, and the SAM objective
   $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$ that tells them apart;
2. SAM's first-order answer to the inner maximisation, $\hat\epsilon = \rho\, g/\|g\|$
   (eq. 2 of the paper), and how good an approximation it is;
3. why SAM cannot sit at the bottom of a sharp basin;
4. gradient descent and SAM side by side on a 2-D loss with a sharp and a flat basin;
5. the effect of $\rho$.
"""))
    c.append(code(SETUP + '''
import inspect

import numpy as np
import matplotlib.pyplot as plt

import minisam
from minisam.sam import dual_vector

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
'''))
    c.append(md(r"""
## 1. A loss with a sharp and a flat minimum

Our toy loss glues two quadratic bowls together with a smooth minimum:

$$
L_1(w) = m_1 + \tfrac{\lambda_1}{2}\|w-c_1\|^2 \;\;(\text{sharp: } \lambda_1 = 40),\qquad
L_2(w) = m_2 + \tfrac{\lambda_2}{2}\|w-c_2\|^2 \;\;(\text{flat: } \lambda_2 = 1),
$$
$$
L(w) = -T \log\left(e^{-L_1(w)/T} + e^{-L_2(w)/T}\right) \approx \min(L_1, L_2),\qquad T = 0.05 .
$$

The curvature $\lambda$ (the Hessian's eigenvalue at the minimum) is what we call **sharpness**
here. The sharp minimum is also the *deeper* one ($m_1 = -0.1 < m_2 = 0$): judged by the
training loss alone, it is the better of the two. The gradient is the softmax-weighted mix of
the two bowls' gradients, $\nabla L = p_1 \nabla L_1 + (1-p_1)\nabla L_2$ with
$p_1 = e^{-L_1/T} / (e^{-L_1/T} + e^{-L_2/T})$. The same class serves for 1-D and 2-D:
points have shape `(..., d)`.
"""))
    c.append(code('''
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
'''))
    c.append(md(r"""
## 2. The SAM objective

SAM replaces the training loss by the worst loss within a ball of radius $\rho$ around the
weights and minimises that (plus weight decay):

$$
\min_w \; L^{SAM}(w) + \lambda_{wd}\|w\|_2^2, \qquad
L^{SAM}(w) = \max_{\|\epsilon\|_p \le \rho} L(w+\epsilon).
$$

Writing it as
$L^{SAM}(w) = \big[\max_{\|\epsilon\|_p\le\rho} L(w+\epsilon) - L(w)\big] + L(w)$ shows the
two things it asks for: a low training loss $L(w)$, and a low **sharpness**, the bracket: how
much the loss can rise when the weights move by $\rho$. (The paper motivates this by a
PAC-Bayes bound in which exactly this sharpness term appears.)

At the bottom of a quadratic bowl the sharpness is $\tfrac12\lambda\rho^2$: forty times larger
in the sharp bowl than in the flat one. In 1-D we can compute $L^{SAM}$ by brute force,
maximising over a fine grid of $\epsilon \in [-\rho, \rho]$:
"""))
    c.append(code('''
def sam_objective(loss, ws, rho, n=401):
    """max_{|e| <= rho} loss(w + e) for each 1-D point in ws (shape [N, 1]), by brute force."""
    eps = np.linspace(-rho, rho, n)
    return loss(ws[:, None, :] + eps[None, :, None]).max(axis=1)


ws = np.linspace(-2.0, 2.6, 1201)[:, None]
fig, ax = plt.subplots(figsize=(8, 4))
ax.plot(ws[:, 0], loss1d(ws), "k", lw=2, label="$L(w)$")
for rho, col in [(0.05, "C0"), (0.1, "C1"), (0.2, "C3")]:
    ax.plot(ws[:, 0], sam_objective(loss1d, ws, rho), col, label=rf"$L^{{SAM}}$, $\\rho$ = {rho}")
ax.set(xlabel="$w$", ylabel="loss", ylim=(-0.15, 1.0), title="sharp minimum at $w=-1$, flat minimum at $w=1$")
ax.legend()
plt.show()

print(f"{'rho':>5} | {'L^SAM at sharp min':>18} {'L^SAM at flat min':>18} | preferred")
for rho in [0.0, 0.05, 0.1, 0.2]:
    s = sam_objective(loss1d, np.array([[-1.0]]), rho)[0] if rho else loss1d(np.array([-1.0]))
    f = sam_objective(loss1d, np.array([[1.0]]), rho)[0] if rho else loss1d(np.array([1.0]))
    print(f"{rho:5.2f} | {float(s):18.4f} {float(f):18.4f} | {'sharp' if s < f else 'flat'}")
'''))
    c.append(md(r"""
With $\rho = 0$ the sharp minimum wins (it is deeper). As soon as $\rho$ is large enough that
$m_1 + \tfrac12\lambda_1\rho^2 > m_2 + \tfrac12\lambda_2\rho^2$ (here $\rho \gtrsim 0.07$), the
SAM objective ranks the flat minimum first: the sharp valley is "filled in" while the flat one
barely moves.

## 3. Solving the inner maximisation to first order

In a network with millions of weights we cannot search the ball. SAM linearises the loss
around $w$, $L(w+\epsilon) \approx L(w) + \epsilon^\top \nabla L(w)$, and maximises the linear
function over the $p$-norm ball. That is a dual-norm problem with a closed-form answer
(eq. 2 of the paper, with $1/p + 1/q = 1$):

$$
\hat\epsilon(w) = \rho\, \operatorname{sign}\!\big(\nabla L(w)\big)\,
\frac{|\nabla L(w)|^{q-1}}{\big(\|\nabla L(w)\|_q^q\big)^{1/p}}
\;\;\overset{p=q=2}{=}\;\; \rho\,\frac{\nabla L(w)}{\|\nabla L(w)\|_2}.
$$

With $p = 2$ (what the paper and its code use) the perturbation is a step of length $\rho$
straight uphill. Then SAM approximates the gradient of $L^{SAM}$ by the gradient of $L$ *at
the perturbed point*, dropping the term that would need the derivative of $\hat\epsilon$ with
respect to $w$ (a Hessian-vector product):

$$
\nabla L^{SAM}(w) \approx \nabla L(w)\big|_{w+\hat\epsilon(w)} .
$$

So one SAM step costs two gradients: $g = \nabla L(w)$, then $g_{SAM} = \nabla L(w + \rho g/\|g\|)$,
then $w \leftarrow w - \eta\, g_{SAM}$ (Algorithm 1). minisam's `dual_vector` computes
$g/\|g\|$ for a whole dictionary of parameter arrays, with the **global** norm over all of them
(as if all the arrays were one long vector), exactly like the JAX code:
"""))
    c.append(code('''
print(inspect.getsource(minisam.optim.global_norm))
print(inspect.getsource(dual_vector))

# It works on any dict of arrays: a 1-D toy weight, or two named arrays at once.
direction, norm = dual_vector({"w": loss1d.grad(np.array([-0.8]))})
print("1-D: g =", loss1d.grad(np.array([-0.8])), "-> direction", direction["w"], "(the sign of g)")
direction, norm = dual_vector({"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])})
print("dict: ||g|| =", norm, " direction =", direction)
'''))
    c.append(md(r"""
How good is the first-order answer? In 1-D, $\hat\epsilon = \rho\,\mathrm{sign}(L'(w))$: always
the uphill end of the interval. The exact maximiser $\epsilon^*$ agrees everywhere except near
the minima and near the ridge between the basins, where the loss is far from linear on the
scale of $\rho$. The right panel compares the SAM gradient $L'(w+\hat\epsilon)$ with the true
derivative of $L^{SAM}$ (by finite differences of the brute-force curve).
"""))
    c.append(code('''
rho = 0.1
eps_grid = np.linspace(-rho, rho, 401)
exact_eps = eps_grid[loss1d(ws[:, None, :] + eps_grid[None, :, None]).argmax(axis=1)]
first_order = np.array([rho * dual_vector({"w": loss1d.grad(w)})[0]["w"][0] for w in ws])

sam_curve = sam_objective(loss1d, ws, rho)
d_sam = np.gradient(sam_curve, ws[:, 0])
g_sam = loss1d.grad(ws + first_order[:, None])[:, 0]

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
a.plot(ws[:, 0], exact_eps, "k", lw=3, alpha=0.4, label=r"exact $\\epsilon^*$ (grid search)")
a.plot(ws[:, 0], first_order, "C1", label=r"first order $\\hat\\epsilon = \\rho\\, g/|g|$")
a.set(xlabel="$w$", ylabel=r"$\\epsilon$", title=rf"the perturbation, $\\rho$ = {rho}")
a.legend(loc="lower right")
b.plot(ws[:, 0], loss1d.grad(ws)[:, 0], "0.6", label="$L'(w)$")
b.plot(ws[:, 0], d_sam, "k", lw=3, alpha=0.4, label=r"$dL^{SAM}/dw$ (exact)")
b.plot(ws[:, 0], g_sam, "C1", label=r"SAM gradient $L'(w+\\hat\\epsilon)$")
b.set(xlabel="$w$", ylim=(-6, 6), title="gradients")
b.legend(loc="lower right")
plt.tight_layout()
plt.show()
'''))
    c.append(md(r"""
## 4. Why SAM cannot sit at the bottom of a sharp basin

Take one quadratic bowl $L = \tfrac{\lambda}{2}w^2$ and run SAM with learning rate $\eta$. Then
$g = \lambda w$, $\hat\epsilon = \rho\,\mathrm{sign}(w)$ and the update is

$$
w \leftarrow w - \eta\lambda\big(w + \rho\,\mathrm{sign}(w)\big).
$$

Gradient descent ($\rho = 0$) converges to $0$ whenever $\eta\lambda < 2$. SAM does not: the
perturbation always points away from the bottom, so the step always overshoots by
$\eta\lambda\rho$. Looking for a 2-cycle $w \to -w \to w$ gives its amplitude

$$
a = \frac{\eta\lambda\rho}{2 - \eta\lambda}.
$$

It grows with the curvature and blows up as $\eta\lambda \to 2$. (The 2-cycle is not the only
orbit: from some starts SAM wanders inside $|w| \le \eta\lambda\rho \approx 2a$ instead, but
the scale is the same.) With $\eta = 0.045$ and $\rho = 0.05$: in the flat bowl
($\lambda = 1$) SAM stays about $0.001$ from the minimum; in the sharp bowl ($\lambda = 40$,
$\eta\lambda = 1.8$) it swings $0.45$ away, which in our two-basin loss is already past the
ridge into the flat basin.
"""))
    c.append(code('''
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
ax.set(xlabel="step", ylabel="|w - minimum|", ylim=(1e-6, 1), title=rf"quadratic bowls, $\\eta$ = {lr}, $\\rho$ = {rho}")
ax.legend(ncol=2)
plt.show()
'''))
    c.append(md(r"""
## 5. Gradient descent and SAM on a 2-D loss

The same construction in two dimensions: a sharp bowl at $c_1 = (-1, 0.5)$ ($\lambda_1 = 40$,
minimum $-0.1$) and a flat one at $c_2 = (1, -0.5)$ ($\lambda_2 = 1$, minimum $0$). Both
methods use the learning rate $\eta = 0.045$, small enough that gradient descent is stable in
the sharp basin ($\eta\lambda_1 = 1.8 < 2$). The SAM step is written with minisam's
`dual_vector` on a one-entry parameter dictionary, as it is for the WideResnet:
"""))
    c.append(code('''
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
for ax, (name, step) in zip(axes, [("gradient descent", gd_step), (r"SAM, $\\rho$ = 0.1", sam_step)]):
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
'''))
    c.append(md(r"""
Gradient descent goes downhill to whichever minimum is nearest and stays there: four of the
starts end in the sharp, deeper minimum. SAM falls into the sharp basin too, but cannot stay
(section 4): it bounces across the bottom with a growing swing, leaves over the ridge and
settles in the flat basin, where its swing is a few thousandths. Its final *training*
loss is higher ($0$ rather than $-0.1$); what it bought is a minimum where the loss stays low
in a whole neighbourhood.

Here is one run of each in detail, from the first start: the loss along the way and the
distance to the sharp minimum.
"""))
    c.append(code('''
w0 = starts[0]
p_gd, p_sam = trajectory(gd_step, w0, 150), trajectory(sam_step, w0, 150)
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.plot(loss2d(p_gd), label="GD")
a.plot(loss2d(p_sam), label="SAM")
a.set(xlabel="step", ylabel="$L(w_t)$", ylim=(-0.15, 1.0), title="training loss")
b.plot(np.linalg.norm(p_gd - loss2d.c1, axis=1), label="GD")
b.plot(np.linalg.norm(p_sam - loss2d.c1, axis=1), label="SAM")
b.set(xlabel="step", ylabel=r"$\\|w_t - c_1\\|$", title="distance to the sharp minimum")
a.legend(); b.legend()
plt.tight_layout()
plt.show()
'''))
    c.append(md(r"""
## 6. The effect of $\rho$

Now 2000 random starts in the square of side 1.6 around the sharp minimum, each run for 600
steps, for a range of $\rho$. (minisam's `dual_vector` normalises by the global norm of its
whole dictionary, right for one model, wrong for 2000 independent runs stacked in one array,
so here the normalisation is per row.) We count the runs that end in the sharp basin (within
0.5 of $c_1$) and the loss they end at, and measure how far SAM hovers from the flat minimum.

Section 4 predicts where SAM stops fitting in the sharp basin: when its swing
$\eta\lambda_1\rho/(2-\eta\lambda_1)$ exceeds the distance $R$ from $c_1$ to the ridge
(towards $c_2$), i.e. $\rho^* = R\,(2-\eta\lambda_1)/(\eta\lambda_1)$.
"""))
    c.append(code('''
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
a.axvline(rho_star, color="k", ls="--", lw=1, label=r"predicted $\\rho^*$")
a.set(xlabel=r"$\\rho$", ylabel="% of runs", title="runs ending in the sharp basin")
a.legend()
r = np.array(rhos[1:])
b.loglog(r, hover[1:], "o", label="measured (median)")
b.loglog(r, LR * loss2d.lam2 * r / (2 - LR * loss2d.lam2), "k-", lw=1, label=r"$\\eta\\lambda_2\\rho/(2-\\eta\\lambda_2)$")
b.set(xlabel=r"$\\rho$", ylabel="distance", title="how far SAM hovers from the flat minimum")
b.legend()
plt.tight_layout()
plt.show()
'''))
    c.append(code('''
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
'''))
    c.append(md(r"""
Three regimes:

* **$\rho$ too small** ($\rho < \rho^*$): SAM stays in the sharp basin like gradient descent,
  but not at its bottom: it swings at the amplitude of section 4, so the loss it ends at rises
  quickly with $\rho$. The perturbation is too short for the swing to leave the basin.
* **$\rho$ in the useful range** (here about $0.05$ to $0.2$): no run stays in the sharp basin,
  and in the flat one SAM hovers at the predicted, tiny distance $\propto\rho$ (right panel).
* **$\rho$ as large as the landscape's features** ($\rho \approx 0.25$ to $0.3$, about the
  distance $R$ to the ridge): many runs get caught in a cycle across the ridge, at a loss worse
  than either minimum. From just past the ridge on the flat side, "uphill" points back towards
  the sharp basin, the perturbed point $w + \rho g/\|g\|$ lands in it, and the sharp basin's
  steep gradient throws $w$ back over the ridge. The linearisation behind eq. 2 assumes that $L$
  is nearly linear across the ball, and here it is not. (With larger $\rho$ still, the
  perturbation jumps over the sharp basin altogether and the runs reach the flat basin again; do
  not read much into that.)

For real networks the paper tunes $\rho$ by grid search over
$\{0.01, 0.02, 0.05, 0.1, 0.2, 0.5\}$, and $\rho = 0.05$ is the usual choice for
WideResnets on CIFAR: a perturbation of norm $0.05$ on a weight vector of norm about $34$
(notebook 03), small next to the scale of the weights. Notebooks 04 and 06 repeat this
experiment on real training runs.

**Takeaways**

* Sharpness is how much the loss rises within distance $\rho$; SAM minimises the loss plus
  that rise, $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$.
* The inner maximisation is solved to first order: $\hat\epsilon = \rho\, g/\|g\|$, one step of
  length $\rho$ uphill; the SAM gradient is the ordinary gradient taken at $w + \hat\epsilon$.
  Two gradient evaluations per step.
* Near a minimum SAM keeps moving: its swing grows with the curvature, so sharp minima are
  unstable for it while flat ones are not.
* $\rho$ has to be large enough to see the sharpness and small enough for the first-order
  picture to hold.

Next: [02 · Backprop by hand](02_backprop_by_hand.ipynb) builds the gradient of a real network,
layer by layer.
"""))
    return c


# --------------------------------------------------------------------------------------
# 02: backprop by hand
# --------------------------------------------------------------------------------------
def nb02():
    c = []
    c.append(md(r"""
# 02 · Backprop by hand

SAM needs two gradients per step, so everything rests on the gradient being right. minisam
has no autodiff: every layer is a small class with a `forward(x, train)` that keeps what it
needs on `self`, and a hand-written `backward(dy)` that takes $\partial L/\partial y$, stores
$\partial L/\partial\theta$ for its parameters in `self.grads` and returns
$\partial L/\partial x$. This notebook goes through each layer of the WideResnet, shows its
source and its maths, and checks its backward against finite differences in float64.

Layout conventions (those of the JAX code): activations are NHWC `[batch, height, width,
channels]`, conv kernels HWIO `[kh, kw, in, out]`, dense kernels `[in, out]`.
"""))
    c.append(code(SETUP + '''
import inspect
import time

import numpy as np
import matplotlib.pyplot as plt

from minisam.nn import (AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut,
                        conv2d_loop, conv2d_loop_backward, im2col, one_hot, same_padding,
                        softmax_cross_entropy)
from minisam.models.wide_resnet import WideResnet, WideResnetBlock

plt.rcParams.update({"figure.dpi": 80})
np.set_printoptions(precision=4, suppress=True)
print(inspect.getsource(ReLU))
'''))
    c.append(md(r"""
## A gradient checker

For a layer $y = f(x; \theta)$ pick a random "upstream gradient" $\bar y$ (the $\partial
L/\partial y$ a later layer would send) and look at the scalar
$\ell(x, \theta) = \langle f(x;\theta), \bar y\rangle$. Its gradient with respect to $x$ is exactly
what `backward(dy=ȳ)` returns, and its gradient with respect to $\theta$ is what it stores
in `grads`. Rather than compare whole gradient arrays with finite differences (one pair of
forward passes per entry), compare a **directional derivative** along a random direction $v$:

$$
\big\langle \nabla_x \ell,\, v\big\rangle \;\approx\; \frac{\ell(x + hv) - \ell(x - hv)}{2h}.
$$

The central difference has error $O(h^2)$, so in float64 with $h = 10^{-6}$ both sides agree
to about $10^{-8}$ relative, or better (in float32 rounding would swamp it: always check in
float64). One pair of forward passes per tensor, and a wrong entry anywhere shows up,
since $v$ touches every entry. This is the shape of Chainer's `check_backward`, and the
checker minisam's test suite uses.

The checker works on any `Layer`: `get_params()` / `set_params()` and `get_grads()` walk a
composite layer's children, so the same function checks a conv, a residual block or the
whole network.
"""))
    c.append(code('''
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
'''))
    c.append(md(r"""
## 1. Convolution

A 2-D convolution (no bias, as in the WideResnet) with stride $s$:

$$
y_{n,i,j,o} = \sum_{a,b,c} x^{pad}_{n,\, is+a,\, js+b,\, c}\; k_{a,b,c,o}.
$$

The padding is XLA's `SAME`: the output has $\lceil \text{in}/s\rceil$ pixels and the total
padding $\max((\text{out}-1)s + k - \text{in}, 0)$ is split with the smaller half *before*. A
stride-2 $3\times3$ conv on an even input therefore pads 0 before and 1 after, not 1 and 1,
one of the details that must match the JAX code to the last bit:
"""))
    c.append(code('''
for size, k, s in [(32, 3, 1), (32, 3, 2), (7, 3, 2)]:
    low, high, out = same_padding(size, k, s)
    print(f"input {size:2d}, kernel {k}, stride {s}: pad {low} before, {high} after -> output {out}")
print()
print(inspect.getsource(conv2d_loop))
'''))
    c.append(md(r"""
The loop form is the definition, one output pixel at a time. Its backward is the chain rule
on that one line: output pixel $(i, j)$ read the patch $x^{pad}_{:, is:is+k_h, js:js+k_w, :}$, so

$$
\frac{\partial L}{\partial k_{a,b,c,o}} = \sum_{n,i,j} x^{pad}_{n,is+a,js+b,c}\,\bar y_{n,i,j,o},
\qquad
\frac{\partial L}{\partial x^{pad}_{n,is+a,js+b,c}} \mathrel{+}= \sum_o k_{a,b,c,o}\,\bar y_{n,i,j,o},
$$

and the padding is cut off at the end.
"""))
    c.append(code('print(inspect.getsource(conv2d_loop_backward))'))
    c.append(md(r"""
### im2col: the same sums as one matrix product

Copy every receptive field (the $k_h \times k_w \times C$ patch an output pixel reads) into one
row of a matrix `cols` of shape $[N \cdot H_{out} \cdot W_{out},\; k_h k_w C]$. Then the whole
convolution is one GEMM, `cols @ kernel.reshape(kh*kw*C, out)`, which BLAS runs at full speed.
The picture below is `im2col` of a $4\times4$ one-channel image with pixels numbered 1 to 16,
a $3\times3$ kernel and SAME padding (zeros shown as blanks): row $r$ is the patch of output pixel
$r$.
"""))
    c.append(code('''
print(inspect.getsource(im2col))

img = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
low, high, out = same_padding(4, 3, 1)
xpad = np.pad(img, ((0, 0), (low, high), (low, high), (0, 0)))
cols = im2col(xpad, 3, 3, 1, out, out).reshape(-1, 9)

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 5), gridspec_kw={"width_ratios": [1, 1.3]})
a.imshow(xpad[0, :, :, 0] > 0, cmap="Blues", vmin=0, vmax=2)
for (i, j), v in np.ndenumerate(xpad[0, :, :, 0]):
    a.text(j, i, f"{v:.0f}" if v else "", ha="center", va="center")
a.set(title="padded image (SAME, pad 1)", xticks=[], yticks=[])
b.imshow(cols > 0, cmap="Blues", vmin=0, vmax=2, aspect="auto")
for (i, j), v in np.ndenumerate(cols):
    b.text(j, i, f"{v:.0f}" if v else "", ha="center", va="center", fontsize=8)
b.set(title="im2col: one row per output pixel", xlabel="(a, b) position in the 3x3 window",
      ylabel="output pixel", xticks=range(9), yticks=range(16))
plt.tight_layout()
plt.show()
'''))
    c.append(md(r"""
`Conv.forward` is im2col plus one GEMM. It calls `im2col_strided`, which builds the same
matrix as one copy out of a strided *view* of the padded input (the view's strides step
through each pixel kh*kw times; no data moves until the copy), faster than the nine slice
copies above because NumPy then copies kw*C contiguous floats at a time instead of C
(the tests hold the two equal). `Conv.backward` is two more GEMMs,
$\partial L/\partial k = \text{cols}^\top \bar y$ and $\partial L/\partial\,\text{cols} = \bar y\, k^\top$,
and `col2im`, the adjoint of the copy, which adds every row back onto the pixels it came from
(pixels read by several windows collect several contributions).
"""))
    c.append(code('''
print(inspect.getsource(Conv.forward))
print(inspect.getsource(Conv.backward))
'''))
    c.append(md("The two forms agree to float32 rounding (errors relative to each array's largest entry), forward and backward, for both strides. Then a timing: what the single GEMM buys depends on the shape and on the machine's BLAS (the loop pays Python's overhead once per output pixel):"))
    c.append(code('''
rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
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
'''))
    c.append(md("And the finite-difference check of the fast form, with and without stride (7 is odd, so the stride-2 case pads 1 before and 1 after):"))
    c.append(code('''
rng = np.random.default_rng(1)
check_layer("Conv 3x3 stride 1", Conv(3, 4, 3, 1, rng), rng.standard_normal((2, 6, 6, 3)))
check_layer("Conv 3x3 stride 2", Conv(3, 4, 3, 2, rng), rng.standard_normal((2, 6, 6, 3)))
check_layer("Conv 3x3 stride 2, odd input", Conv(3, 4, 3, 2, rng), rng.standard_normal((2, 7, 7, 3)))
'''))
    c.append(md(r"""
## 2. Batch normalisation

In training mode, per channel, over the $M = N \cdot H \cdot W$ positions (flax's semantics,
biased variance, $\varepsilon = 10^{-5}$):

$$
\mu = \tfrac1M\textstyle\sum x,\qquad \sigma^2 = \tfrac1M\sum x^2 - \mu^2,\qquad
\hat x = \frac{x-\mu}{\sqrt{\sigma^2+\varepsilon}},\qquad y = \gamma\,\hat x + \beta .
$$

The backward is the one derivation in this notebook worth doing on paper once. $\beta$ and
$\gamma$ are easy: $\partial L/\partial\beta = \sum \bar y$, $\partial L/\partial\gamma = \sum \bar y\,\hat x$.
For $x$, every $\hat x$ depends on every $x$ of its channel through $\mu$ and $\sigma^2$; summing
the three paths gives

$$
\frac{\partial L}{\partial x} = \frac{\gamma}{M\sqrt{\sigma^2+\varepsilon}}
\Big(M\,\bar y - \textstyle\sum \bar y - \hat x \sum \bar y\,\hat x\Big),
$$

which reuses the two parameter gradients. In eval mode $\mu, \sigma^2$ are the running
statistics, constants, and $\partial L/\partial x = \bar y\,\gamma/\sqrt{\sigma^2+\varepsilon}$.

The code computes exactly this, rearranged for speed: expanding the bracket gives
$\partial L/\partial x = a\,\bar y - b\,(x-\mu) - c$ with per-channel
$a = \gamma/\sqrt{\sigma^2+\varepsilon}$, $b = a\sum\bar y\,\hat x / (M\sqrt{\sigma^2+\varepsilon})$ and
$c = a\sum\bar y/M$: three passes over the data, and $\hat x$ is never stored
(`batchnorm_reference_backward` in the same file is the formula as written, and the tests
hold the two equal).
"""))
    c.append(code('''
print(inspect.getsource(BatchNorm.backward))
rng = np.random.default_rng(2)
bn = BatchNorm(5)
bn.params = {"scale": rng.uniform(0.5, 1.5, 5), "bias": rng.standard_normal(5)}
x = 3 + 2 * rng.standard_normal((4, 3, 3, 5))
check_layer("BatchNorm, train mode", bn, x, train=True)
bn.state = {"mean": rng.standard_normal(5), "var": rng.uniform(0.5, 2, 5)}
check_layer("BatchNorm, eval mode", bn, x, train=False)
'''))
    c.append(md(r"""
## 3. ReLU

$y = \max(x, 0)$ and $\partial L/\partial x = \bar y\cdot[x > 0]$: the mask saved by forward
(source at the top). The check is fine as long as no input lies within $h$ of the kink, where
the function is not differentiable and a finite difference straddles two slopes; with random
normal inputs and $h = 10^{-6}$ the chance is about $10^{-6}$ per entry. Notebook 03 meets the
float32 version of this problem in a real network: one ReLU input out of about a million sits
within rounding of zero, and it matters.
"""))
    c.append(code('''
rng = np.random.default_rng(3)
x = rng.standard_normal((2, 4, 4, 3))
print("closest input to the kink:", np.abs(x).min())
check_layer("ReLU", ReLU(), x)
'''))
    c.append(md(r"""
## 4. Pooling and the residual shortcut

* `AvgPool(s)`: the mean over non-overlapping $s\times s$ windows. Backward spreads each output
  gradient evenly: $\bar y/s^2$ to each pixel of its window.
* `Shortcut`: when a residual block changes the number of channels, the WideResnet's
  shortcut average-pools by the stride and appends zero channels. Backward drops the gradient
  of the padded channels, then runs the pool's backward.
* `GlobalAvgPool`: the mean over $H, W$ before the classifier; backward broadcasts
  $\bar y/(HW)$.
"""))
    c.append(code('''
print(inspect.getsource(Shortcut))
rng = np.random.default_rng(4)
check_layer("AvgPool 2x2", AvgPool(2), rng.standard_normal((2, 6, 6, 3)))
check_layer("Shortcut (pool 2, 3 -> 5 channels)", Shortcut(2, 5), rng.standard_normal((2, 6, 6, 3)))
check_layer("GlobalAvgPool", GlobalAvgPool(), rng.standard_normal((2, 5, 5, 3)))
'''))
    c.append(md(r"""
## 5. Dense

$y = xK + b$ with $K$ of shape $[\text{in}, \text{out}]$:
$\partial L/\partial K = x^\top \bar y$, $\partial L/\partial b = \sum_n \bar y_n$,
$\partial L/\partial x = \bar y K^\top$.
"""))
    c.append(code('''
print(inspect.getsource(Dense.backward))
rng = np.random.default_rng(5)
dense = Dense(6, 4, rng)
dense.params["bias"] = rng.standard_normal(4).astype(np.float32)
check_layer("Dense", dense, rng.standard_normal((3, 6)))
'''))
    c.append(md(r"""
## 6. Softmax cross-entropy

With logits $z \in \mathbb R^{B\times K}$, one-hot labels $y$ and label smoothing $s$ (targets
$y' = (1-s)\,y + s/K$, each row summing to one):

$$
\mathcal L = -\frac1B \sum_{n,k} y'_{nk} \log \operatorname{softmax}(z_n)_k,
\qquad
\frac{\partial\mathcal L}{\partial z} = \frac{\operatorname{softmax}(z) - y'}{B}.
$$

(Differentiate $\log\operatorname{softmax}(z)_k = z_k - \log\sum_j e^{z_j}$: the first term
gives $-y'$, the second $\operatorname{softmax}(z)\sum_k y'_k = \operatorname{softmax}(z)$.)
The loss is the start of backprop, so it returns the loss and $\partial\mathcal L/\partial z$
together, and its check is of a scalar function:
"""))
    c.append(code('''
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
'''))
    c.append(md(r"""
## 7. Putting them together: a residual block, then the whole network

A composite layer spells out its own backward in reverse order of its forward. In a residual
block $y = \text{branch}(x) + \text{shortcut}(x)$, the upstream gradient flows unchanged into
**both** paths, and the two gradients are **added** where the paths started. In the first block
of the WideResnet (`activate_before_residual`) both paths start after the first BN + ReLU, so
the sum is taken before that BN + ReLU's backward; in the other blocks the shortcut carries the
raw input and the sum is taken at the input.
"""))
    c.append(code('''
print(inspect.getsource(WideResnetBlock.backward))
rng = np.random.default_rng(7)
check_layer("Block (stride 2, 4 -> 6 channels)", WideResnetBlock(4, 6, stride=2, rng=rng),
            rng.standard_normal((2, 8, 8, 4)))
check_layer("Block (activate_before_residual)", WideResnetBlock(4, 4, activate_before_residual=True, rng=rng),
            rng.standard_normal((2, 6, 6, 4)))
'''))
    c.append(md(r"""
Finally the whole WideResnet (WRN-10-1 here: one block per group, width 16/16/32/64) with its
loss on a batch of two $8\times8$ images, in float64. The gradient of the loss with respect to
*all* parameters at once is checked along one random direction in the 75,290-dimensional
parameter space: the directional derivative is $\sum_k\langle g_k, v_k\rangle$ over every
parameter array $k$. This is the gradient SAM uses, twice per step.
"""))
    c.append(code('''
rng = np.random.default_rng(8)
model = to64(WideResnet(1, 1, num_outputs=10, seed=0))
params = model.get_params()
print(f"WideResnet(1, 1, 10): {model.num_params():,} parameters in {len(params)} arrays")
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
'''))
    c.append(md("## Summary"))
    c.append(code('''
names, errs = zip(*RESULTS)
fig, ax = plt.subplots(figsize=(9, 0.2 * len(names) + 1))
ax.barh(range(len(names)), errs, color="C0")
ax.set_xscale("log")
ax.axvline(1e-6, color="C3", ls="--", lw=1, label="the test suite's tolerance, 1e-6")
ax.set_yticks(range(len(names)), names, fontsize=8)
ax.invert_yaxis()
ax.set(xlabel="relative error of the directional derivative (float64, h = 1e-6)",
       title=f"{len(names)} gradient checks, worst {max(errs):.1e}")
ax.legend(loc="lower right")
plt.tight_layout()
plt.show()
assert max(errs) < 1e-6
'''))
    c.append(md(r"""
Every backward agrees with finite differences to about $10^{-8}$ or better, as far as a
central difference in float64 can tell. The same checks run in `tests/test_layers.py` and
`tests/test_model.py` on every commit.

Next: [03 · One SAM step, step by step](03_sam_step_by_step.ipynb) runs these layers in float32
on a real WideResnet and compares every intermediate of a SAM step with the original JAX code.
"""))
    return c


# --------------------------------------------------------------------------------------
# 03: one SAM step, step by step
# --------------------------------------------------------------------------------------
def nb03():
    c = []
    c.append(md(r"""
# 03 · One SAM step, step by step, against the JAX reference

`reference_results/wrn10x2_single.npz` holds one run of the original JAX code
(google-research/sam, its own `train_step`, model and optimizer): a WideResnet-10-2 with
292,954 parameters, a batch of 8 random $32\times32$ images, $\rho = 0.05$, weight decay
$5\cdot10^{-4}$, gradient clipping at norm 5, Nesterov momentum 0.9 and learning rate 0.1, and
**every intermediate value** of the first SAM step: the gradient, the perturbation, the SAM
gradient, the clipped gradient, the new parameters and momentum. Here we redo that step one line
at a time with minisam and compare each value as we go.

The step (Algorithm 1 of the paper, in the order the JAX code does it):

1. $g = \nabla L(w)$ on the batch, where $L$ = cross-entropy $+ \tfrac{wd}2\|w\|^2$ over *all*
   parameters; the BN running statistics of this pass are kept;
2. $\hat\epsilon = \rho\, g / \|g\|$ (eq. 2, global norm);
3. $g_{SAM} = \nabla L(w + \hat\epsilon)$, weight decay evaluated at $w+\hat\epsilon$ too; this
   pass's BN statistics are thrown away;
4. clip $g_{SAM}$ to global norm 5, then a Nesterov momentum step.
"""))
    c.append(code(SETUP + '''
import inspect

import numpy as np
import matplotlib.pyplot as plt

from minisam.models import WideResnet
from minisam.nn import ReLU, one_hot
from minisam.optim import clip_by_global_norm, cosine_schedule, global_norm, nesterov_init, nesterov_update
from minisam.reference import format_rows, load_case
from minisam.ties import describe_tie
from minisam.verify import verify
from minisam.sam import SAMConfig, dual_vector, loss_and_grad, train_step

plt.rcParams.update({"figure.dpi": 80})
CASE = str(ROOT / "reference_results" / "wrn10x2_single.npz")
print(inspect.getsource(train_step))
'''))
    c.append(md(r"""
## Load the case

`load_case` returns the arrays (keyed by the JAX code's flax paths) and the manifest, whose
`config` says how the case was run. The inputs follow a documented recipe
(`np.random.RandomState(0)` normal images and random labels), and the initial parameters are
stored, so we do not need JAX's random number generator.
"""))
    c.append(code('''
arrays, manifest = load_case(CASE)
cfg = manifest["config"]
print({k: cfg[k] for k in ("blocks_per_group", "channel_multiplier", "num_outputs", "batch_size",
                           "sam_rho", "weight_decay", "gradient_clipping", "learning_rate")})
groups = {}
for k in arrays:
    groups.setdefault("/".join(k.split("/")[:2]), []).append(k)
print(f"{len(arrays)} arrays, e.g.:")
for g, ks in list(groups.items())[:14]:
    print(f"   {g + '/...':32s} {len(ks):3d} keys")

images, labels = arrays["input/images"], arrays["input/labels"].astype(np.int32)
onehot = one_hot(labels, cfg["num_outputs"])
w0 = {k[len("init/params/"):]: v for k, v in arrays.items() if k.startswith("init/params/")}
s0 = {k[len("init/state/"):]: v for k, v in arrays.items() if k.startswith("init/state/")}
print("images", images.shape, images.dtype, " labels", labels)
'''))
    c.append(code('''
model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"])
model.set_params(w0)     # checks every name and shape against the architecture
model.set_state(s0)
print(f"WideResnet(1, 2, 10): {model.num_params():,} parameters in {len(w0)} arrays")
for k, v in list(w0.items())[:6]:
    print(f"   {k:48s} {str(v.shape):18s}")
print("   ...")
sam_cfg = SAMConfig(rho=cfg["sam_rho"], weight_decay=cfg["weight_decay"],
                    label_smoothing=cfg["label_smoothing"], gradient_clipping=cfg["gradient_clipping"])
print(sam_cfg)
'''))
    c.append(md(r"""
We measure every comparison the way `minisam verify` does: for an array, the error relative to
the array's scale, $\max|\text{ours} - \text{jax}| \,/\, \max|\text{jax}|$ (so entries near
zero do not blow it up), and for a group of arrays (all 23 parameter gradients, say) the worst
of them. The targets are $10^{-5}$ for values and $10^{-4}$ for gradients: float32 rounding,
accumulated over a few million additions in a different order than XLA's.
"""))
    c.append(code('''
SUMMARY = []   # (what, max rel err) for the table at the end


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def errors(ours, prefix):
    """{key: rel err} of a dict of arrays against the reference keys prefix + key (or one array)."""
    if isinstance(ours, dict):
        return {k: rel_err(v, arrays[prefix + k]) for k, v in ours.items()}
    return {"": rel_err(ours, arrays[prefix])}


def compare(what, ours, prefix, show=0):
    """Print (and record for the summary) the worst error of `ours` against the reference."""
    errs = errors(ours, prefix)
    worst = max(errs.values())
    SUMMARY.append((what, worst))
    print(f"{what:44s} max rel err {worst:.2e}  ({len(errs)} array{'s' if len(errs) > 1 else ''})")
    for k in sorted(errs, key=errs.get, reverse=True)[:show]:
        print(f"      {k:50s} {errs[k]:.2e}")
'''))
    c.append(md(r"""
## Step 1: the gradient at $w$

`loss_and_grad` is one forward pass in train mode (batch statistics), the loss, and one
backward pass; weight decay adds $wd\cdot w$ to every gradient.
"""))
    c.append(code('''
print(inspect.getsource(loss_and_grad))
loss, ce, logits, g = loss_and_grad(model, w0, images, onehot, sam_cfg)
state_after_first_pass = model.get_state()
print(f"loss {float(loss):.7f} (JAX {float(arrays['init/loss']):.7f}),  "
      f"cross entropy {float(ce):.7f} (JAX {float(arrays['init/cross_entropy']):.7f})")
compare("logits, train mode", logits, "init/logits_train")
compare("loss", loss, "init/loss")
compare("gradient g = grad L(w)", g, "init/grad/", show=3)
compare("||g||", global_norm(g), "init/grad_norm")
compare("BN running stats after the pass", state_after_first_pass, "init/state_after_train_forward/")
'''))
    c.append(md(r"""
## Step 2: the perturbation $\hat\epsilon = \rho\, g/\|g\|$

One global norm over all 23 arrays, then a scaled copy of $g$: the perturbation has norm exactly
$\rho$ and points uphill.
"""))
    c.append(code('''
print(inspect.getsource(dual_vector))
direction, g_norm = dual_vector(g)
e = {k: sam_cfg.rho * d for k, d in direction.items()}
print(f"||g|| = {float(g_norm):.7f},  ||e|| = {float(global_norm(e)):.7f} (rho = {sam_cfg.rho})")
compare("perturbation e", e, "sam/perturbation/", show=2)
w_pert = {k: w + e[k] for k, w in w0.items()}
print(f"||w|| = {float(global_norm(w0)):.4f}: the perturbation moves the weights by "
      f"{100 * sam_cfg.rho / float(global_norm(w0)):.2f}% of their norm")
'''))
    c.append(md(r"""
## Step 3: the SAM gradient at $w + \hat\epsilon$

The same `loss_and_grad`, at the perturbed weights. minisam's model keeps the BN running
statistics in `model`; the JAX code throws away the ones from this pass, so we remember the
first pass's.
"""))
    c.append(code('''
loss_p, ce_p, logits_p, g_sam = loss_and_grad(model, w_pert, images, onehot, sam_cfg)
model.set_state(state_after_first_pass)        # drop the perturbed pass's BN statistics
print(f"perturbed loss {float(loss_p):.7f} (JAX {float(arrays['sam/perturbed_loss']):.7f}): "
      f"the loss rose by {float(loss_p - loss):.4f} within the rho-ball")
compare("perturbed logits", logits_p, "sam/perturbed_logits")
compare("perturbed loss", loss_p, "sam/perturbed_loss")
compare("SAM gradient g_sam (as computed)", g_sam, "sam/grad/", show=3)
'''))
    c.append(md(r"""
Everything up to here agrees to float32 precision (values to about $10^{-6}$, gradients to
about $10^{-5}$). The SAM gradient is the delicate one: depending on the machine that runs
this notebook, its line above reads either about $10^{-5}$ or a few times $10^{-2}$. A probe: take the SAM gradient once more at JAX's own
perturbed weights $w + \hat\epsilon_{JAX}$, which differ from ours only in the last bits (the
perturbations agreed to $10^{-5}$ relative):
"""))
    c.append(code('''
w_pert_jax = {k: w + arrays["sam/perturbation/" + k] for k, w in w0.items()}
_, _, _, g_sam_at_jax_e = loss_and_grad(model, w_pert_jax, images, onehot, sam_cfg)
model.set_state(state_after_first_pass)
print(f"SAM gradient at our   w + e: max rel err {max(errors(g_sam, 'sam/grad/').values()):.2e}")
print(f"SAM gradient at JAX's w + e: max rel err "
      f"{max(rel_err(v, arrays['sam/grad/' + k]) for k, v in g_sam_at_jax_e.items()):.2e}")
'''))
    c.append(md(r"""
### A ReLU tie

A gradient is a smooth function of the weights almost everywhere, but not across a ReLU's
kink. A ReLU passes the gradient where its input is positive and blocks it where it is
negative. If an input is so close to zero that float32 rounding decides its sign, two correct
implementations that add the same numbers in a different order (or the same code at two
points a few ulps apart) can put it on different sides. The forward values then differ by the
size of that input, $10^{-6}$, invisible in the logits; but one gradient entry flows in one
computation and not in the other, and everything upstream of it in the backward pass differs.

To find such inputs, record every ReLU's input during the perturbed pass. The ReLUs are
children like any other layer (a block's are `relu1`/`relu2`), so `model.named_layers()`, which
walks every layer with its path, finds them all; we wrap each one's `forward` to keep its input,
at our $w+\hat\epsilon$, at JAX's, and at ours in float64:
"""))
    c.append(code('''
def record_relu_inputs(model, weights):
    """Run one train-mode forward pass at `weights`; return {relu path: its input}."""
    seen = {}

    def recorder(path, forward):
        def wrapped(x, train=True):
            seen[path] = x
            return forward(x, train)
        return wrapped

    patched = [(path, layer) for path, layer in model.named_layers() if isinstance(layer, ReLU)]
    # paths like 'WideResnetGroup_2/WideResnetBlock_0/relu1'
    for path, relu in patched:
        relu.forward = recorder(path, relu.forward)   # an instance attribute hides the method
    try:
        model.set_params(weights)
        model.forward(images.astype(next(iter(weights.values())).dtype), train=True)
    finally:
        for _, relu in patched:
            del relu.forward                           # the class's method is back
        model.set_params(w0)
        model.set_state(state_after_first_pass)
    return seen


ours = record_relu_inputs(model, w_pert)
at_jax_e = record_relu_inputs(model, w_pert_jax)
exact = record_relu_inputs(model, {k: v.astype(np.float64) for k, v in w_pert.items()})
print(f"{len(ours)} ReLUs, {sum(x.size for x in ours.values()):,} inputs in the perturbed pass")
ties = sorted({(path, int(flat)) for inp in (ours, at_jax_e) for path, x in inp.items()
               for flat in np.flatnonzero(np.abs(x) <= 1e-6 * max(1.0, float(np.abs(x).max())))})
print(f"{len(ties)} inputs within float32 noise of zero (|x| <= 1e-6 max(1, max|x|)):")
print(f"   {'ReLU':44s} {'element':>8s} {'ours f32':>11s} {'at JAX e':>11s} {'float64':>11s}")
for path, flat in ties:
    print(f"   {path:44s} {flat:8d} {ours[path].flat[flat]:+11.2e} {at_jax_e[path].flat[flat]:+11.2e} "
          f"{exact[path].flat[flat]:+11.2e}")
'''))
    c.append(md(r"""
For each of these, compute the SAM gradient twice at our $w + \hat\epsilon$: with that one entry
forced to **block** the gradient and forced to **pass** it, everything else as computed, and
compare both with JAX. Forcing a side means overwriting one entry of the ReLU's saved mask
right after its forward pass:
"""))
    c.append(code('''
def force_relu_entry(model, path, flat, passes, on_call=0):
    """Make ReLU `path` pass (or block) the gradient of input element `flat` on its
    `on_call`-th forward call from now (0 = the next one). Returns a function that undoes it."""
    relu = dict(model.named_layers())[path]
    original, calls = relu.forward, [0]

    def forward(x, train=True):
        y = original(x, train)
        if calls[0] == on_call:
            relu.mask.flat[flat] = passes
        calls[0] += 1
        return y

    relu.forward = forward
    return lambda: delattr(relu, "forward")


def sam_grad_with(path, flat, passes):
    undo = force_relu_entry(model, path, flat, passes)
    try:
        return loss_and_grad(model, w_pert, images, onehot, sam_cfg)[3]
    finally:
        undo()
        model.set_state(state_after_first_pass)


def err_vs_jax(grads):
    return max(rel_err(v, arrays["sam/grad/" + k]) for k, v in grads.items())


print(f"   {'ReLU':44s} {'element':>8s} {'blocked':>10s} {'passed':>10s}")
table = []
for path, flat in ties:
    e_block, e_pass = err_vs_jax(sam_grad_with(path, flat, False)), err_vs_jax(sam_grad_with(path, flat, True))
    table.append((max(e_block, e_pass) / min(e_block, e_pass), path, flat, e_block, e_pass))
    print(f"   {path:44s} {flat:8d} {e_block:10.2e} {e_pass:10.2e}")

_, tie_path, tie_flat, e_block, e_pass = max(table)    # the tie whose side matters most
jax_passes = e_pass < e_block
v32, v64 = float(ours[tie_path].flat[tie_flat]), float(exact[tie_path].flat[tie_flat])
print(f"\\nThe decisive tie: {tie_path}, element {tie_flat}.")
print(f"   float64 value {v64:+.2e}: exact arithmetic {'passes' if v64 > 0 else 'blocks'} it.")
print(f"   JAX {'passed' if jax_passes else 'blocked'} it: that side matches to {min(e_block, e_pass):.1e}, "
      f"the other is off by {max(e_block, e_pass):.1e}.")
print(f"   minisam's float32 value here is {v32:+.2e}, so as computed it {'passes' if v32 > 0 else 'blocks'} it: "
      f"{'the same side as JAX' if (v32 > 0) == jax_passes else 'the other side from JAX'}, on this machine.")
g_sam_jax_side = sam_grad_with(tie_path, tie_flat, jax_passes)
compare("SAM gradient, that tie on JAX's side", g_sam_jax_side, "sam/grad/")
compare("||g_sam||", global_norm(g_sam_jax_side), "sam/grad_norm")
'''))
    c.append(md(r"""
One entry decides everything: the input of the first ReLU in the first block of the last group,
at about $10^{-6}$ from zero. In float64 it is negative, so exact arithmetic blocks its
gradient; the JAX run's float32 arithmetic put it on the positive side and passed it. With it on
JAX's side the whole SAM gradient agrees to float32 precision; on the other side a slice of the
gradient is off by a few percent. The other near-ties make no difference, or JAX agrees with
our side of them.

Neither code is wrong: this is float32. Whether minisam's *own* float32 value lands on JAX's
side depends on the order of the additions inside the matrix products: the BLAS library and
its number of threads, and how the conv backward is organised (which changes $g$, hence
$\hat\epsilon$, in the last bits; the table shows the value moving between our $w+\hat\epsilon$ and
JAX's). The last lines above say where it landed on the machine that ran this notebook. And
the lesson carries beyond testing: a gradient depends discontinuously on the *pattern* of
active ReLUs, and changing that pattern a little is exactly what a weight perturbation does.

`minisam verify` (and `minisam.reference.verify`) does this search automatically for every step
of a case: it collects the ReLU inputs within $10^{-6}$ of zero, tries each on the other side of
the kink, keeps a flip only if it cuts that step's error at least tenfold, and **prints every
flip it kept**. The case runs three steps, and step 3 may have a tie of its own:
"""))
    c.append(code('''
rows, kept = verify(CASE)
for site, value in kept:
    print("tie flipped:", describe_tie(site, value))
if not kept:
    print("no tie needed flipping on this machine")
print()
print(format_rows([r for r in rows if not r.group.startswith(("step2/", "step3/"))]))
print(f"... and {sum(r.group.startswith(('step2/', 'step3/')) for r in rows)} more rows for steps 2 and 3;"
      f" all pass: {all(r.ok for r in rows)}")
'''))
    c.append(md(r"""
## Step 4: clipping by global norm

The JAX code clips the gradient that goes to the optimizer (the SAM gradient, averaged over
replicas; there is one replica here) to a global norm of 5: unchanged if its norm is below 5,
else rescaled to norm 5. Here $\|g_{SAM}\| \approx 4.24$, so clipping leaves it alone. From
here on we continue with the SAM gradient that has the decisive tie on JAX's side (the same as
the one computed above if minisam's rounding landed there too).
"""))
    c.append(code('''
print(inspect.getsource(clip_by_global_norm))
g_clipped, norm_before = clip_by_global_norm(g_sam_jax_side, sam_cfg.gradient_clipping)
print(f"||g_sam|| = {float(norm_before):.7f} < {sam_cfg.gradient_clipping}: unchanged")
compare("clipped gradient", g_clipped, "sam/grad_clipped/")
'''))
    c.append(md(r"""
## Step 5: the Nesterov momentum update

flax's `Momentum(beta=0.9, nesterov=True)`: $m \leftarrow \beta m + g$, then
$w \leftarrow w - \eta\,(g + \beta m)$, with $m = 0$ at the start. The learning rate of step 1
is the cosine schedule at step 0, i.e. the base rate 0.1.
"""))
    c.append(code('''
print(inspect.getsource(nesterov_update))
lr = cosine_schedule(cfg["learning_rate"], cfg["num_epochs"], cfg["steps_per_epoch"])(0)
w1, m1 = nesterov_update(w0, g_clipped, nesterov_init(w0), lr, sam_cfg.momentum)
print(f"lr = {lr} (JAX {float(arrays['step1/lr'])})")
compare("params after step 1", w1, "step1/params/", show=2)
compare("momentum after step 1", m1, "step1/momentum/")
compare("BN state after step 1 (first pass)", state_after_first_pass, "step1/state/")
'''))
    c.append(md(r"""
## The same step in one call: `train_step`

`minisam.sam.train_step` is steps 1 to 5 in a dozen lines (printed at the top). Its `trace`
argument, a dict, collects the intermediate values. Run it twice from the initial weights:
as computed, and with the decisive ReLU entry forced to JAX's side on the perturbed pass (that
ReLU's second call within the step).
"""))
    c.append(code('''
def one_step(flip_tie):
    model.set_params(w0); model.set_state(s0)
    undo = force_relu_entry(model, tie_path, tie_flat, jax_passes, on_call=1) if flip_tie else (lambda: None)
    trace = {}
    try:
        out = train_step(model, w0, s0, nesterov_init(w0), images, labels, lr, sam_cfg, trace=trace)
    finally:
        undo()
    return out, trace


ROWS = [("logits", "logits", "init/logits_train"), ("gradient g", "grad", "init/grad/"),
        ("perturbation e", "perturbation", "sam/perturbation/"),
        ("perturbed logits", "perturbed_logits", "sam/perturbed_logits"),
        ("SAM gradient", "sam_grad", "sam/grad/"), ("clipped gradient", "grad_clipped", "sam/grad_clipped/")]
results = {flip: one_step(flip) for flip in (False, True)}
print(f"{'quantity':28s} {'as computed':>14s} {'tie resolved':>14s}")
for name, key, prefix in ROWS:
    errs = []
    for flip in (False, True):
        v = results[flip][1][key]
        errs.append(max(rel_err(x, arrays[prefix + k]) for k, x in v.items()) if isinstance(v, dict) else rel_err(v, arrays[prefix]))
    print(f"{name:28s} {errs[0]:14.2e} {errs[1]:14.2e}")
for name, idx, prefix in [("params after step 1", 0, "step1/params/"), ("BN state after step 1", 1, "step1/state/"),
                          ("momentum after step 1", 2, "step1/momentum/")]:
    errs = [max(rel_err(x, arrays[prefix + k]) for k, x in results[flip][0][idx].items()) for flip in (False, True)]
    print(f"{name:28s} {errs[0]:14.2e} {errs[1]:14.2e}")
metrics = results[True][0][3]
for k, v in metrics.items():
    print(f"metric {k:21s} {float(v):14.7f} {'(JAX ' + format(float(arrays['step1/metrics/' + k]), '.7f') + ')':>22s}")
'''))
    c.append(md(r"""
## How different is the SAM gradient from the plain one?

The SAM gradient is the plain gradient taken $\rho = 0.05$ away, uphill. Per parameter array,
how do their norms compare, and how aligned are they (cosine similarity)?
"""))
    c.append(code('''
keys = list(model.get_params())       # network order: init_conv, groups, pre-pool-bn, Dense_3
short = [k.replace("WideResnetGroup_", "G").replace("/WideResnetBlock_", ".B").replace("/kernel", ".k")
          .replace("/scale", ".scale").replace("/bias", ".bias") for k in keys]
norm_g = np.array([np.linalg.norm(g[k]) for k in keys])
norm_s = np.array([np.linalg.norm(g_sam_jax_side[k]) for k in keys])
cos = np.array([float((g[k] * g_sam_jax_side[k]).sum()) / (norm_g[i] * norm_s[i]) for i, k in enumerate(keys)])
angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
y = np.arange(len(keys))
a.barh(y - 0.2, norm_g, 0.4, label=r"$\\|g\\|$ at $w$")
a.barh(y + 0.2, norm_s, 0.4, label=r"$\\|g_{SAM}\\|$ at $w+\\hat\\epsilon$")
a.set_xscale("log")
a.set(xlabel="gradient norm per array", title="per-array gradient norms")
a.set_yticks(y, short, fontsize=8)
a.invert_yaxis()
a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
b.barh(y, angle, color="C2")
b.set(xlabel="angle between $g$ and $g_{SAM}$ (degrees)", title="how far the SAM gradient turns")
plt.tight_layout()
plt.show()
total_cos = sum(float((g[k] * g_sam_jax_side[k]).sum()) for k in keys) / float(global_norm(g) * global_norm(g_sam_jax_side))
print(f"all parameters together: ||g|| = {float(global_norm(g)):.4f}, ||g_sam|| = {float(global_norm(g_sam_jax_side)):.4f}, "
      f"cos = {total_cos:.4f}, angle {np.degrees(np.arccos(total_cos)):.1f} degrees")
print(f"per array: angles from {angle.min():.1f} to {angle.max():.1f} degrees, "
      f"norm ratios ||g_sam|| / ||g|| from {np.min(norm_s / norm_g):.2f} to {np.max(norm_s / norm_g):.2f}")
'''))
    c.append(md(r"""
A step of 0.15% of the weights' norm leaves the gradient's size about the same, array by
array, but turns its direction: by 10 to 20 degrees in the convolutional body, by only a few
degrees in the head (`pre-pool-bn`, `Dense_3`). SAM's update is not a rescaled $g$; it is a
different direction, the one that also lowers the loss at the worst nearby point.

## Summary
"""))
    c.append(code('''
print(f"{'quantity':46s} {'max rel err':>12s}")
for what, err in SUMMARY:
    print(f"{what:46s} {err:12.2e}")
'''))
    c.append(md(r"""
Every value of the JAX code's first SAM step is reproduced to float32 precision, with one
honest caveat: the SAM gradient agrees only when a single ReLU input, about $10^{-6}$ from zero
(negative in float64), sits on the side of the kink where JAX's float32 rounding put it, and
whether minisam's own float32 rounding puts it there depends on the machine. `minisam verify`
finds such ties and reports every one it flips; `tests/test_reference.py` checks all three reference cases,
including a two-replica case and label smoothing, on every commit.

Coming next: 04 compares SGD and SAM on real training runs.
"""))
    return c


NOTEBOOKS = {
    "01_sharpness_intuition.ipynb": nb01,
    "02_backprop_by_hand.ipynb": nb02,
    "03_sam_step_by_step.ipynb": nb03,
}


def build(name):
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb, timeout=300):
    from nbclient import NotebookClient
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": HERE}}).execute(env=env)
    for cell in nb.cells:                      # no timestamps: keep the diffs to real changes
        cell.metadata.pop("execution", None)
    return nb


def main(argv=None, notebooks=None, build_fn=None, description=None):
    """Build (and with --execute run) notebooks; _build_training.py reuses this for 04-06."""
    notebooks = NOTEBOOKS if notebooks is None else notebooks
    build_fn = build if build_fn is None else build_fn
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="notebooks to build (default: all); e.g. 01")
    p.add_argument("--execute", action="store_true", help="run them and store the outputs")
    args = p.parse_args(argv)
    names = [n for n in notebooks if not args.names or any(n.startswith(a) for a in args.names)]
    for name in names:
        nb = build_fn(name)
        path = os.path.join(HERE, name)
        if args.execute:
            t = time.perf_counter()
            try:
                execute(nb)
            except Exception:
                nbformat.write(nb, path)   # keep the partial outputs to look at
                raise
            print(f"{name}: executed in {time.perf_counter() - t:.1f} s")
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

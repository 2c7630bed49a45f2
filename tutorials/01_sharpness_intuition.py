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
#    (eq. 2 of the paper), and how good an approximation it is (Exercise 1: write it);
# 3. why SAM cannot sit at the bottom of a sharp basin when its step is large;
# 4. one SAM step drawn on a 2-D loss (the paper's Fig. 2, in miniature; Exercise 2: write
#    it), then gradient descent and SAM side by side on that loss;
# 5. the effect of $\rho$, and why the escape from the sharp basin depends on the learning rate;
# 6. a bridge to real networks: SAM from scratch on a small MLP, in about 30 lines of NumPy.
#
# The exercises check themselves: write the function in the cell marked `YOUR CODE HERE`, run
# the check cell below it (it says "correct", names the first wrong case, or "not attempted
# yet"), and expand the collapsed solution if you are stuck. Nothing later depends on your
# answers.

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

sys.path.insert(0, str(ROOT / "tutorials"))
from grading import check           # grades the exercises

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
ax.set(xlabel="$w$", ylabel="loss",
       ylim=(-0.15, 1.0), title="the loss and the SAM objective: sharp minimum at $w=-1$, flat at $w=1$")
ax.legend(loc="upper right")
plt.show()

print(f"{'rho':>5} | {'L^SAM at sharp min':>18} {'L^SAM at flat min':>18} | preferred")
objective_table = {}
for rho in [0.0, 0.05, 0.1, 0.2]:
    s = sam_objective(loss1d, np.array([[-1.0]]), rho)[0] if rho else loss1d(np.array([-1.0]))
    f = sam_objective(loss1d, np.array([[1.0]]), rho)[0] if rho else loss1d(np.array([1.0]))
    objective_table[rho] = (float(s), float(f))
    print(f"{rho:5.2f} | {float(s):18.4f} {float(f):18.4f} | {'sharp' if s < f else 'flat'}")

# where the two bottoms swap rank: m1 + lam1 rho^2 / 2 = m2 + lam2 rho^2 / 2
rho_cross = np.sqrt(2 * (loss1d.m2 - loss1d.m1) / (loss1d.lam1 - loss1d.lam2))
print(f"the SAM objective prefers the flat minimum for rho > {rho_cross:.4f}")
assert objective_table[0.05][0] < objective_table[0.05][1]      # rho = 0.05: still the sharp one
assert objective_table[0.1][0] > objective_table[0.1][1]        # rho = 0.1: the flat one

# %% [markdown]
# With $\rho = 0$ the sharp minimum wins (it is deeper). As soon as $\rho$ is large enough that
# $m_1 + \tfrac12\lambda_1\rho^2 > m_2 + \tfrac12\lambda_2\rho^2$ (the last line of the cell
# above prints that threshold), the SAM objective ranks the flat minimum first: the sharp valley
# is "filled in" while the flat one barely moves. Keep the row $\rho = 0.05$ in mind: there the
# objective **still prefers the sharp minimum**. Section 6 comes back to it.
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
# then $w \leftarrow w - \eta\, g_{SAM}$ (Algorithm 1 of the paper). A network's gradient is not
# one vector but a dictionary of arrays (one per layer's kernel, bias, ...), and the norm in
# eq. 2 is the **global** one: the norm of all the arrays concatenated into one long vector.

# %% [markdown]
# ### Exercise 1: the perturbation $\hat\epsilon$ (eq. 2)
# Write `my_perturbation(g, rho)`: `g` is a dict of NumPy arrays (any shapes), and the function
# returns the dict $\hat\epsilon = \rho\, g/\|g\|_2$ with the same keys and shapes, where
# $\|g\|_2 = \sqrt{\sum_{\text{arrays}} \sum_{\text{entries}} g_i^2}$ is the global norm.
# Hint: one line for the norm (a `sum` over `g.values()`), one dict comprehension. The check
# compares your answer with $\rho$ times the direction returned by minisam's `dual_vector`, on a
# 1-D gradient of our toy loss, 2-D gradients, and a dict of two arrays.

# %% tags=["exercise"]
def my_perturbation(g, rho):
    # YOUR CODE HERE (two lines)
    raise NotImplementedError


# %%
def reference_perturbation(g, rho):
    direction, _ = dual_vector(g)               # minisam: (g / ||g||, ||g||)
    return {k: rho * v for k, v in direction.items()}


rng = np.random.default_rng(1)
perturbation_cases = [
    ({"w": loss1d.grad(np.array([-0.8]))}, 0.1),                 # 1-D, uphill is +
    ({"w": loss1d.grad(np.array([0.3]))}, 0.05),                 # 1-D, uphill is -
    ({"w": np.array([3.0, -4.0])}, 0.05),                        # 2-D
    ({"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}, 0.5),  # two arrays: one global norm
    ({"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)}, 0.05),
]
check("Exercise 1 (perturbation)", my_perturbation, reference_perturbation, perturbation_cases)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_perturbation_solution(g, rho):
    norm = np.sqrt(sum((v * v).sum() for v in g.values()))       # global norm over every array
    return {k: rho * v / norm for k, v in g.items()}


check("Exercise 1, solution", my_perturbation_solution, reference_perturbation, perturbation_cases)

# %% [markdown]
# Here is minisam's version. `dual_vector` returns the unit direction $g/\|g\|$ (and the norm);
# the caller multiplies by $\rho$, exactly like the JAX code:

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
# the uphill end of the interval. Near a minimum that is also the exact answer: in a bowl the
# worst point of $[w-\rho, w+\rho]$ is the end farther from the bottom, which is the uphill end.
# The two disagree only near the **ridge** between the basins, where the loss is far from linear
# on the scale of $\rho$: just on the sharp side of the ridge, uphill (towards the ridge) is not
# where the loss is highest within $\rho$, because the ridge's top lies in between. The cell
# computes the interval of $w$ where they disagree, and prints it. The right panel compares the
# SAM gradient $L'(w+\hat\epsilon)$ with the true derivative of $L^{SAM}$ (by finite
# differences of the brute-force curve).

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
a.legend(loc="best")
b.plot(ws[:, 0], loss1d.grad(ws)[:, 0], "0.6", label="$L'(w)$")
b.plot(ws[:, 0], d_sam, "k", lw=3, alpha=0.4, label=r"$dL^{SAM}/dw$ (exact)")
b.plot(ws[:, 0], g_sam, "C1", label=r"SAM gradient $L'(w+\hat\epsilon)$")
b.set(xlabel="$w$", ylabel="derivative", ylim=(-6, 6), title=r"gradients, $\rho$ = 0.1")
b.legend(loc="best")
plt.tight_layout()
plt.show()

# Where do the exact and the first-order perturbations disagree?
L1_, L2_, _, _ = loss1d._bowls(ws)
ridge = ws[np.flatnonzero(np.diff(np.sign(L1_ - L2_)))[-1], 0]      # the crossing between c1 and c2
disagree = ws[np.abs(exact_eps - first_order) > 1e-9, 0]
print(f"exact and first-order perturbations differ for w in [{disagree.min():.2f}, {disagree.max():.2f}] "
      f"({len(disagree)} grid points); the ridge is at w = {ridge:.2f}")
assert np.all(np.abs(disagree - ridge) < 2 * rho)                # only around the ridge...
assert np.abs(disagree - loss1d.c1[0]).min() > 1.5 * rho         # ...not at the sharp minimum
assert np.abs(disagree - loss1d.c2[0]).min() > 1.5 * rho         # nor at the flat one

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
# It grows with the curvature and blows up as $\eta\lambda \to 2$: the factor $1/(2-\eta\lambda)$
# is the discrete step talking, and it is what makes the sharp bowl special here. With
# $\eta = 0.045$ and $\rho = 0.05$ (the cell below prints the numbers):
#
# * in the flat bowl ($\lambda = 1$, $\eta\lambda = 0.045$) the swing $a$ is tiny, about half
#   of $\eta\lambda\rho$. Once $|w| \le \eta\lambda\rho$ the orbit never leaves that band, and
#   it closes in on the 2-cycle only slowly: the distance to the cycle shrinks by a factor
#   $1-\eta\lambda$ per step, hence the spread over the last 20 steps in the first printed line;
# * in the sharp bowl ($\lambda = 40$, $\eta\lambda = 1.8$) $w$ changes sign at every step, and
#   $|w_{t+1}| - a = (\eta\lambda - 1)(|w_t| - a)$: from any start $|w|$ goes straight to $a$,
#   which is five times $\eta\lambda\rho$, far outside the band $|w| \le \eta\lambda\rho$. The
#   cell checks this from 1000 random starts. That swing is larger than the distance from the
#   sharp minimum to the ridge of our two-basin loss (printed too), so there SAM is thrown over
#   the ridge into the flat basin.
#
# (For any $0 < \eta\lambda < 2$ every start, except one landing exactly on $w = 0$, ends on this
# 2-cycle; Bartlett, Long and Bousquet (2023) prove the same for SAM on convex quadratics in any
# dimension: it converges to a cycle bouncing across the minimum along the direction of largest
# curvature.)

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
        label = rf"{'SAM' if r else 'GD'}, $\lambda$ = {lam:g}"
        ax.semilogy(path, style, color=col, label=label)
    a = lr * lam * rho / (2 - lr * lam)
    ax.axhline(a, color=col, lw=0.8, alpha=0.6, label=rf"predicted swing $a$, $\lambda$ = {lam:g}")
    print(f"lambda = {lam:4g}: predicted 2-cycle amplitude a = {a:.5f}; SAM's |w| over the last 20 steps: "
          f"{min(path[-20:]):.5f} to {max(path[-20:]):.5f}")
ax.set(xlabel="step", ylabel="|w - minimum|", ylim=(1e-6, 1),
       title=rf"GD and SAM in one quadratic bowl, $\eta$ = {lr}, $\rho$ = {rho}, from $w_0$ = 0.5")
ax.legend(ncol=3, fontsize=8, loc="lower left")
plt.show()

# From 1000 random starts, long enough for the slow flat bowl too: where does SAM end up?
w_starts = np.random.default_rng(0).uniform(-1, 1, 1000)
for lam in [1.0, 40.0]:
    k, w = lr * lam, w_starts.copy()
    for _ in range(2000):
        w = w - k * (w + rho * np.sign(w))
    a = k * rho / (2 - k)
    print(f"lambda = {lam:4g}: eta*lambda = {k:.3f}, eta*lambda*rho = {k * rho:.5f}, a = {a:.5f}; "
          f"final |w| from {np.abs(w).min():.5f} to {np.abs(w).max():.5f}")
    assert np.allclose(np.abs(w), a, rtol=1e-6)              # every start ends on the 2-cycle
a_sharp = lr * loss1d.lam1 * rho / (2 - lr * loss1d.lam1)
print(f"sharp bowl: a = {a_sharp:.2f} = {a_sharp / (lr * loss1d.lam1 * rho):.0f} x eta*lambda*rho; "
      f"the 1-D ridge is {ridge - loss1d.c1[0]:.2f} from the sharp minimum")
assert a_sharp > ridge - loss1d.c1[0]

# %% [markdown]
# ## 5. Gradient descent and SAM on a 2-D loss
#
# The same construction in two dimensions: a sharp bowl at $c_1 = (-1, 0.5)$ ($\lambda_1 = 40$,
# minimum $-0.1$) and a flat one at $c_2 = (1, -0.5)$ ($\lambda_2 = 1$, minimum $0$). Both
# methods use the learning rate $\eta = 0.045$, small enough that gradient descent is stable in
# the sharp basin ($\eta\lambda_1 = 1.8 < 2$).

# %%
loss2d = TwoBasins(c1=[-1.0, 0.5], lam1=40.0, m1=-0.1, c2=[1.0, -0.5], lam2=1.0, m2=0.0)
LR = 0.045


def ridge_distance(n=20001):
    """Distance R from c1 to the ridge (L1 = L2) along the line from c1 to c2."""
    dist = np.linalg.norm(loss2d.c2 - loss2d.c1)
    t = np.linspace(0, 1, n)
    L1 = loss2d.m1 + 0.5 * loss2d.lam1 * t**2
    L2 = loss2d.m2 + 0.5 * loss2d.lam2 * (dist - t) ** 2
    return t[np.argmax(L1 > L2)]

# %% [markdown]
# ### Exercise 2: one SAM step
# Write `my_sam_step(w, lr, rho)` for the 2-D loss `loss2d` (its gradient is `loss2d.grad`, `w`
# has shape `(2,)`): the gradient $g = \nabla L(w)$, the perturbation
# $\hat\epsilon = \rho\, g/\|g\|$ (eq. 2), the gradient at the perturbed point, and the
# update $w_{t+1} = w - \eta\, \nabla L(w + \hat\epsilon)$ (Algorithm 1, without momentum or
# weight decay). Return $w_{t+1}$. The check compares it with a step built from `loss2d.grad` and
# minisam's `dual_vector`, at points in both basins and near the ridge.

# %% tags=["exercise"]
def my_sam_step(w, lr, rho):
    # YOUR CODE HERE (three or four lines)
    raise NotImplementedError


# %%
def reference_sam_step(w, lr, rho):
    direction, _ = dual_vector({"w": loss2d.grad(w)})
    return w - lr * loss2d.grad(w + rho * direction["w"])


sam_step_cases = [(np.array(w), lr, rho) for w, lr, rho in [
    ((-1.2, 0.25), LR, 0.1), ((-0.8, 0.6), LR, 0.05), ((0.3, -0.2), LR, 0.1),
    ((1.5, 0.4), 0.02, 0.2), ((-0.75, 0.35), LR, 0.25)]]
check("Exercise 2 (SAM step)", my_sam_step, reference_sam_step, sam_step_cases)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_sam_step_solution(w, lr, rho):
    g = loss2d.grad(w)                             # 1. gradient at w
    e_hat = rho * g / np.linalg.norm(g)            # 2. ascent of length rho (eq. 2)
    return w - lr * loss2d.grad(w + e_hat)         # 3. descend with the gradient at w + e_hat


check("Exercise 2, solution", my_sam_step_solution, reference_sam_step, sam_step_cases)

# %% [markdown]
# ### One SAM step, drawn: the paper's Fig. 2, in miniature
# The paper's Fig. 2 is a schematic of the SAM update on a loss contour: from $w_t$, gradient
# descent would step along $-\eta\nabla L(w_t)$; SAM first climbs to
# $w_{adv} = w_t + \hat\epsilon$, takes the gradient there, and applies it **at $w_t$**:
# $w_{t+1} = w_t - \eta\nabla L(w_{adv})$. Here is that picture on our 2-D loss, with
# $\eta = 0.045$ and $\rho = 0.1$, at a point of the sharp basin near the ridge (the dashed line,
# where the two bowls meet). Inside one round bowl all the arrows would lie on one line (the
# gradient of $\tfrac{\lambda}{2}\|w - c\|^2$ at $w + \hat\epsilon$ is parallel to that at $w$),
# and SAM's step would just be longer, by $\eta\lambda\rho$: the overshoot of section 4. At this
# point the ascent crosses the ridge, so the gradient at $w_{adv}$ belongs to the flat bowl and
# SAM's step heads towards the flat minimum, while gradient descent jumps across the sharp one.

# %%
w_t, rho_fig = np.array([-1.2, 0.25]), 0.1
g_t = loss2d.grad(w_t)
e_hat = rho_fig * dual_vector({"w": g_t})[0]["w"]
w_adv = w_t + e_hat
g_adv = loss2d.grad(w_adv)
w_gd, w_sam = w_t - LR * g_t, w_t - LR * g_adv
assert np.allclose(w_sam, reference_sam_step(w_t, LR, rho_fig))

xs, ys = np.meshgrid(np.linspace(-1.55, -0.45, 300), np.linspace(-0.05, 1.0, 280))
grid = np.stack([xs, ys], -1)
levels = [-0.09, -0.05, 0.0, 0.02, 0.06, 0.12, 0.25, 0.5, 0.8, 1.2, 1.8, 2.6, 3.6]
fig, ax = plt.subplots(figsize=(9, 5.6))
cf = ax.contourf(xs, ys, loss2d(grid), levels=levels + [10], cmap="viridis", alpha=0.85)
ax.contour(xs, ys, loss2d(grid), levels=levels, colors="w", linewidths=0.4)
L1g, L2g, _, _ = loss2d._bowls(grid)
ax.contour(xs, ys, L1g - L2g, levels=[0], colors="k", linestyles="--", linewidths=1)
fig.colorbar(cf, ax=ax, label="$L(w)$")


def arrow(start, end, color, ls="-"):
    ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color=color, lw=2, ls=ls,
                                                shrinkA=0, shrinkB=0))


arrow(w_t, w_gd, "C0")                          # the gradient step
arrow(w_t, w_adv, "C1")                         # the ascent, length rho
arrow(w_adv, w_adv - LR * g_adv, "C3", ls="--")  # the gradient at w_adv ...
arrow(w_t, w_sam, "C3")                         # ... applied at w_t
ax.plot(*w_t, "o", color="w", mec="k", ms=8, label="$w_t$")
ax.plot(*w_gd, "s", color="C0", mec="k", ms=7, label=r"gradient step $w_t - \eta\nabla L(w_t)$")
ax.plot(*w_adv, "^", color="C1", mec="k", ms=8, label=r"$w_{adv} = w_t + \hat\epsilon$ (ascent, length $\rho$)")
ax.plot([], [], "--", color="C3", lw=2, label=r"$-\eta\nabla L(w_{adv})$, drawn at $w_{adv}$")
ax.plot(*w_sam, "*", color="C3", mec="k", ms=14, label=r"SAM update $w_{t+1} = w_t - \eta\nabla L(w_{adv})$")
ax.plot(*loss2d.c1, "P", color="w", mec="k", ms=9, label="sharp minimum $c_1$")
ax.plot([], [], "k--", lw=1, label="ridge ($L_1 = L_2$)")
ax.set(aspect="equal", xlabel="$w_1$", ylabel="$w_2$",
       title=r"one SAM step on the 2-D loss ($\eta$ = 0.045, $\rho$ = 0.1): the paper's Fig. 2, in miniature")
ax.grid(False)
ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=9)
plt.show()
print(f"gradient step: {np.linalg.norm(w_gd - w_t):.3f} long; SAM step: {np.linalg.norm(w_sam - w_t):.3f} long; "
      f"cosine between them: {g_t @ g_adv / np.linalg.norm(g_t) / np.linalg.norm(g_adv):.2f}")

# %% [markdown]
# Now whole trajectories. The SAM step below is written with minisam's `dual_vector` on a
# one-entry parameter dictionary, as it is for the WideResnet:

# %%


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

fig, axes = plt.subplots(1, 2, figsize=(13, 4.9), sharey=True)
for ax, (name, step) in zip(axes, [(rf"gradient descent, $\eta$ = {LR}", gd_step),
                                   (rf"SAM, $\eta$ = {LR}, $\rho$ = 0.1", sam_step)]):
    cf = ax.contourf(xs, ys, Z, levels=levels + [10], cmap="viridis", alpha=0.85)
    ax.contour(xs, ys, Z, levels=levels, colors="w", linewidths=0.4)
    for i, w0 in enumerate(starts):
        p = trajectory(step, w0)
        ax.plot(p[:, 0], p[:, 1], ".-", color="orange", ms=2.5, lw=0.8, label="trajectory" if i == 0 else None)
        ax.plot(*p[0], "o", color="w", mec="k", ms=5, label="start" if i == 0 else None)
        ax.plot(*p[-1], "*", color="red", ms=11, mec="k", label="after 400 steps" if i == 0 else None)
    ax.annotate("sharp, L=-0.1", loss2d.c1, xytext=(-2.1, -0.2), color="w", arrowprops=dict(color="w", arrowstyle="->"))
    ax.annotate("flat, L=0", loss2d.c2, xytext=(1.2, 0.6), color="w", arrowprops=dict(color="w", arrowstyle="->"))
    ax.set(title=name, xlabel="$w_1$", aspect="equal")
    ax.grid(False)
axes[0].set_ylabel("$w_2$")
axes[1].legend(loc="lower right", fontsize=8, framealpha=0.9)
fig.colorbar(cf, ax=axes, label="$L(w)$", shrink=0.9)
fig.suptitle("where gradient descent and SAM end: the toy counterpart of the paper's Fig. 1 (middle and right)")
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
# settles in the flat basin, where its swing is tiny. Its final *training* loss is higher
# ($0$ rather than $-0.1$); what it bought is a minimum where the loss stays low in a whole
# neighbourhood. This figure is the toy counterpart of the paper's Fig. 1 (middle and right),
# which shows the sharp minimum a ResNet trained with SGD converged to and the wide minimum the
# same ResNet reached with SAM.
#
# Note that with $\rho = 0.1$ the SAM objective does rank the flat minimum first (section 2),
# but that is not why SAM left: SAM only ever looks at a ball of radius $\rho$ around where it
# is, and inside the sharp basin the first-order SAM gradient $\lambda_1(w - c_1 + \rho\,
# \tfrac{w - c_1}{\|w - c_1\|})$ still points to $c_1$. It left because its swing
# $\eta\lambda_1\rho/(2-\eta\lambda_1)$ (section 4) is wider than the sharp basin. The next
# prompt tests that.

# %% [markdown]
# **Try this.** Rerun the 2-D comparison above with a smaller learning rate, say
# `LR = 0.02` (so $\eta\lambda_1 = 0.8$), keeping $\rho = 0.1$ (pass `lr=0.02` to `gd_step`
# and `sam_step`, e.g. with `lambda w: sam_step(w, lr=0.02)`). Where does SAM end from the four
# starts that gradient descent sends to the sharp minimum? Predict it with the swing of section 4
# before you run it. (Answer below, collapsed.)

# %% [markdown] jupyter={"source_hidden": true}
# *Answer.* SAM stays in the sharp basin. With $\eta\lambda_1 = 0.8$ its swing is
# $a = \eta\lambda_1\rho/(2-\eta\lambda_1)$, far smaller than the distance from $c_1$ to the
# ridge, so the step can no longer throw it out; it ends on a 2-cycle at distance $a$ from $c_1$,
# at a loss a little above $-0.1$. Equivalently, the threshold of section 6,
# $\rho^* = R\,(2-\eta\lambda_1)/(\eta\lambda_1)$, is then well above $\rho = 0.1$. The
# cell below (collapsed) prints the computed $a$ and $\rho^*$ and checks it.

# %% jupyter={"source_hidden": true}
lr_small = 0.02
k_small = lr_small * loss2d.lam1
for w0 in starts[:4]:
    g_end = trajectory(lambda w: gd_step(w, lr=lr_small), w0)[-1]
    s_end = trajectory(lambda w: sam_step(w, lr=lr_small), w0)[-1]
    print(f"start {str(w0):14s} GD -> {where(g_end):5s}   SAM -> {where(s_end):5s} "
          f"(|w - c1| = {np.linalg.norm(s_end - loss2d.c1):.4f}, L = {loss2d(s_end):+.4f})")
    assert where(g_end) == where(s_end) == "sharp"
a_small = k_small * 0.1 / (2 - k_small)
print(f"eta*lambda1 = {k_small:.1f}: predicted swing a = {a_small:.4f}, "
      f"rho* = R (2 - eta*lambda1) / (eta*lambda1) = {ridge_distance() * (2 - k_small) / k_small:.3f} > 0.1")
assert np.isclose(np.linalg.norm(s_end - loss2d.c1), a_small, rtol=1e-3)

# %% [markdown]
# Here is one run of each (at $\eta = 0.045$) in detail, from the first start: the loss along the
# way and the distance to the sharp minimum.

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

R = ridge_distance()                # distance from c1 to the ridge along the line to c2
k = LR * loss2d.lam1
rho_star = R * (2 - k) / k
print(f"ridge at R = {R:.3f} from the sharp minimum; predicted rho* = {rho_star:.3f}")
for rho, f, l in zip(rhos, at_sharp, loss_there):
    print(f"rho = {rho:4.2f}: {100 * f:5.1f}% of runs end in the sharp basin"
          + (f", at a median loss of {l:+.3f}" if f else ""))

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
a.plot(rhos, 100 * np.array(at_sharp), "o-")
a.axvline(rho_star, color="k", ls="--", lw=1, label=r"predicted $\rho^*$")
a.set(xlabel=r"$\rho$", ylabel="% of runs", title=rf"runs ending in the sharp basin ($\eta$ = {LR})")
a.legend(loc="best")
r = np.array(rhos[1:])
b.loglog(r, hover[1:], "o", label="measured (median)")
b.loglog(r, LR * loss2d.lam2 * r / (2 - LR * loss2d.lam2), "k-", lw=1, label=r"$\eta\lambda_2\rho/(2-\eta\lambda_2)$")
b.set(xlabel=r"$\rho$", ylabel=r"median $\|w - c_2\|$", title="how far SAM hovers from the flat minimum")
b.legend(loc="best")
plt.tight_layout()
plt.show()

frac = dict(zip(rhos, at_sharp))
assert all(frac[r] == 0 for r in [0.05, 0.07, 0.1, 0.15])      # the useful range: no run stays
assert min(frac[r] for r in [0.01, 0.02, 0.03]) > 0.2           # below rho*: many stay
assert min(frac[0.25], frac[0.3]) > 0.2                          # rho ~ R: caught at the ridge

# %% [markdown]
# ### Why SAM leaves the sharp basin at $\rho = 0.05$: the step, not the objective
#
# At $\rho = 0.05$ no run stays in the sharp basin, yet the objective table of section 2 still
# ranks the sharp minimum **first** at $\rho = 0.05$ ($L^{SAM}$ is lower there than at the flat
# minimum; the table prints both). So the objective $L^{SAM}$ is not what pushes SAM out. The
# discrete dynamics are: with $\eta\lambda_1 = 1.8$ close to 2, the factor $1/(2-\eta\lambda_1)$
# of section 4 turns a perturbation of $0.05$ into a swing wider than the basin, and the
# threshold $\rho^*$ printed above is set by the step size and the curvature. Change the learning
# rate and the outcome changes at the same $\rho$. The cell below reruns the same 2000 starts with
# $\eta = 0.02$ ($\eta\lambda_1 = 0.8$): at $\rho = 0.05$, and even at $\rho = 0.1$ where the
# objective does prefer the flat minimum, SAM now stays in the sharp basin about as often as
# gradient descent does (the cell prints the percentages), because the predicted $\rho^*$ (printed) is far above both.
#
# This is this tutorial's own analysis of a toy problem, not a claim of the SAM paper. It fits
# two lines of work on the dynamics of large steps: gradient descent with step size $\eta$ is
# only stable where the top Hessian eigenvalue is below $2/\eta$, and on neural networks it
# typically trains right at that limit, the *edge of stability* (Cohen, Kaur, Li, Kolter,
# Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
# ICLR 2021); for SAM, Bartlett, Long and Bousquet ("The Dynamics of Sharpness-Aware
# Minimization: Bouncing Across Ravines and Drifting Towards Wide Minima", JMLR 2023) show
# that on a quadratic SAM converges to a cycle bouncing across the minimum along the direction of
# largest curvature (our 2-cycle), and that away from quadratics this bouncing makes it drift
# towards wider minima.

# %%
lr_small = 0.02
k_small = lr_small * loss2d.lam1
print(f"eta = {lr_small}: predicted rho* = {R * (2 - k_small) / k_small:.3f}")
for rho in [0.0, 0.05, 0.1]:
    end = run_many(w0, rho, lr=lr_small)
    d1 = np.linalg.norm(end - loss2d.c1, axis=1)
    f_small = (d1 < 0.5).mean()
    # the runs that stay sit on the 2-cycle of section 4, at distance a from c1
    assert np.allclose(d1[d1 < 0.5], k_small * rho / (2 - k_small), atol=1e-6)
    print(f"rho = {rho:4.2f}: {100 * f_small:5.1f}% of runs end in the sharp basin at eta = {lr_small} "
          f"(at eta = {LR}: {100 * frac[rho]:5.1f}%)")
    if rho == 0.0:
        f_gd = f_small
    else:                                               # same rho: the step size decides
        assert frac[rho] == 0 and f_small > 0.2 and abs(f_small - f_gd) < 0.05

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
# * **$\rho$ in the useful range** (here from just above $\rho^*$ to about $0.15$, at this
#   learning rate): no run stays in the sharp basin, and in the flat one SAM hovers at the
#   predicted, tiny distance $\propto\rho$ (right panel).
# * **$\rho$ as large as the landscape's features** ($\rho \approx 0.25$ to $0.3$, about the
#   distance $R$ to the ridge): many runs get caught in a cycle across the ridge, at a loss worse
#   than either minimum. From just past the ridge on the flat side, "uphill" points back towards
#   the sharp basin, the perturbed point $w + \rho g/\|g\|$ lands in it, and the sharp basin's
#   steep gradient throws $w$ back over the ridge. The linearisation behind eq. 2 assumes that $L$
#   is nearly linear across the ball, and here it is not. (With larger $\rho$ still, the
#   perturbation jumps over the sharp basin altogether and the runs reach the flat basin again; do
#   not read much into that.)
#
# For real networks the paper reports tuning $\rho$ by grid search over
# $\{0.01, 0.02, 0.05, 0.1, 0.2, 0.5\}$. minisam's default, used in
# [notebook 04](04_sgd_vs_sam.ipynb), is $\rho = 0.05$: small next to the norm of a WideResnet's
# weight vector ([notebook 03](03_sam_step_by_step.ipynb) prints both and their ratio).
# Notebooks [04](04_sgd_vs_sam.ipynb) and [06](06_label_noise.ipynb) compare SGD and SAM on real
# training runs.

# %% [markdown]
# ## 7. SAM from scratch on an MLP in about 30 lines of NumPy
#
# Everything above carries over to a network unchanged: only the gradient gets longer to compute.
# Here is a one-hidden-layer ReLU network, $z = \mathrm{relu}(XW_1 + b_1)\,W_2 + b_2$, with
# softmax cross-entropy and a hand-written backward pass (the chain rule, layer by layer, from the
# loss back to the inputs), trained on the 8x8 digits that ship with minisam (10 classes; the
# cell below prints how many images) with plain SGD and with SAM, $\rho = 0.05$. The SAM step is exactly the one of
# Exercise 2, on a dictionary of four arrays instead of one, with minisam's `dual_vector`.

# %%
from minisam.data import load_dataset

train, test = load_dataset("digits", image_size=8)           # NHWC float32, normalised
X_tr, y_tr = train.images.reshape(len(train.images), -1).astype(np.float64), train.labels
X_te, y_te = test.images.reshape(len(test.images), -1).astype(np.float64), test.labels


def init_mlp(seed, d_in=64, d_hidden=128, d_out=10):
    rng = np.random.default_rng(seed)                          # He initialisation
    return {"W1": rng.normal(0, np.sqrt(2 / d_in), (d_in, d_hidden)), "b1": np.zeros(d_hidden),
            "W2": rng.normal(0, np.sqrt(1 / d_hidden), (d_hidden, d_out)), "b2": np.zeros(d_out)}


def mlp_loss_and_grad(p, X, y):
    h = X @ p["W1"] + p["b1"]                                  # forward
    a = np.maximum(h, 0)
    z = a @ p["W2"] + p["b2"]
    z = z - z.max(axis=1, keepdims=True)                       # stable softmax
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(prob[np.arange(n), y]).mean()
    dz = prob.copy()                                           # backward: d loss / d z
    dz[np.arange(n), y] -= 1
    dz /= n
    dh = (dz @ p["W2"].T) * (h > 0)                            # through W2, then the ReLU
    return loss, {"W1": X.T @ dh, "b1": dh.sum(0), "W2": a.T @ dz, "b2": dz.sum(0)}


def train_mlp(rho, epochs=30, lr=0.1, batch=64, seed=0):
    p, rng = init_mlp(seed), np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order = rng.permutation(len(y_tr))
        for i in range(0, len(order), batch):
            Xb, yb = X_tr[order[i:i + batch]], y_tr[order[i:i + batch]]
            _, g = mlp_loss_and_grad(p, Xb, yb)                # 1. gradient at w
            if rho > 0:                                        # 2. SAM: gradient at w + e_hat
                direction, _ = dual_vector(g)
                _, g = mlp_loss_and_grad({k: p[k] + rho * direction[k] for k in p}, Xb, yb)
            p = {k: p[k] - lr * g[k] for k in p}               # 3. the descent step
    return p


def accuracy(p, X, y):
    return float(((np.maximum(X @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]).argmax(1) == y).mean())


# %% [markdown]
# Before trusting the hand-written backward, compare it with finite differences: the directional
# derivative of the loss along a random direction $v$, $\big(L(w + hv) - L(w - hv)\big)/2h$,
# must equal $\langle\nabla L(w), v\rangle$ (in float64, to about 7 digits).

# %%
p, v_rng, h = init_mlp(seed=3), np.random.default_rng(4), 1e-6
v = {k: v_rng.normal(size=x.shape) for k, x in p.items()}
_, g = mlp_loss_and_grad(p, X_tr[:32], y_tr[:32])
shifted = lambda s: mlp_loss_and_grad({k: p[k] + s * h * v[k] for k in p}, X_tr[:32], y_tr[:32])[0]
numeric = (shifted(1) - shifted(-1)) / (2 * h)
analytic = sum((g[k] * v[k]).sum() for k in p)
print(f"finite differences {numeric:.10f}, backward {analytic:.10f}, "
      f"relative difference {abs(numeric - analytic) / abs(analytic):.1e}")
assert abs(numeric - analytic) < 1e-6 * abs(analytic)

# %%
print(f"{len(y_tr)} training and {len(y_te)} test images")
for name, rho in [("SGD", 0.0), ("SAM", 0.05)]:
    p = train_mlp(rho)
    loss_w, g = mlp_loss_and_grad(p, X_tr, y_tr)
    # the sharpness of section 2 on the whole training set, with the first-order e_hat, rho = 0.05
    e_dir, _ = dual_vector(g)
    rise = mlp_loss_and_grad({k: p[k] + 0.05 * e_dir[k] for k in p}, X_tr, y_tr)[0] - loss_w
    print(f"{name} (rho = {rho}): train accuracy {accuracy(p, X_tr, y_tr):.4f}, "
          f"test accuracy {accuracy(p, X_te, y_te):.4f}, training loss {loss_w:.4f}, "
          f"L(w + e_hat) - L(w) = {rise:.4f}")

# %% [markdown]
# Both fit the training set almost perfectly. Compare the printed test accuracies and the
# sharpness $L(w+\hat\epsilon) - L(w)$ of the two solutions, but do not read much into one
# seed on a few hundred test images: a difference of one test image is a fraction of a percent.
# [Notebook 04](04_sgd_vs_sam.ipynb) does the comparison properly, on a WideResnet, with three
# seeds, standard errors and the top Hessian eigenvalue of each solution.
#
# **Try this.** Train both again with other seeds (`train_mlp(rho, seed=1)`, `seed=2`). Expect
# the test accuracy to move from seed to seed by about as much as it differs between SGD and SAM
# here: that is why [notebook 04](04_sgd_vs_sam.ipynb) averages over seeds and reports standard
# errors before comparing.
#
# The same recipe, with a convolutional network, batch norm and residual connections, is what
# minisam runs: [notebook 02](02_backprop_by_hand.ipynb) writes the forward and backward of
# every layer of the WideResnet by hand and checks each against finite differences, as we did
# here for the MLP.
#
# ## Recap
#
# * Sharpness is how much the loss rises within distance $\rho$; SAM minimises the loss plus
#   that rise, $\max_{\|\epsilon\|\le\rho} L(w+\epsilon)$. With large enough $\rho$ that
#   objective prefers the flat minimum to a deeper sharp one (section 2).
# * The inner maximisation is solved to first order: $\hat\epsilon = \rho\, g/\|g\|$ (eq. 2,
#   global norm), one step of length $\rho$ uphill; the SAM gradient is the ordinary gradient
#   taken at $w + \hat\epsilon$ (the paper's Fig. 2). Two gradient evaluations per step. On our
#   toy loss the first-order perturbation is exact except near the ridge between the basins.
# * Near a minimum SAM keeps moving: it ends on a 2-cycle of amplitude
#   $\eta\lambda\rho/(2-\eta\lambda)$, which grows with the curvature and blows up as
#   $\eta\lambda \to 2$.
# * On the toy loss SAM left the sharp basin at $\rho = 0.05$ because of that swing, that is,
#   because of the step size, while the SAM objective at $\rho = 0.05$ still preferred the
#   sharp minimum; with a smaller learning rate it stays (our analysis, in the spirit of the
#   edge-of-stability literature, not a claim of the paper).
# * $\rho$ has to be large enough to matter and small enough for the first-order picture to hold.
#
# **Next:** [02 · Backprop by hand](02_backprop_by_hand.ipynb): the gradient of a WideResnet, layer
# by layer. Then [03](03_sam_step_by_step.ipynb) (one SAM step on a WideResnet, against the JAX
# reference), [04](04_sgd_vs_sam.ipynb) (SGD vs SAM, Hessian eigenvalues, loss landscapes),
# [05](05_m_sharpness_and_data_parallel.ipynb) ($m$-sharpness and data parallelism) and
# [06](06_label_noise.ipynb) (label noise).
#
# **Further reading**
#
# * Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, "On Large-Batch Training for Deep Learning:
#   Generalization Gap and Sharp Minima", ICLR 2017: large batches find sharp minima that
#   generalise worse.
# * Dinh, Pascanu, Bengio, Bengio, "Sharp Minima Can Generalize For Deep Nets", ICML 2017:
#   rescaling the layers of a ReLU network can make a minimum arbitrarily sharp without changing the
#   function, so sharpness has to be measured with care.
# * Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient Descent on Neural Networks Typically Occurs
#   at the Edge of Stability", ICLR 2021.
# * Bartlett, Long, Bousquet, "The Dynamics of Sharpness-Aware Minimization: Bouncing Across
#   Ravines and Drifting Towards Wide Minima", JMLR 2023.

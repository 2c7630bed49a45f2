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
# # 05 · m-sharpness and data-parallel SAM
#
# *Before this: [notebook 04](04_sgd_vs_sam.ipynb) trains SGD and SAM side by side. One SAM
# step line by line is in [notebook 03](03_sam_step_by_step.ipynb).*
#
# SAM is usually trained data-parallel: the global batch of $B$ examples is cut into $R$
# shards of $m = B/R$, one per replica (a GPU or a TPU core), every replica runs the same step
# on its shard, and the gradients are averaged across replicas by an **all-reduce**. SGD needs
# one all-reduce per step. SAM has a choice to make first: which gradient defines the
# perturbation?
#
# * **per-replica** (the JAX code's default, `sync_perturbations=False`): each replica $r$
#   perturbs with its own gradient,
#   $$\hat\epsilon_r = \rho\,\frac{g_r}{\|g_r\|},\quad g_r = \nabla L_{B_r}(w), \qquad
#   g_{SAM} = \frac1R\sum_{r=1}^R \nabla L_{B_r}(w)\big|_{w+\hat\epsilon_r};$$
# * **synced** (`sync_perturbations=True`): the replicas first average their gradients, and
#   all of them use the same perturbation,
#   $$\bar g = \frac1R\sum_r g_r, \qquad \hat\epsilon = \rho\,\frac{\bar g}{\|\bar g\|}, \qquad
#   g_{SAM} = \frac1R\sum_r \nabla L_{B_r}(w)\big|_{w+\hat\epsilon}.$$
#
# (Both are eq. 2 of the paper, $\hat\epsilon = \rho\, g/\|g\|$ for $p = 2$, applied to a
# different $g$.) The per-replica version is not an approximation of the synced one; it
# minimises a different objective, the paper's **m-sharpness** (sec. 4.1): the worst-case loss
# taken *separately* on each set of $m$ examples,
#
# $$
# L^{SAM}_m(w) = \frac{1}{n/m}\sum_{\text{batches } B \text{ of } m}\;
# \max_{\|\epsilon\|_2 \le \rho} L_B(w + \epsilon).
# $$
#
# In the paper's own runs $m$ was set by the hardware: its CIFAR experiments ran on 8 V100 GPUs
# (the ImageNet ones on TPUs), so with a batch of 256 each GPU perturbed with the gradient of
# its own 32 examples, an implicit $m = 32$. The paper then varies $m$ on purpose (sec. 4.1,
# Fig. 3 middle and right) and reports that smaller $m$ tends to generalise better, and that
# $m$-sharpness with a small $m$ predicts the generalisation gap better than full-batch
# sharpness does.
#
# This notebook:
#
# 1. runs both variants for one step on the two-replica JAX reference case and compares them
#    with the JAX numbers, replica by replica (**Exercise 1**: the two perturbations);
# 2. counts the all-reduces each variant makes per step;
# 3. measures how $m$ changes things: $m$-sharpness as a function of $m$, its first-order
#    prediction (**Exercise 2**), and short trainings with 1 and 4 replicas at a fixed global
#    batch;
# 4. draws the paper's Fig. 3 (middle and right) in miniature, from the committed output of
#    `minisam experiment m-sharpness`;
# 5. *deep dive (optional)*: inside the all-reduce, the flat buffer minisam hands to NCCL and
#    the ring algorithm, simulated in NumPy (this notebook needs no GPU), with its cost
#    (**Exercise 3**).

# %%
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`
sys.path.insert(0, str(ROOT / "tutorials"))
from grading import check           # grades the exercises

import inspect, json, time

import numpy as np
import matplotlib.pyplot as plt

from minisam.config import TrainConfig
from minisam.data import load_dataset
from minisam.flat import flatten, plan_layout, unflatten
from minisam.distributed.local import run_replicas
from minisam.models import WideResnet, wide_resnet
from minisam.optim import cosine_schedule, global_norm, nesterov_init
from minisam.reference import format_rows, load_case
from minisam.verify import verify
from minisam.sam import SAMConfig, descent, sam_gradient, train_step
from minisam.sharpness import BatchLoss, m_sharpness
from minisam.train import Trainer

plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 1. Per-replica and synced perturbations, against JAX
#
# `reference_results/wrn10x2_two_replicas.npz` was produced by the original JAX code
# (`jax.pmap` over two CPU devices): a WideResnet-10-2, a global batch of 16 images of CIFAR's
# shape split into two replicas of 8, one SAM step with $\rho = 0.05$, run once with
# `sync_perturbations=False` and once with `True`, every intermediate value saved per replica.
#
# In minisam the replicas are threads. `run_replicas(R, fn)` runs `fn` on $R$ thread replicas
# (rank 0 in the calling thread), hands each its rank and a `ThreadComm` handle, and
# `train_step` (through its two halves, `sam_gradient` and `descent`) calls
# `comm.allreduce_mean(...)` where the JAX code calls `jax.lax.pmean(..., 'batch')`. Here are
# the lines of the step around the perturbation; the lines that pass `comm` are the only places
# where replicas talk (`group_mean` is an all-reduce over a group of replicas, by default all
# of them):

# %%
for fn in (sam_gradient, descent):
    print(f"in {fn.__name__}:")
    for line in inspect.getsource(fn).splitlines()[1:]:
        code = line.split("#")[0]
        if ("comm" in code and "trace" not in code) or "perturbation(g" in code:
            print("   ", line.strip())

arrays, manifest = load_case(str(ROOT / "reference_results" / "wrn10x2_two_replicas.npz"))
cfg = manifest["config"]
R, B = cfg["replicas"], cfg["batch_size"]
images, labels = arrays["input/images"], arrays["input/labels"].astype(np.int32)
w0 = {k[len("init/params/"):]: v for k, v in arrays.items() if k.startswith("init/params/")}
s0 = {k[len("init/state/"):]: v for k, v in arrays.items() if k.startswith("init/state/")}
print(f"\n{R} replicas x {B // R} images of shape {images.shape[1:]}, WRN-10-{cfg['channel_multiplier']}, "
      f"{sum(v.size for v in w0.values())} parameters in {len(w0)} arrays, rho = {cfg['sam_rho']}")


def one_step(sync):
    """One SAM step on R thread replicas; returns each replica's (params, state, momentum, metrics), trace."""
    sam_cfg = SAMConfig(rho=cfg["sam_rho"], weight_decay=cfg["weight_decay"],
                        gradient_clipping=cfg["gradient_clipping"], sync_perturbations=sync)
    lr = cosine_schedule(cfg["learning_rate"], cfg["num_epochs"], cfg["steps_per_epoch"])(0)
    b = B // R

    def replica(rank, comm):
        model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"], in_channels=3)
        trace = {}
        out = train_step(model, w0, s0, nesterov_init(w0), images[rank * b:(rank + 1) * b],
                         labels[rank * b:(rank + 1) * b], lr, sam_cfg, comm, trace)
        return out, trace

    return run_replicas(R, replica)


steps = {sync: one_step(sync) for sync in (False, True)}

# %% [markdown]
# Now the comparison, replica by replica. `rel err` is $\max|x_{minisam} - x_{JAX}| / \max|x_{JAX}|$
# over the array. In the per-replica mode each replica's perturbation is built from its own
# gradient norm, so the two norms differ; in the synced mode both replicas use $\|\bar g\|$.

# %%
def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tree_rel(ours, prefix, r=None):
    return max(rel(v, arrays[prefix + k] if r is None else arrays[prefix + k][r]) for k, v in ours.items())


print(f"{'mode':12s} {'replica':>7s} {'||g_r||':>10s} {'norm used for e':>16s} {'JAX':>10s} "
      f"{'L_r(w+e)':>10s} {'JAX':>10s} {'e rel err':>10s} {'g_sam rel err':>14s}")
for sync, results in steps.items():
    mode = f"sync_{str(sync).lower()}/"
    for r, ((params, state, mom, met), tr) in enumerate(results):
        print(f"{'synced' if sync else 'per-replica':12s} {r:7d} {float(global_norm(tr['grad'])):10.6f} "
              f"{float(tr['grad_for_perturbation_norm']):16.6f} {arrays[mode + 'sam/grad_for_perturbation_norm'][r]:10.6f} "
              f"{float(tr['perturbed_loss']):10.6f} {arrays[mode + 'sam/perturbed_loss'][r]:10.6f} "
              f"{tree_rel(tr['perturbation'], mode + 'sam/perturbation/', r):10.1e} "
              f"{tree_rel(tr['sam_grad'], mode + 'sam/grad/', r):14.1e}")
    new_params = results[0][0][0]
    print(f"{'':12s} parameters after the step (same on both replicas): rel err {tree_rel(new_params, mode + 'step1/params/'):.1e}, "
          f"max difference between replicas "
          f"{max(float(np.abs(results[0][0][0][k] - results[1][0][0][k]).max()) for k in new_params):.1e}")

# %% [markdown]
# Every number matches the JAX run to float32 precision, in both modes. The full check, every
# key of the case (`minisam.reference.verify`, the same as `minisam verify`; it also looks for
# float32 ReLU ties, see notebook 03, and reports any it had to resolve):

# %%
rows, kept = verify(str(ROOT / "reference_results" / "wrn10x2_two_replicas.npz"))
for mode in ("sync_false/", "sync_true/"):
    mine = [r for r in rows if r.group.startswith(mode)]
    print(f"{mode:12s} {len(mine)} key groups, {sum(r.n_keys for r in mine)} keys, all pass: {all(r.ok for r in mine)}, "
          f"largest relative error {max(r.max_rel for r in mine if r.kind == 'rel'):.1e}")
print("ReLU ties resolved:", kept if kept else "none")
print()
print(format_rows([r for r in rows if "sam/" in r.group and ("norm" in r.group or "loss" in r.group)]))

# %% [markdown]
# ### What the two perturbations look like
#
# The two replicas' gradients are computed on different images. How different are they, and
# what does that do to the perturbation? To first order, perturbing by $\epsilon$ raises
# replica $r$'s loss by $g_r^\top\epsilon$: by $\rho\|g_r\|$ for its own direction (the most any
# $\epsilon$ of norm $\rho$ can do, to first order) and by $\rho\, g_r^\top\bar g/\|\bar g\|$ for
# the shared one.

# %%
rho = cfg["sam_rho"]
g = [tr["grad"] for _, tr in steps[False]]
dot = lambda a, b: sum(float((a[k] * b[k]).sum()) for k in a)
cos = dot(g[0], g[1]) / np.sqrt(dot(g[0], g[0]) * dot(g[1], g[1]))
gbar = {k: (g[0][k] + g[1][k]) / 2 for k in g[0]}
print(f"cosine between the two replicas' gradients: {cos:+.3f} (angle {np.degrees(np.arccos(cos)):.0f} degrees)")
print(f"||g_0|| = {np.sqrt(dot(g[0], g[0])):.3f}, ||g_1|| = {np.sqrt(dot(g[1], g[1])):.3f}, "
      f"||mean|| = {np.sqrt(dot(gbar, gbar)):.3f}\n")
print(f"{'replica':>7s} {'L_r(w)':>9s} | {'own e_r: rise':>14s} {'1st order':>10s} | {'shared e: rise':>15s} {'1st order':>10s}")
for r in range(R):
    L0 = float(steps[False][r][1]["loss"])
    own = float(steps[False][r][1]["perturbed_loss"]) - L0
    shared = float(steps[True][r][1]["perturbed_loss"]) - L0
    own_1st, shared_1st = rho * np.sqrt(dot(g[r], g[r])), rho * dot(g[r], gbar) / np.sqrt(dot(gbar, gbar))
    print(f"{r:7d} {L0:9.4f} | {own:14.4f} {own_1st:10.4f} | {shared:15.4f} {shared_1st:10.4f}")
    assert shared < own and own < own_1st and shared < shared_1st   # what the text below says
assert abs(cos) < 0.3                                               # "nearly orthogonal"

# %% [markdown]
# At initialisation, on 8 images each, the two replicas' gradients are nearly
# orthogonal (the cosine printed above), so the mean gradient is about $1/\sqrt2$ as long as
# either, and the shared perturbation raises each replica's loss noticeably less than its own
# would. The per-replica step therefore takes the SAM gradient at a point that is worse *for
# each shard*: it minimises the worst case of every set of $m = 8$ examples, not the worst case
# of their average. (Here the first-order predictions overestimate the rise a little: at this
# initialisation the loss curves down along the gradient over a distance of $\rho$. Keep this in
# mind for section 3, where a trained network does the opposite.)
#
# ### Exercise 1: per-replica and synced perturbations
#
# Write `my_perturbations(grads, rho, sync)`. `grads` is a list of $R$ gradient dicts, one per
# replica (`g` above: `g[r][key]` is an array); return the list of the $R$ perturbation dicts
# (same keys and shapes) that the replicas add to $w$:
#
# * `sync=False`: replica $r$ uses its own gradient, $\hat\epsilon_r = \rho\, g_r/\|g_r\|$;
# * `sync=True`: every replica uses $\hat\epsilon = \rho\,\bar g/\|\bar g\|$ with
#   $\bar g = \frac1R\sum_r g_r$ (what the all-reduce gives).
#
# $\|\cdot\|$ is the *global* norm, over every array of the dict together:
# $\|g\| = \sqrt{\sum_{\text{key}} \sum_i g[\text{key}]_i^2}$. It is graded against the
# perturbations the **JAX code** saved in the reference case (`sync_false/sam/perturbation/...`
# and `sync_true/...`, one per replica), with a tolerance of $10^{-4}$ of their largest entry,
# since minisam's float32 gradients and JAX's differ in the last digits.

# %% tags=["exercise"]
def my_perturbations(grads, rho, sync):
    # YOUR CODE HERE (about five lines)
    raise NotImplementedError


# %%
def jax_perturbations(grads, rho, sync):
    """The JAX run's perturbation of each replica (it used rho = cfg['sam_rho'])."""
    assert rho == cfg["sam_rho"]
    prefix = f"sync_{str(sync).lower()}/sam/perturbation/"
    return [{k: arrays[prefix + k][r] for k in grads[r]} for r in range(len(grads))]


e_atol = 1e-4 * max(float(np.abs(v).max()) for k, v in arrays.items() if "/sam/perturbation/" in k)
check("Exercise 1 (perturbations)", my_perturbations, jax_perturbations,
      [(g, rho, False), (g, rho, True)], rtol=1e-4, atol=e_atol)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_perturbations_solution(grads, rho, sync):
    def scaled(v):                                  # rho v / ||v||, global norm over the dict
        norm = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in v.values()))
        return {k: rho * a / norm for k, a in v.items()}
    if sync:
        mean = {k: sum(gr[k] for gr in grads) / len(grads) for k in grads[0]}
        return [scaled(mean) for _ in grads]
    return [scaled(gr) for gr in grads]


check("Exercise 1, solution", my_perturbations_solution, jax_perturbations,
      [(g, rho, False), (g, rho, True)], rtol=1e-4, atol=e_atol)

# %% [markdown]
# **Try this.** How far is the synced perturbation from replica 0's own one? Both have norm
# $\rho$; predict the norm of their difference from the cosine printed above, then compute it
# with `global_norm` on the difference of `my_perturbations_solution(g, rho, True)[0]` and
# `my_perturbations_solution(g, rho, False)[0]`.

# %% [markdown] jupyter={"source_hidden": true}
# *Answer.* Two vectors of norm $\rho$ at an angle $\theta$ are $2\rho\sin(\theta/2)$ apart.
# With two nearly orthogonal gradients of similar length, the mean $\bar g$ is at about 45
# degrees from each, so the difference is about $2\rho \sin(22.5°) \approx 0.77\rho$: the two
# variants do not perturb in similar directions at all. The next cell prints the exact value.

# %%
theta = np.arccos(dot(g[0], gbar) / np.sqrt(dot(g[0], g[0]) * dot(gbar, gbar)))
e_sync, e_own = my_perturbations_solution(g, rho, True)[0], my_perturbations_solution(g, rho, False)[0]
print(f"angle between g_0 and the mean gradient: {np.degrees(theta):.1f} degrees")
print(f"||e_synced - e_own|| = {float(global_norm({k: e_sync[k] - e_own[k] for k in e_own})):.4f}, "
      f"2 rho sin(theta/2) = {2 * rho * np.sin(theta / 2):.4f}, rho = {rho}")

# %% [markdown]
# ## 2. How many all-reduces does a SAM step make?
#
# The per-replica variant communicates exactly as much as SGD: one all-reduce of the gradient
# (the SAM gradient) per step. The synced variant needs a second one, of $g$, *before* it can
# perturb, and on the critical path: no replica can start its second forward pass until every
# replica has finished its first backward pass. Counting the calls that `train_step` makes:

# %%
class CountingComm:
    """Wraps a communicator and counts the all-reduces and the bytes they carry."""

    def __init__(self, comm):
        self.comm, self.rank, self.size, self.calls, self.nbytes = comm, comm.rank, comm.size, 0, 0

    def allreduce_mean(self, tree):
        self.calls += 1
        self.nbytes += sum(v.nbytes for v in tree.values())
        return self.comm.allreduce_mean(tree)


for name, rho_, sync in [("SGD", 0.0, False), ("SAM, per-replica", cfg["sam_rho"], False),
                         ("SAM, synced", cfg["sam_rho"], True)]:
    sam_cfg = SAMConfig(rho=rho_, sync_perturbations=sync)

    def replica(rank, comm):
        counting = CountingComm(comm)
        model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"], in_channels=3)
        b = B // R
        train_step(model, w0, s0, nesterov_init(w0), images[rank * b:(rank + 1) * b],
                   labels[rank * b:(rank + 1) * b], 0.1, sam_cfg, counting)
        return counting.calls, counting.nbytes

    calls, nbytes = run_replicas(R, replica)[0]
    print(f"{name:18s}: {calls} all-reduce(s) per step, {nbytes / 2**20:.2f} MiB")

# %% [markdown]
# (BN running statistics are not all-reduced during training at all: each replica keeps its own,
# as under `jax.pmap`, and they are averaged only for evaluation and checkpoints.) What one
# all-reduce costs, and how NCCL does it, is the optional deep dive at the end (section 5).
#
# ## 3. How $m$ changes the result
#
# ### $m$-sharpness of one solution
#
# `minisam.sharpness.m_sharpness(model, params, state, images, labels, m=m, rho=rho)` computes
# the inner part of the $m$-sharpness objective the way SAM approximates it. It cuts the
# examples into consecutive batches $B$ of $m$ (a partial last batch is dropped) and, for each
# batch:
#
# 1. $L_B(w)$: a forward pass on the $m$ examples **with batch norm in training mode**, so
#    every BN layer normalises with the mean and variance of *these $m$ examples* (over the
#    batch and the spatial positions), not with its running statistics;
# 2. $g_B$: the gradient of that same loss (`sam.loss_and_grad`, BN again on the $m$ examples);
# 3. $L_B(w + \rho\, g_B/\|g_B\|)$, BN once more on the $m$ examples;
#
# and returns the mean over batches of the rise $L_B(w + \rho g_B/\|g_B\|) - L_B(w)$ (no
# weight-decay term by default), with the per-batch rises. The BN running statistics are
# restored after every call, so measuring never changes the model. With `ascent_steps > 1` it
# takes more projected ascent steps inside the ball (a better approximation of the max, from
# below); the default, one step, is SAM's own approximation.
#
# **A confound to keep in mind**: with BN, changing $m$ changes two things at once, the
# perturbation (each batch's own $g_B$) *and* BN's statistics (at $m = 4$ each BN layer
# normalises with 4 images' statistics). So a rise that changes with $m$ is not purely a
# property of the perturbation; the same holds for training with per-replica BN.
#
# To have solutions to measure, we train the same WRN-10-1 on the digits (15 epochs, global
# batch 64, $\rho = 0.05$) three ways:
#
# | run | replicas $R$ | BN batch | perturbation computed from |
# |---|---|---|---|
# | `R=1` | 1 | 64 | the 64 examples ($m = 64$) |
# | `R=4, synced` | 4 | 16 | the mean gradient of all 64 examples |
# | `R=4, per-replica` | 4 | 16 | each replica's 16 examples ($m = 16$) |
#
# The last two differ *only* in the perturbation; the first two differ only in the batch that
# batch norm normalises over (with replicas, BN statistics are per replica, as in the JAX code,
# so changing $R$ changes BN too: the same confound, in training). The thread replicas share
# this machine's CPU cores, so `R=4` takes longer here than `R=1`; on GPUs each replica would
# have its own device.

# %%
train, test = load_dataset("digits", image_size=8)
BASE = dict(dataset="digits", image_size=8, model="wrn10_1", epochs=15, batch_size=64, lr=0.1,
            weight_decay=5e-4, rho=0.05, seed=0)
RUNS = {"R=1": dict(replicas=1), "R=4, synced": dict(replicas=4, sync_perturbations=True),
        "R=4, per-replica": dict(replicas=4, sync_perturbations=False)}
trainers = {}
for name, extra in RUNS.items():
    t = time.perf_counter()
    trainers[name] = tr = Trainer(TrainConfig(**BASE, **extra), None, progress=False, data=(train, test))
    tr.fit()
    print(f"{name:17s}: {time.perf_counter() - t:5.1f} s, test accuracy {1 - tr.last_record['test_error_rate']:.2%}, "
          f"test loss {tr.last_record['test_loss']:.4f}")

# %%
ms = [4, 8, 16, 32, 64, 128, 256]
x, y = train.images[:256], train.labels[:256]
msharp = {}
t = time.perf_counter()
for name, tr in trainers.items():
    msharp[name] = [m_sharpness(tr.models[0], tr.params, tr.eval_state(), x, y, m=m, rho=0.05) for m in ms]
print(f"m-sharpness of {len(trainers)} solutions at {len(ms)} values of m in {time.perf_counter() - t:.1f} s\n")

print(f"{'m':>5s}" + "".join(f"{name:>19s}" for name in trainers))
for i, m in enumerate(ms):
    print(f"{m:5d}" + "".join(f"{msharp[name][i]['loss']:19.4f}" for name in trainers))

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
for name in trainers:
    a.loglog(ms, [r["loss"] for r in msharp[name]], "o-", label=name)
a.set(xlabel="m (examples per batch)", ylabel=r"mean of $L_B(w+\rho g_B/\|g_B\|) - L_B(w)$",
      title=r"$m$-sharpness of each solution ($\rho$ = 0.05, BN on batches of m)")
a.legend(loc="best")
rng = np.random.default_rng(0)
for i, m in enumerate(ms):
    v = msharp["R=1"][i]["per_batch_loss"]
    b.scatter(m * np.exp(0.12 * rng.standard_normal(len(v))), np.maximum(v, 1e-5), s=6, alpha=0.5,
              color="C0", label="one batch" if i == 0 else None)
    b.plot(m, v.mean(), "_", ms=18, mew=2, color="k", label="mean over the batches" if i == 0 else None)
b.set(xscale="log", yscale="log", xlabel="m (examples per batch)", ylabel="loss rise on one batch",
      title="R=1 solution: the rise on every batch, and their mean")
b.legend(loc="best")
for ax in (a, b):
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
plt.tight_layout()
plt.show()
neg = sum(int((r["per_batch_loss"] <= 0).sum()) for rs in msharp.values() for r in rs)
print(f"batches whose loss did not rise (plotted at 1e-5): {neg}")
for name in trainers:                      # "falls steeply with m", for every solution
    assert msharp[name][0]["loss"] > 5 * msharp[name][-1]["loss"], name
for i in range(len(ms)):                   # R=1 measures sharper than both R=4 solutions
    assert msharp["R=1"][i]["loss"] > max(msharp[n_][i]["loss"] for n_ in ("R=4, synced", "R=4, per-replica"))
    assert 1 / 1.5 < msharp["R=4, per-replica"][i]["loss"] / msharp["R=4, synced"][i]["loss"] < 1.5

# %% [markdown]
# For every solution the $m$-sharpness falls steeply with $m$ (the assert above checks a factor
# of more than 5 between $m = 4$ and $m = 256$). A small batch has a gradient specific to its few
# examples, and a step of length $\rho$ along it raises *their* loss a lot; the gradient of a big
# batch is an average of many partly cancelling directions, and the same step raises the batch's
# loss much less (section 1 showed the same effect at initialisation). Part of the fall is the
# confound named above: at small $m$ batch norm also normalises with noisier statistics. So a
# SAM step with per-replica perturbations on small shards asks for a much stronger kind of
# flatness than the step with a synced perturbation over the whole batch, even though both use
# the same $\rho$. This is the sense in which $m$ is a hyperparameter of SAM, and why
# `sync_perturbations` is not a free implementation detail: with $R$ GPUs, it changes $m$ from
# $B/R$ to $B$.
#
# At every $m$ the `R=1` solution measures sharper than both `R=4` ones (asserted), whichever
# perturbation the latter used; the two `R=4` curves, which differ only in the perturbation,
# stay close together (within a factor 1.5 at every $m$, asserted). We come back to this with the test accuracies below.
#
# ### Exercise 2: the first-order prediction of $m$-sharpness
#
# To first order in $\rho$,
# $L_B(w + \rho\, g_B/\|g_B\|) - L_B(w) \approx g_B^\top (\rho\, g_B/\|g_B\|) = \rho\,\|g_B\|$,
# so the $m$-sharpness is about $\rho\,\mathbb{E}_B \|g_B\|$: $\rho$ times the mean gradient norm
# over the batches of $m$ examples. That is a first explanation of the fall with $m$: if the
# examples' gradients were independent, $\|g_B\|$ would shrink roughly like $1/\sqrt m$ until it
# reached the norm of the full gradient.
#
# Write `my_first_order_msharpness(batch_grads, rho)`: `batch_grads` is a list of gradient dicts
# $g_B$, one per batch; return the number $\rho \cdot \frac{1}{\#B}\sum_B \|g_B\|$, with the
# global norm of Exercise 1. The next cell computes the per-batch gradients of the `R=1` solution
# the way `m_sharpness` does (a `BatchLoss` on each batch: BN in training mode on the batch).
# The check compares your function with one built on minisam's `global_norm`.

# %%
solution, state = trainers["R=1"], trainers["R=1"].eval_state()


def batch_gradients(m):
    """g_B on each consecutive batch of m of the examples x, BN in train mode on the batch;
    and the mean of the batches' losses L_B(w)."""
    out = [BatchLoss(solution.models[0], state, x[i:i + m], y[i:i + m]).grad(solution.params)
           for i in range(0, len(y) - m + 1, m)]
    return [gb for _, gb in out], float(np.mean([loss for loss, _ in out]))


t = time.perf_counter()
grads_by_m, loss_by_m = {}, {}
for m in ms:
    grads_by_m[m], loss_by_m[m] = batch_gradients(m)
print(f"per-batch gradients for {len(ms)} values of m in {time.perf_counter() - t:.1f} s; "
      f"m = 4: {len(grads_by_m[4])} batches, m = 256: {len(grads_by_m[256])}")

# %% tags=["exercise"]
def my_first_order_msharpness(batch_grads, rho):
    # YOUR CODE HERE (one or two lines)
    raise NotImplementedError


# %%
def first_order_reference(batch_grads, rho):
    return rho * float(np.mean([float(global_norm(gb)) for gb in batch_grads]))


cases = [(grads_by_m[4], 0.05), (grads_by_m[32], 0.05), (grads_by_m[256], 0.05), (grads_by_m[16], 0.1)]
check("Exercise 2 (first-order m-sharpness)", my_first_order_msharpness, first_order_reference,
      cases, rtol=1e-5)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_first_order_msharpness_solution(batch_grads, rho):
    norms = [np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in gb.values()))
             for gb in batch_grads]
    return rho * float(np.mean(norms))


check("Exercise 2, solution", my_first_order_msharpness_solution, first_order_reference,
      cases, rtol=1e-5)

# %% [markdown]
# Now the prediction against the measurement, for the `R=1` solution at $\rho = 0.05$:

# %%
measured = np.array([r["loss"] for r in msharp["R=1"]])
predicted = np.array([my_first_order_msharpness_solution(grads_by_m[m], 0.05) for m in ms])
print(f"{'m':>5s} {'measured':>10s} {'rho E||g_B||':>13s} {'measured / predicted':>21s} {'mean L_B(w)':>12s}")
for m, a_, p_ in zip(ms, measured, predicted):
    print(f"{m:5d} {a_:10.4f} {p_:13.4f} {a_ / p_:21.2f} {loss_by_m[m]:12.4f}")

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
a.loglog(ms, measured, "o-", label=r"measured: $L_B(w+\rho g_B/\|g_B\|) - L_B(w)$")
a.loglog(ms, predicted, "s--", label=r"first order: $\rho\,\mathrm{E}_B\|g_B\|$")
a.loglog(ms, predicted[0] * np.sqrt(ms[0] / np.array(ms)), ":", color="gray",
         label=r"$\propto 1/\sqrt{m}$ (through the first point)")
a.set(xlabel="m (examples per batch)", ylabel="mean loss rise over the batches",
      title="R=1 solution: m-sharpness and its first-order prediction")
a.legend(loc="best", fontsize=9)
b.semilogx(ms, measured / predicted, "o-", color="C2")
b.axhline(1, color="gray", lw=0.8)
b.set(xlabel="m (examples per batch)", ylabel="measured / first-order prediction",
      title="how much the first-order term misses")
for ax in (a, b):
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
plt.tight_layout()
plt.show()
assert np.all(measured > predicted)                  # the loss curves up along g_B here
assert np.all(measured / predicted < 2.5)            # ... but first order gets the size right
assert predicted[0] > 5 * predicted[-1]              # and the fall with m
assert predicted[0] > 2 * np.sqrt(ms[3] / ms[0]) * predicted[3]   # far steeper than 1/sqrt(m), 4 -> 32
assert loss_by_m[4] > 5 * loss_by_m[64]              # BN on 4 images: a worse fit to begin with

# %% [markdown]
# The first-order term $\rho\,\mathbb{E}_B\|g_B\|$ accounts for the size of the $m$-sharpness and
# for most of its fall with $m$ (the asserts check that the measured rise stays within a factor
# 2.5 of the prediction at every $m$, and that the prediction falls by more than 5 from $m = 4$
# to $m = 256$). For large $m$ it flattens, as $\|g_B\|$ approaches the norm of the gradient
# over all 256 examples, which is not zero.
#
# For small $m$ it falls much faster than the $1/\sqrt m$ that averaging independent
# per-example gradients would give (the dotted line; asserted: more than twice as steep from
# $m = 4$ to $m = 32$). The last column says why: the loss $L_B(w)$ *before* any perturbation is
# much higher on batches of 4 than on batches of 64 (asserted: more than 5 times). This is the
# batch-norm confound at work. In training mode BN normalises each batch with its own
# statistics; with 4 images those are noisy, the network is no longer the one that was trained
# with BN over 64 images, and it fits its batch worse, with a larger gradient. So much of the
# steep rise of $m$-sharpness at small $m$ measures BN on tiny batches, not only the flatness
# of the loss in weight space.
#
# What it misses is the next term of the Taylor expansion,
# $\tfrac12\rho^2\, g_B^\top H_B\, g_B/\|g_B\|^2$, the curvature of the batch's loss along its
# own gradient. At this trained solution it is positive (the measured rise is larger than the
# prediction at every $m$, asserted), while at the initialisation of section 1 the loss curved
# down and first order overestimated. Its relative weight, the ratio printed above, depends on
# how large $\rho\|g_B\|$ is next to $\tfrac12\rho^2$ times that curvature: first order is a good
# description when the gradient term dominates, and it fails entirely at a point where $g_B$
# vanishes (a full-batch minimum), where the whole rise is second order. That is why the
# paper's definition takes the max over the ball rather than one step along $g_B$; the
# `ascent_steps` option of `m_sharpness` approximates that max.
#
# **Try this.** Pass `ascent_steps=5` to `m_sharpness` for the `R=1` solution and compare with
# the first column above. Predict first: higher or lower, and by a lot or a little?

# %% [markdown] jupyter={"source_hidden": true}
# *Answer.* Never lower: `projected_ascent` starts at SAM's first-order point
# $\rho g_B/\|g_B\|$ and keeps the best iterate, so more steps can only find a higher loss in
# the ball. Only a little higher, though, because the rise is dominated by the first step
# (the JSON of section 4 stores both for every model: there the projected-ascent values are
# less than 15% above the first-order ones, asserted in that section).
#
# ### Training with 1 and 4 replicas
#
# Back to the three trained solutions. Their test accuracies, with the resolution a test set of
# this size allows:

# %%
n_test = len(test.labels)
acc = {name: 1 - tr.last_record["test_error_rate"] for name, tr in trainers.items()}
for name, a_ in acc.items():
    se = np.sqrt(a_ * (1 - a_) / n_test)
    print(f"{name:17s}: test accuracy {a_:.2%} +- {se:.2%} (standard error), "
          f"{round((1 - a_) * n_test)} of {n_test} test images wrong, test loss {trainers[name].last_record['test_loss']:.4f}")
print(f"one test image = {100 / n_test:.2f} points of accuracy")
d_r4 = abs(acc["R=4, synced"] - acc["R=4, per-replica"])
se_r4 = np.sqrt(acc["R=4, synced"] * (1 - acc["R=4, synced"]) / n_test)
print(f"the two R=4 runs differ by {round(d_r4 * n_test)} test image(s), {d_r4 / se_r4:.1f} standard errors")
assert d_r4 < 2 * se_r4                     # per-replica vs synced: not resolved here

# %% [markdown]
# The cell above prints the three accuracies and their standard errors: the two `R=4` runs,
# which differ *only* in the perturbation, are within two standard errors of each other
# (asserted), so per-replica versus synced perturbations makes no difference we can resolve at
# this scale, with one seed on 357 test images. Where `R=1` lands relative to them is printed
# too; with one seed, treat any difference of a standard error or two as noise. If `R=1` is
# behind, remember what the two `R=4` runs share: batch norm over 16 examples instead of 64 (the
# "ghost batch norm" effect, a regulariser of its own), the confound of this section once more,
# in training this time.
#
# **Try this.** Rerun the training cell with `seed=1` in `BASE` (about a minute). The
# accuracies move by about a standard error, and the order of the two `R=4` runs can change:
# that is what "not resolved" means. The paper's finding that a smaller $m$ generalises better
# comes from CIFAR-scale runs, where a difference of a few tenths of a point is measurable.
#
# ## 4. The paper's Fig. 3 (middle and right) in miniature
#
# The paper's Fig. 3 (middle) trains with $m$-SAM for several $m$ and $\rho$ and plots the test
# error against $\rho$; Fig. 3 (right) measures the $m$-sharpness of many trained models and
# asks how well it predicts their generalisation gap (test error minus train error), as a rank
# correlation, for each $m$. The paper reports that smaller $m$ gives lower test error and that
# the correlation is higher for smaller $m$.
#
# `minisam experiment m-sharpness` runs the same experiment in miniature
# (`minisam/experiments/msharpness.py`): a WRN-10-1 on 8x8 digits trained with micro-batch
# $m$-SAM (each micro-batch of $m$ examples perturbs with its own gradient, in one process) for
# each $m$ and $\rho$ on a grid, plus SGD, for two seeds; then every model's $m$-sharpness on a
# fixed set of training examples, first-order (one ascent step, what SAM uses) and by projected
# ascent, and the Spearman rank correlation of each with the gap over all the models. That
# trains a grid of models, minutes of CPU, too slow for this notebook; its output is committed
# as `docs/figures/m-sharpness.json` (every number of its figure,
# [`docs/figures/m-sharpness.png`](../docs/figures/m-sharpness.png)). We load it and draw the two
# panels, plus the scatter behind one point of the right panel. The settings come from the JSON:

# %%
record = json.loads((ROOT / "docs" / "figures" / "m-sharpness.json").read_text())
st, models = record["settings"], record["models"]
print(f"minisam experiment m-sharpness{' --quick' if record['quick'] else ''}: {record['seconds']:.0f} s "
      f"on the machine that made it ({record['device']})")
print(f"model {st['model']} on {st['image_size']}x{st['image_size']} digits, {st['epochs']} epochs, batch {st['batch_size']}, "
      f"training m in {st['ms']}, rho in {st['rhos']}, seeds {st['seeds']}: {len(models)} models")
print(f"m-sharpness measured on {st['examples']} training examples at rho = {st['measure_rho']}, "
      f"first order and with {st['ascent_steps']} projected ascent steps\n")

epochs_of = lambda r: r.get("epochs", st["epochs"])
sam_rhos = sorted({r["rho"] for r in models if r["rho"] > 0})
err = {(m, rho_): 100 * np.mean([r["test_error_rate"] for r in models if r["train_m"] == m and r["rho"] == rho_])
       for m in st["ms"] for rho_ in sam_rhos}
sgd_rows = [r for r in models if r["rho"] == 0]
sgd_budgets = sorted({epochs_of(r) for r in sgd_rows})      # two if SGD also trained for twice the epochs
sgd_err = min(100 * np.mean([r["test_error_rate"] for r in sgd_rows if epochs_of(r) == e]) for e in sgd_budgets)
print(f"mean test error over the seeds (SGD: {sgd_err:.2f}%"
      + (", the better of its epoch budgets" if len(sgd_budgets) > 1 else "") + ")")
print(f"{'training m':>10s}" + "".join(f"{'rho ' + str(r_):>11s}" for r_ in sam_rhos))
for m in st["ms"]:
    print(f"{m:10d}" + "".join(f"{err[(m, r_)]:10.2f}%" for r_ in sam_rhos)
          + ("   (m = batch: plain SAM)" if m == st["batch_size"] else ""))
corr = record["spearman_vs_gap"]
print("\nSpearman correlation of m-sharpness with the gap, over all models:")
for m in st["ms"]:
    first, ascent = corr[f"m={m},steps=1"], corr[f"m={m},steps={st['ascent_steps']}"]
    print(f"   measured with m = {m:3d}: first order {first:+.2f}, projected ascent {ascent:+.2f}")
gaps = 100 * np.array([r["gap"] for r in models])
print(f"\ngaps from {gaps.min():.1f} to {gaps.max():.1f} points of error; one test image = {100 / n_test:.2f} points")

# %%
fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.3))
for i, m in enumerate(st["ms"]):
    col = f"C{i}"
    a.plot([0.0] + sam_rhos, [sgd_err] + [err[(m, r_)] for r_ in sam_rhos], "o-", color=col,
           label=f"m = {m}" + (" (plain SAM)" if m == st["batch_size"] else ""))
    for r in models:                                   # the single seeds, faint
        if r["train_m"] == m:
            a.plot(r["rho"], 100 * r["test_error_rate"], ".", color=col, alpha=0.35)
a.plot(0.0, sgd_err, "k*", ms=12, label="SGD (rho = 0)")
a.plot([], [], ".", color="gray", alpha=0.5, label="one seed")
a.set(yscale="log", xlabel=r"$\rho$ (training)", ylabel="test error (%, log scale)",
      title=f"Fig. 3 middle: test error after m-SAM (mean of {len(st['seeds'])} seeds)")
ticks = [t_ for t_ in (2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50) if a.get_ylim()[0] <= t_ <= a.get_ylim()[1]]
a.set_yticks(ticks, [str(t_) for t_ in ticks])
a.minorticks_off()
a.legend(loc="upper left", fontsize=8)

for steps_, style in ((1, "o-"), (st["ascent_steps"], "s--")):
    b.plot(st["ms"], [corr[f"m={m},steps={steps_}"] for m in st["ms"]], style,
           label="first order (one ascent step)" if steps_ == 1 else f"projected ascent ({steps_} steps)")
b.axhline(0, color="gray", lw=0.8)
b.set(xscale="log", ylim=(-1, 1), xlabel="m used to measure m-sharpness",
      ylabel="Spearman correlation with the gap",
      title=f"Fig. 3 right: does m-sharpness predict the gap? ({len(models)} models)")
b.set_xticks(st["ms"], [str(m) for m in st["ms"]])
b.minorticks_off()
b.legend(loc="lower left", fontsize=8)

m0 = st["ms"][0]
for i, m in enumerate(st["ms"]):
    rows = [r for r in models if r["train_m"] == m]
    c.scatter([r["m_sharpness"][f"m={m0},steps=1"] for r in rows], [100 * r["gap"] for r in rows],
              color=f"C{i}", label=f"trained with m = {m}")
c.scatter([r["m_sharpness"][f"m={m0},steps=1"] for r in sgd_rows], [100 * r["gap"] for r in sgd_rows],
          color="k", marker="*", s=80, label="SGD")
c.set(xlabel=f"first-order m-sharpness, measured with m = {m0}", ylabel="generalisation gap (points of error)",
      title=f"behind the left point of the middle panel (r = {corr[f'm={m0},steps=1']:+.2f})")
c.legend(loc="best", fontsize=8)
plt.tight_layout()
plt.show()

# what the text below says about this record
assert all(err[(min(st["ms"]), r_)] > err[(max(st["ms"]), r_)] for r_ in sam_rhos)  # small m: higher error
assert max(corr.values()) < 0.3                                                      # no useful predictor
for r in models:                   # section 3's Try this: more ascent steps, a little higher
    for m in st["ms"]:
        ratio = r["m_sharpness"][f"m={m},steps={st['ascent_steps']}"] / r["m_sharpness"][f"m={m},steps=1"]
        assert 1 <= ratio < 1.15, ratio

# %% [markdown]
# What this shows at this scale: **neither of the paper's findings**, as the README's section
# ["The paper's experiments in miniature"](../README.md#the-papers-experiments-in-miniature)
# says of the same record. In the left panel the smallest $m$ trains to a *higher* test error
# than plain SAM at every $\rho$ (asserted above), the opposite of the paper's Fig. 3 middle. In
# the middle panel no $m$-sharpness predicts the gap: every correlation printed above is weak
# (asserted: none reaches 0.3), against the paper's clearly positive ones, highest for small
# $m$. The scatter on the right shows why a correlation near zero is no surprise here: the gaps
# lie in a narrow band of a few points, a few test images apart (the cell above prints the
# range and the size of one image), and the spread of the $m$-sharpness follows how each model
# was trained (the colours) more than its gap.
#
# What it does not show is that the paper is wrong. The miniature differs in ways that may
# explain it: batch norm normalises with batches of $m$ in training *and* in the measurement
# (at $m = 4$, the confound measured in section 3), the gaps are small and close together on a
# small test set, and the models, one small architecture trained for a few epochs on an almost
# solved task, are a much narrower population than the paper's. The measures themselves are
# tested (`tests/test_sharpness.py`: projected ascent finds the known max of a quadratic on the
# ball, and first-order $m$-sharpness is $\rho\|g_B\|$ to first order, Exercise 2's formula).
# To remake the record: `minisam experiment m-sharpness --out DIR` (`--quick` for a
# seconds-long smoke run whose numbers mean nothing).
#
# ## 5. Deep dive (optional): inside the all-reduce
#
# Each replica holds a gradient dict; `comm.allreduce_mean(tree)` must return, on every replica,
# the element-wise mean over replicas. On GPUs minisam's `NcclComm` does it in four moves:
#
# 1. `plan_layout(tree)`: sort the keys (so every rank packs the same way), group the arrays by
#    dtype, and give each array a slot `[offset, offset + size)` in one flat buffer per dtype;
# 2. `flatten(tree, layout, xp)`: copy every array into its slot (one `concatenate`, a single
#    kernel on the GPU);
# 3. one `ncclAllReduce(sum)` over the whole buffer, then divide by $R$;
# 4. `unflatten(buffers, layout)`: the result as a dict of **views** into the reduced buffer, no copy.
#
# One call for the whole model instead of one per array matters because every collective pays a
# fixed latency. The packing is plain array code, so we can run it here on NumPy, on replica 0's
# gradient from section 1:

# %%
layout = plan_layout(g[0])
(bucket,) = layout.buckets
print(f"{len(layout.keys)} arrays -> {len(layout.buckets)} buffer of {bucket.size} {bucket.dtype} "
      f"({layout.nbytes / 2**20:.2f} MiB)")
for slot in bucket.slots[:4]:
    print(f"   [{slot.offset:7d}, {slot.offset + slot.size:7d})  {str(slot.shape):18s} {slot.key}")
print(f"   ... {len(bucket.slots) - 4} more")

(flat,) = flatten(g[0], layout, np)
views = unflatten([flat], layout)
k = "WideResnetGroup_1/WideResnetBlock_0/conv2/kernel"
print(f"\nround trip exact: {all(np.array_equal(views[k], g[0][k]) for k in g[0])}; "
      f"views share the buffer's memory: {np.shares_memory(views[k], flat)}")

big = wide_resnet("wrn28_10", num_outputs=10, in_channels=3).get_params()
big_layout = plan_layout(big)
print(f"WRN-28-10 (the paper's CIFAR model): {len(big)} arrays, {sum(v.size for v in big.values()) / 1e6:.1f} M "
      f"parameters, {big_layout.nbytes / 1e6:.0f} MB of float32 gradient per step")
del big


# %% [markdown]
# ### The ring algorithm
#
# How does a library like NCCL sum a buffer of $S$ bytes across $R$ GPUs? For large buffers, with
# a **ring**: the GPUs are arranged in a cycle, each sends only to its successor, and the buffer
# is cut into $R$ chunks.
#
# * **reduce-scatter**, $R-1$ steps: at step $s$, rank $r$ sends chunk $(r-s) \bmod R$ to rank
#   $r+1$, which adds it to its own copy. After $R-1$ steps rank $r$ holds the complete sum of
#   chunk $(r+1) \bmod R$.
# * **all-gather**, $R-1$ more steps: each rank passes on the complete chunk it received last,
#   until every rank has every complete chunk.
#
# Every rank sends $2(R-1)$ messages of $S/R$ bytes, so with a per-message latency $\alpha$ and a
# link bandwidth $\beta$,
#
# $$
# T_{ring}(R, S) \approx 2(R-1)\,\alpha \;+\; \frac{2(R-1)}{R}\,\frac{S}{\beta}.
# $$
#
# The bandwidth term is almost independent of $R$ (it tends to $2S/\beta$): adding GPUs does
# not make the all-reduce of a big model much slower, which is why data parallelism scales.
# Here is the algorithm in NumPy, with the elements each rank sends counted, against
# `ThreadComm`'s all-reduce (which sums in rank order). (The cost formula is Exercise 3,
# below.)

# %%
def ring_allreduce(buffers):
    """Sum R equal-length vectors as a ring does; returns (every rank's result, elements each rank sent)."""
    R = len(buffers)
    bufs = [b.copy() for b in buffers]
    edges = np.linspace(0, bufs[0].size, R + 1).astype(int)
    chunk = lambda c: slice(edges[c % R], edges[c % R + 1])
    sent = np.zeros(R, dtype=int)
    for s in range(R - 1):                               # reduce-scatter
        msgs = [(r, (r - s) % R, bufs[r][chunk(r - s)].copy()) for r in range(R)]
        for r, c, data in msgs:                          # all sends of a step happen at once
            bufs[(r + 1) % R][chunk(c)] += data
            sent[r] += data.size
    for s in range(R - 1):                               # all-gather
        msgs = [(r, (r + 1 - s) % R, bufs[r][chunk(r + 1 - s)].copy()) for r in range(R)]
        for r, c, data in msgs:
            bufs[(r + 1) % R][chunk(c)] = data
            sent[r] += data.size
    return bufs, sent


n = bucket.size
rng = np.random.default_rng(0)
print(f"buffer of n = {n} float32 elements\n")
print(f"{'R':>3s} {'sent per rank':>14s} {'2(R-1)/R n':>12s} {'ranks agree':>12s} {'max |ring - ThreadComm|':>24s}")
for R_ in (2, 4, 8):
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(R_)]
    ring, sent = ring_allreduce(grads)
    ring_mean = [b / R_ for b in ring]
    thread = run_replicas(R_, lambda r, comm: comm.allreduce_mean({"g": grads[r]})["g"])
    agree = all(np.array_equal(ring_mean[0], x) for x in ring_mean)
    diff = float(np.abs(ring_mean[0] - thread[0]).max())
    print(f"{R_:3d} {sent.max():14d} {2 * (R_ - 1) / R_ * n:12.0f} {str(agree):>12s} {diff:24.1e}")

# %% [markdown]
# ### Exercise 3 (deep dive): what each GPU sends
#
# Write `my_ring_elements_sent(R, n)`: the number of elements each rank sends during a ring
# all-reduce of a buffer of `n` elements over `R` ranks (`R` divides `n`). Count the steps of
# both phases and the size of one message. It is graded against the simulation above, which
# counts what each rank actually sends.

# %% tags=["exercise"]
def my_ring_elements_sent(R, n):
    # YOUR CODE HERE (one line)
    raise NotImplementedError


# %%
def simulated_ring_sent(R, n):
    _, sent = ring_allreduce([np.ones(n, np.float32) for _ in range(R)])
    assert sent.min() == sent.max()                     # R divides n: every rank sends the same
    return float(sent.max())


ring_cases = [(2, 1000), (4, 1000), (5, 100), (8, 4096), (16, 4096)]
check("Exercise 3 (ring all-reduce cost)", my_ring_elements_sent, simulated_ring_sent, ring_cases)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_ring_elements_sent_solution(R, n):
    return 2 * (R - 1) * (n / R)        # 2(R-1) steps, one chunk of n/R elements each


check("Exercise 3, solution", my_ring_elements_sent_solution, simulated_ring_sent, ring_cases)

# %% [markdown]
# Every rank ends with the same bits (each chunk is summed once, on one rank, then copied
# around), and each sends exactly $2(R-1)/R$ of the buffer. The result is not bitwise equal to
# `ThreadComm`'s: the ring adds the $R$ contributions of each chunk in a different order
# (starting from a different rank), and float32 addition is not associative. That is why
# minisam's tests compare NCCL and thread replicas to float32 tolerance, not bit for bit.
#
# With illustrative numbers, **assumptions, not measurements** ($\alpha = 10\,\mu s$ per message;
# $\beta = 100$ GB/s for a fast GPU-to-GPU link and 10 GB/s for a slow one), the formula gives
# for WRN-28-10's gradient, in one buffer or in one call per array:

# %%
S, n_arrays, alpha = big_layout.nbytes, len(big_layout.keys), 10e-6
ring_time = lambda R, S, beta: 2 * (R - 1) * alpha + 2 * (R - 1) / R * S / beta
print(f"{'R':>3s} {'sent per GPU':>13s} {'T, 100 GB/s':>12s} {'T, 10 GB/s':>11s} {'latency, 1 buffer':>18s} "
      f"{'latency, ' + str(n_arrays) + ' calls':>18s}")
for R_ in (2, 4, 8, 16):
    print(f"{R_:3d} {2 * (R_ - 1) / R_ * S / 1e6:10.0f} MB {1e3 * ring_time(R_, S, 100e9):9.1f} ms "
          f"{1e3 * ring_time(R_, S, 10e9):8.1f} ms {1e3 * 2 * (R_ - 1) * alpha:15.2f} ms "
          f"{1e3 * n_arrays * 2 * (R_ - 1) * alpha:15.2f} ms")
    assert 2 * (R_ - 1) / R_ * S / 100e9 > 5 * 2 * (R_ - 1) * alpha    # bandwidth >> latency

# %% [markdown]
# (`benchmarks/allreduce.py` measures the real numbers on GPUs over NCCL, and prints this
# estimate with `--estimate`.) For a gradient of WRN-28-10's size in one buffer, the
# bandwidth term dominates the latency term by far (asserted above, under those assumed
# $\alpha$ and $\beta$); that is why synced SAM's second all-reduce, on the critical path,
# costs real time on GPUs, while per-replica SAM communicates exactly as SGD does.
#
# ## Further reading
#
# * Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
#   Generalization", ICLR 2021: sec. 4.1 defines $m$-sharpness and shows Fig. 3 (middle and
#   right).
# * Andriushchenko & Flammarion, "Towards Understanding Sharpness-Aware Minimization", ICML 2022:
#   a study of $m$-sharpness and of why a small $m$ helps.
#
# ## Recap
#
# * Per-replica SAM (the JAX default) perturbs each shard of $m = B/R$ examples along its own
#   gradient; synced SAM uses one perturbation built from the mean gradient (Exercise 1).
#   minisam reproduces both, replica by replica, to float32 precision against the JAX
#   reference. The paper's CIFAR runs, on 8 GPUs with a batch of 256, had an implicit $m = 32$.
# * Per-replica SAM needs one all-reduce per step, like SGD; synced SAM needs two, the extra one
#   on the critical path. (Deep dive: minisam all-reduces one flat buffer; a ring all-reduce
#   sends $2(R-1)/R$ of the buffer per GPU, almost independent of $R$, Exercise 3.)
# * $m$-sharpness falls steeply with $m$, and to first order it is $\rho\,\mathbb{E}_B\|g_B\|$
#   (Exercise 2); at a trained solution the true rise is somewhat larger (positive curvature
#   along $g_B$). With batch norm, small $m$ also means BN statistics over a few examples,
#   which by itself makes the loss and its gradient on each batch larger: a confound in every
#   $m$-sharpness measurement here.
# * At this scale the choice between per-replica and synced perturbations does not show in test
#   accuracy, and the miniature of the paper's Fig. 3 shows neither of its findings (smaller $m$
#   trains to a higher test error, and no $m$-sharpness predicts the gap); the JSON record and
#   the README say what differs from the paper's setting.
#
# **Next:** [notebook 06](06_label_noise.ipynb) trains with noisy labels, where SAM and SGD do differ.

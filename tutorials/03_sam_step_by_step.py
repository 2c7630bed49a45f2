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
# # 03 · One SAM step, step by step, against the JAX reference
#
# `reference_results/wrn10x2_single.npz` holds one run of the original JAX code
# (google-research/sam, its own `train_step`, model and optimizer): a WideResnet-10-2 with
# 292,954 parameters, a batch of 8 random $32\times32$ images, $\rho = 0.05$, weight decay
# $5\cdot10^{-4}$, gradient clipping at norm 5, Nesterov momentum 0.9 and learning rate 0.1, and
# **every intermediate value** of the first SAM step: the gradient, the perturbation, the SAM
# gradient, the clipped gradient, the new parameters and momentum. Here we redo that step one line
# at a time with minisam and compare each value as we go.
#
# The step (Algorithm 1 of the paper, in the order the JAX code does it):
#
# 1. $g = \nabla L(w)$ on the batch, where $L$ = cross-entropy $+ \tfrac{wd}2\|w\|^2$ over *all*
#    parameters; the BN running statistics of this pass are kept;
# 2. $\hat\epsilon = \rho\, g / \|g\|$ (eq. 2, global norm);
# 3. $g_{SAM} = \nabla L(w + \hat\epsilon)$, weight decay evaluated at $w+\hat\epsilon$ too; this
#    pass's BN statistics are thrown away;
# 4. clip $g_{SAM}$ to global norm 5, then a Nesterov momentum step.
#
# It follows [notebook 01](01_sharpness_intuition.ipynb) (the idea) and, optionally,
# [notebook 02](02_backprop_by_hand.ipynb) (the layers' gradients). Two exercises let you write
# the perturbation and the update yourself, graded against the JAX numbers.
#
# > **Notation: where the weight decay goes.** The paper's eq. 1 writes the SAM objective as
# > $\min_w \max_{\|\epsilon\|\le\rho} L_S(w+\epsilon) + \lambda\|w\|^2$, with the weight decay
# > **outside** the maximised loss. The JAX code (google-research/sam), and minisam by default
# > (`SAMConfig.weight_decay_in="loss"`), put $\tfrac{wd}{2}\|w\|^2$ **inside** the loss that is
# > maximised. So the perturbation direction is that of $\nabla L_S(w) + wd\cdot w$ (step 1 above),
# > and the SAM gradient is taken at $w+\hat\epsilon$ including $wd\,(w+\hat\epsilon)$ (step 3).
# > Compared with eq. 1 this changes the direction of $\hat\epsilon$ a little and adds a term
# > $wd\cdot\hat\epsilon$ to the update; both are small for $wd = 5\cdot10^{-4}$ (the cell after
# > Exercise 1 measures them on this step). The other form, weight decay added by the optimizer
# > at $w$ (torch SGD's `weight_decay`, davda54/sam's choice), is `SAMConfig(weight_decay_in="optimizer")`,
# > `minisam train --weight-decay-in optimizer` (`minisam.semantics` lists who does what).

# %%
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`
sys.path.insert(0, str(ROOT / "tutorials"))
from grading import check           # grades the exercises

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

# %% [markdown]
# ## Load the case
#
# `load_case` returns the arrays (keyed by the JAX code's flax paths) and the manifest, whose
# `config` says how the case was run. The inputs follow a documented recipe
# (`np.random.RandomState(0)` normal images and random labels), and the initial parameters are
# stored, so we do not need JAX's random number generator.

# %%
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

# %%
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

# %% [markdown]
# We measure every comparison the way `minisam verify` does: for an array, the error relative to
# the array's scale, $\max|\text{ours} - \text{jax}| \,/\, \max|\text{jax}|$ (so entries near
# zero do not blow it up), and for a group of arrays (all 23 parameter gradients, say) the worst
# of them. The targets are $10^{-5}$ for values and $10^{-4}$ for gradients: float32 rounding,
# accumulated over a few million additions in a different order than XLA's.

# %%
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


# %% [markdown]
# ## Step 1: the gradient at $w$
#
# `loss_and_grad` is one forward pass in train mode (batch statistics), the loss, and one
# backward pass; weight decay adds $wd\cdot w$ to every gradient.

# %%
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

# %% [markdown]
# ## Step 2: the perturbation $\hat\epsilon = \rho\, g/\|g\|$
#
# One global norm over all 23 arrays, then a scaled copy of $g$: the perturbation has norm exactly
# $\rho$ and points uphill.

# %%
print(inspect.getsource(dual_vector))
direction, g_norm = dual_vector(g)
e = {k: sam_cfg.rho * d for k, d in direction.items()}
print(f"||g|| = {float(g_norm):.7f},  ||e|| = {float(global_norm(e)):.7f} (rho = {sam_cfg.rho})")
compare("perturbation e", e, "sam/perturbation/", show=2)
w_pert = {k: w + e[k] for k, w in w0.items()}
print(f"||w|| = {float(global_norm(w0)):.4f}: the perturbation moves the weights by "
      f"{100 * sam_cfg.rho / float(global_norm(w0)):.2f}% of their norm")

# %% [markdown]
# ### Exercise 1: the perturbation from the trace's gradient
#
# Write `my_perturbation(g, rho)`: given a gradient as a dict of arrays (one per parameter),
# return the dict $\hat\epsilon = \rho\, g/\|g\|$ (eq. 2) with the **global** norm
# $\|g\| = \sqrt{\sum_k \sum g_k^2}$ over all arrays together, not one norm per array. It is
# graded on the JAX trace's own gradient `init/grad/` against the trace's perturbation
# `sam/perturbation/` (float32 tolerances), then on a second, random gradient against
# `minisam.sam.dual_vector`.

# %% tags=["exercise"]
def my_perturbation(g, rho):
    # YOUR CODE HERE (two lines: the global norm, then a dict comprehension)
    raise NotImplementedError


# %%
g_jax = {k: arrays["init/grad/" + k] for k in w0}
e_jax = {k: arrays["sam/perturbation/" + k] for k in w0}
rng = np.random.default_rng(0)
g_random = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w0.items()}


def reference_perturbation(g, rho):
    """The JAX trace's perturbation for its own gradient; minisam's dual_vector otherwise."""
    if g is g_jax and rho == cfg["sam_rho"]:
        return e_jax
    return {k: rho * d for k, d in dual_vector(g)[0].items()}


pert_cases = [(g_jax, cfg["sam_rho"]), (g_random, 0.1)]
check("Exercise 1 (perturbation)", my_perturbation, reference_perturbation, pert_cases,
      rtol=1e-5, atol=1e-6)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_perturbation_solution(g, rho):
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
    return {k: rho * v / norm for k, v in g.items()}


check("Exercise 1, solution", my_perturbation_solution, reference_perturbation, pert_cases,
      rtol=1e-5, atol=1e-6)

# %% [markdown]
# Back to the notation box: how much does it matter here where the weight decay goes? With it
# in the optimizer, the perturbation would follow the cross-entropy's gradient alone,
# $g - wd\cdot w$, and the update would lose the $wd\cdot\hat\epsilon$ term. On this step:

# %%
g_ce = {k: g[k] - sam_cfg.weight_decay * w0[k] for k in w0}          # grad of the cross entropy alone
e_ce = {k: sam_cfg.rho * d for k, d in dual_vector(g_ce)[0].items()}
cos_e = sum(float((e[k] * e_ce[k]).sum()) for k in w0) / (sam_cfg.rho ** 2)
wd_w, wd_e = sam_cfg.weight_decay * float(global_norm(w0)), sam_cfg.weight_decay * sam_cfg.rho
print(f"||wd w|| = {wd_w:.4f} against ||g|| = {float(g_norm):.4f}: the two perturbations are "
      f"{np.degrees(np.arccos(min(cos_e, 1.0))):.2f} degrees apart")
print(f"||wd e|| = {wd_e:.1e}: the extra term of the update, against ||g|| = {float(g_norm):.4f}")
assert wd_w < 0.01 * float(g_norm) and wd_e < 1e-4 * float(g_norm)

# %% [markdown]
# ## Step 3: the SAM gradient at $w + \hat\epsilon$
#
# The same `loss_and_grad`, at the perturbed weights. minisam's model keeps the BN running
# statistics in `model`; the JAX code throws away the ones from this pass, so we remember the
# first pass's.

# %%
loss_p, ce_p, logits_p, g_sam = loss_and_grad(model, w_pert, images, onehot, sam_cfg)
model.set_state(state_after_first_pass)        # drop the perturbed pass's BN statistics
print(f"perturbed loss {float(loss_p):.7f} (JAX {float(arrays['sam/perturbed_loss']):.7f}): "
      f"the loss rose by {float(loss_p - loss):.4f} within the rho-ball")
compare("perturbed logits", logits_p, "sam/perturbed_logits")
compare("perturbed loss", loss_p, "sam/perturbed_loss")
compare("SAM gradient g_sam (as computed)", g_sam, "sam/grad/", show=3)

# %% [markdown]
# Everything up to here agrees to float32 precision (values to about $10^{-6}$, gradients to
# about $10^{-5}$). The SAM gradient is the delicate one: depending on the machine that runs
# this notebook, its line above reads either about $10^{-5}$ or a few times $10^{-2}$. A probe: take the SAM gradient once more at JAX's own
# perturbed weights $w + \hat\epsilon_{JAX}$, which differ from ours only in the last bits (the
# perturbations agreed to $10^{-5}$ relative):

# %%
w_pert_jax = {k: w + arrays["sam/perturbation/" + k] for k, w in w0.items()}
_, _, _, g_sam_at_jax_e = loss_and_grad(model, w_pert_jax, images, onehot, sam_cfg)
model.set_state(state_after_first_pass)
print(f"SAM gradient at our   w + e: max rel err {max(errors(g_sam, 'sam/grad/').values()):.2e}")
print(f"SAM gradient at JAX's w + e: max rel err "
      f"{max(rel_err(v, arrays['sam/grad/' + k]) for k, v in g_sam_at_jax_e.items()):.2e}")


# %% [markdown]
# ### Deep dive (optional): a ReLU tie
#
# (Skip to step 4 below if you like: the rest of the step does not depend on this hunt, only
# on its result, the SAM gradient with the decisive tie on JAX's side.)
#
#
# A gradient is a smooth function of the weights almost everywhere, but not across a ReLU's
# kink. A ReLU passes the gradient where its input is positive and blocks it where it is
# negative. If an input is so close to zero that float32 rounding decides its sign, two correct
# implementations that add the same numbers in a different order (or the same code at two
# points a few ulps apart) can put it on different sides. The forward values then differ by the
# size of that input, $10^{-6}$, invisible in the logits; but one gradient entry flows in one
# computation and not in the other, and everything upstream of it in the backward pass differs.
#
# To find such inputs, record every ReLU's input during the perturbed pass. The ReLUs are
# children like any other layer (a block's are `relu1`/`relu2`), so `model.named_layers()`, which
# walks every layer with its path, finds them all; we wrap each one's `forward` to keep its input,
# at our $w+\hat\epsilon$, at JAX's, and at ours in float64:

# %%
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


# %% [markdown]
# For each of these, compute the SAM gradient twice at our $w + \hat\epsilon$: with that one entry
# forced to **block** the gradient and forced to **pass** it, everything else as computed, and
# compare both with JAX. Forcing a side means overwriting one entry of the ReLU's saved mask
# right after its forward pass:

# %%
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
print(f"\nThe decisive tie: {tie_path}, element {tie_flat}.")
print(f"   float64 value {v64:+.2e}: exact arithmetic {'passes' if v64 > 0 else 'blocks'} it.")
print(f"   JAX {'passed' if jax_passes else 'blocked'} it: that side matches to {min(e_block, e_pass):.1e}, "
      f"the other is off by {max(e_block, e_pass):.1e}.")
print(f"   minisam's float32 value here is {v32:+.2e}, so as computed it {'passes' if v32 > 0 else 'blocks'} it: "
      f"{'the same side as JAX' if (v32 > 0) == jax_passes else 'the other side from JAX'}, on this machine.")
g_sam_jax_side = sam_grad_with(tie_path, tie_flat, jax_passes)
compare("SAM gradient, that tie on JAX's side", g_sam_jax_side, "sam/grad/")
compare("||g_sam||", global_norm(g_sam_jax_side), "sam/grad_norm")
assert tie_path == "WideResnetGroup_2/WideResnetBlock_0/relu1" and v64 < 0 and jax_passes

# %% [markdown]
# One entry decides everything: the input of the first ReLU in the first block of the last group,
# at about $10^{-6}$ from zero. In float64 it is negative, so exact arithmetic blocks its
# gradient; the JAX run's float32 arithmetic put it on the positive side and passed it. With it on
# JAX's side the whole SAM gradient agrees to float32 precision; on the other side a slice of the
# gradient is off by a few percent. The other near-ties make no difference, or JAX agrees with
# our side of them.
#
# Neither code is wrong: this is float32. Whether minisam's *own* float32 value lands on JAX's
# side depends on the order of the additions inside the matrix products: the BLAS library and
# its number of threads, and how the conv backward is organised (which changes $g$, hence
# $\hat\epsilon$, in the last bits; the table shows the value moving between our $w+\hat\epsilon$ and
# JAX's). The last lines above say where it landed on the machine that ran this notebook. And
# the lesson carries beyond testing: a gradient depends discontinuously on the *pattern* of
# active ReLUs, and changing that pattern a little is exactly what a weight perturbation does.
#
# `minisam verify` (and `minisam.reference.verify`) does this search automatically for every step
# of a case: it collects the ReLU inputs within $10^{-6}$ of zero, tries each on the other side of
# the kink, keeps a flip only if it cuts that step's error at least tenfold, and **prints every
# flip it kept**. The case runs three steps, and step 3 may have a tie of its own:

# %%
rows, kept = verify(CASE)
for site, value in kept:
    print("tie flipped:", describe_tie(site, value))
if not kept:
    print("no tie needed flipping on this machine")
print()
print(format_rows([r for r in rows if not r.group.startswith(("step2/", "step3/"))]))
print(f"... and {sum(r.group.startswith(('step2/', 'step3/')) for r in rows)} more rows for steps 2 and 3;"
      f" all pass: {all(r.ok for r in rows)}")

# %% [markdown]
# ## Step 4: clipping by global norm
#
# The JAX code clips the gradient that goes to the optimizer (the SAM gradient, averaged over
# replicas; there is one replica here) to a global norm of 5: unchanged if its norm is below 5,
# else rescaled to norm 5. Here $\|g_{SAM}\|$ is below 5 (the cell prints it), so clipping leaves
# it alone. From
# here on we continue with the SAM gradient that has the decisive tie on JAX's side (the same as
# the one computed above if minisam's rounding landed there too).

# %%
print(inspect.getsource(clip_by_global_norm))
g_clipped, norm_before = clip_by_global_norm(g_sam_jax_side, sam_cfg.gradient_clipping)
print(f"||g_sam|| = {float(norm_before):.7f} < {sam_cfg.gradient_clipping}: unchanged")
assert float(norm_before) < sam_cfg.gradient_clipping
compare("clipped gradient", g_clipped, "sam/grad_clipped/")

# %% [markdown]
# ## Step 5: the Nesterov momentum update
#
# flax's `Momentum(beta=0.9, nesterov=True)`: $m \leftarrow \beta m + g$, then
# $w \leftarrow w - \eta\,(g + \beta m)$, with $m = 0$ at the start. The learning rate of step 1
# is the cosine schedule at step 0, i.e. the base rate 0.1.

# %%
print(inspect.getsource(nesterov_update))
lr = cosine_schedule(cfg["learning_rate"], cfg["num_epochs"], cfg["steps_per_epoch"])(0)
w1, m1 = nesterov_update(w0, g_clipped, nesterov_init(w0), lr, sam_cfg.momentum)
print(f"lr = {lr} (JAX {float(arrays['step1/lr'])})")
compare("params after step 1", w1, "step1/params/", show=2)
compare("momentum after step 1", m1, "step1/momentum/")
compare("BN state after step 1 (first pass)", state_after_first_pass, "step1/state/")

# %% [markdown]
# ### Exercise 2: the update from the trace
#
# Write `my_update(params, momentum, grad, lr, beta, max_norm)`: clip `grad` to global norm
# `max_norm` (unchanged if its norm is below `max_norm`, else rescaled to norm `max_norm`),
# then take the Nesterov step $m \leftarrow \beta m + g$, $w \leftarrow w - \eta\,(g + \beta m)$. Return
# the tuple `(new_params, new_momentum)`, two dicts. The weight decay needs no term of its own:
# in the JAX code it is already inside the SAM gradient (see the notation box).
#
# It is graded on the JAX trace itself: from the initial weights, zero momentum, the trace's
# SAM gradient `sam/grad/`, its `step1/lr`, $\beta = 0.9$ and norm 5, your result must match
# `step1/params/` and `step1/momentum/` (float32 tolerances). Since that gradient is not clipped
# and the momentum starts at zero, two more cases, graded against minisam's `clip_by_global_norm`
# and `nesterov_update`, clip (norm 1) and start from a non-zero momentum.

# %% tags=["exercise"]
def my_update(params, momentum, grad, lr, beta, max_norm):
    # YOUR CODE HERE (about five lines: the global norm, the clipped gradient, then m and w)
    raise NotImplementedError


# %%
g_sam_trace = {k: arrays["sam/grad/" + k] for k in w0}
step1_trace = ({k: arrays["step1/params/" + k] for k in w0}, {k: arrays["step1/momentum/" + k] for k in w0})
m_random = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in w0.items()}
trace_case = (w0, nesterov_init(w0), g_sam_trace, float(arrays["step1/lr"]), 0.9, cfg["gradient_clipping"])


def reference_update(params, momentum, grad, lr, beta, max_norm):
    """The JAX trace's step 1 for its own inputs; minisam's clipping and Nesterov step otherwise."""
    if grad is g_sam_trace and params is w0 and max_norm == cfg["gradient_clipping"]:
        return step1_trace
    return nesterov_update(params, clip_by_global_norm(grad, max_norm)[0], momentum, lr, beta)


update_cases = [trace_case, (w0, m_random, g_sam_trace, 0.1, 0.9, 1.0), (w0, m_random, g_random, 0.05, 0.8, 1e3)]
check("Exercise 2 (update)", my_update, reference_update, update_cases, rtol=1e-5, atol=1e-6)

# %% tags=["solution"] jupyter={"source_hidden": true}
# Solution (collapsed: click to expand). Graded by the same check, so it is tested whenever the notebook runs.
def my_update_solution(params, momentum, grad, lr, beta, max_norm):
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in grad.values()))
    scale = 1.0 if norm < max_norm else max_norm / norm
    new_m = {k: beta * momentum[k] + scale * grad[k] for k in grad}
    new_w = {k: params[k] - lr * (scale * grad[k] + beta * new_m[k]) for k in grad}
    return new_w, new_m


check("Exercise 2, solution", my_update_solution, reference_update, update_cases, rtol=1e-5, atol=1e-6)


# %% [markdown]
# ## The same step in one call: `train_step`
#
# `minisam.sam.train_step` is steps 1 to 5 in a dozen lines (printed at the top). Its `trace`
# argument, a dict, collects the intermediate values. Run it twice from the initial weights:
# as computed, and with the decisive ReLU entry forced to JAX's side on the perturbed pass (that
# ReLU's second call within the step).

# %%
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

# %% [markdown]
# ## How different is the SAM gradient from the plain one?
#
# The SAM gradient is the plain gradient taken $\rho = 0.05$ away, uphill. Per parameter array,
# how do their norms compare, and how aligned are they (cosine similarity)?

# %%
keys = list(model.get_params())       # network order: init_conv, groups, pre-pool-bn, Dense_3
short = [k.replace("WideResnetGroup_", "G").replace("/WideResnetBlock_", ".B").replace("/kernel", ".k")
          .replace("/scale", ".scale").replace("/bias", ".bias") for k in keys]
norm_g = np.array([np.linalg.norm(g[k]) for k in keys])
norm_s = np.array([np.linalg.norm(g_sam_jax_side[k]) for k in keys])
cos = np.array([float((g[k] * g_sam_jax_side[k]).sum()) / (norm_g[i] * norm_s[i]) for i, k in enumerate(keys)])
angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
y = np.arange(len(keys))
a.barh(y - 0.2, norm_g, 0.4, label=r"$\|g\|$ at $w$")
a.barh(y + 0.2, norm_s, 0.4, label=r"$\|g_{SAM}\|$ at $w+\hat\epsilon$")
a.set_xscale("log")
a.set(xlabel="gradient norm per array", ylabel="parameter array (network order)",
      title="per-array gradient norms")
a.set_yticks(y, short, fontsize=8)
a.invert_yaxis()
a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
b.barh(y, angle, color="C2")
b.set(xlabel="angle between $g$ and $g_{SAM}$ (degrees)", ylabel="parameter array (same order)",
      title="how far the SAM gradient turns, per array")
plt.tight_layout()
plt.show()
total_cos = sum(float((g[k] * g_sam_jax_side[k]).sum()) for k in keys) / float(global_norm(g) * global_norm(g_sam_jax_side))
print(f"all parameters together: ||g|| = {float(global_norm(g)):.4f}, ||g_sam|| = {float(global_norm(g_sam_jax_side)):.4f}, "
      f"cos = {total_cos:.4f}, angle {np.degrees(np.arccos(total_cos)):.1f} degrees")
print(f"per array: angles from {angle.min():.1f} to {angle.max():.1f} degrees, "
      f"norm ratios ||g_sam|| / ||g|| from {np.min(norm_s / norm_g):.2f} to {np.max(norm_s / norm_g):.2f}")
head = np.array([k.startswith(("pre-pool-bn", "Dense_3")) for k in keys])
print(f"mean angle: convolutional body {angle[~head].mean():.1f} degrees, head {angle[head].mean():.1f} degrees")
assert angle[head].mean() < angle[~head].mean()

# %% [markdown]
# A step of a fraction of a percent of the weights' norm (step 2 printed it) leaves the
# gradient's size about the same, array by array, but turns its direction, more in the
# convolutional body than in the head (`pre-pool-bn`, `Dense_3`): the last lines print the
# ranges and the mean angles. SAM's update is not a rescaled $g$; it is a
# different direction, the one that also lowers the loss at the worst nearby point.
#
# ## Summary

# %%
print(f"{'quantity':46s} {'max rel err':>12s}")
for what, err in SUMMARY:
    print(f"{what:46s} {err:12.2e}")

# %% [markdown]
# Every value of the JAX code's first SAM step is reproduced to float32 precision, with one
# honest caveat: the SAM gradient agrees only when a single ReLU input, about $10^{-6}$ from zero
# (negative in float64), sits on the side of the kink where JAX's float32 rounding put it, and
# whether minisam's own float32 rounding puts it there depends on the machine. `minisam verify`
# finds such ties and reports every one it flips; `tests/test_reference.py` checks all three reference cases,
# including a two-replica case and label smoothing, on every commit.
#
# ## Recap
#
# * One SAM step is two gradients: $g$ at $w$, then $g_{SAM}$ at $w + \hat\epsilon$ with
#   $\hat\epsilon = \rho\,g/\|g\|$ and one global norm over all arrays (Exercise 1); the update
#   clips $g_{SAM}$ by global norm and takes a Nesterov step from $w$ (Exercise 2).
# * In the JAX code (and minisam's default) the weight decay is inside the maximised loss, not
#   outside as in eq. 1; on this step the difference is tiny, and `--weight-decay-in optimizer`
#   gives the other form.
# * Every intermediate agrees with the JAX code to float32 precision, once a single ReLU input
#   within rounding of zero sits on JAX's side of the kink; `minisam verify` finds and reports
#   such ties.
# * The SAM gradient has about the size of $g$ but a different direction.
#
# **Further reading.** SAM's radius $\rho$ is not invariant to rescaling the weights; ASAM
# (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
# Neural Networks", ICML 2021) scales the perturbation elementwise by $|w|$. GSAM (Zhuang et al.,
# "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022) also descends along the part of
# $g$ orthogonal to $g_{SAM}$, to shrink the gap between the perturbed and the plain loss. minisam
# implements both, `minisam train --adaptive asam` and `--sam-variant gsam`: see the section
# "SAM is not one algorithm" of the [README](../README.md#sam-is-not-one-algorithm).
#
# **Next:** [notebook 04 · SGD vs SAM](04_sgd_vs_sam.ipynb) trains both on real data and compares
# the solutions they find.

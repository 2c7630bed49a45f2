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

# %%
import pathlib, sys

ROOT = pathlib.Path.cwd().resolve()
while not (ROOT / "minisam").is_dir() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))       # `import minisam` without `pip install -e .`

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
# ### A ReLU tie
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
# else rescaled to norm 5. Here $\|g_{SAM}\| \approx 4.24$, so clipping leaves it alone. From
# here on we continue with the SAM gradient that has the decisive tie on JAX's side (the same as
# the one computed above if minisam's rounding landed there too).

# %%
print(inspect.getsource(clip_by_global_norm))
g_clipped, norm_before = clip_by_global_norm(g_sam_jax_side, sam_cfg.gradient_clipping)
print(f"||g_sam|| = {float(norm_before):.7f} < {sam_cfg.gradient_clipping}: unchanged")
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

# %% [markdown]
# A step of 0.15% of the weights' norm leaves the gradient's size about the same, array by
# array, but turns its direction: by 10 to 20 degrees in the convolutional body, by only a few
# degrees in the head (`pre-pool-bn`, `Dense_3`). SAM's update is not a rescaled $g$; it is a
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
# Coming next: 04 compares SGD and SAM on real training runs.

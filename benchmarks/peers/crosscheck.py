"""Cross-check the two peers against each other: same weights in, same numbers out.

Builds the PyTorch WideResNet (``torch_step.py``), copies its weights into the JAX
parameter tree (``jax_step.py``; OIHW -> HWIO, Linear (out, in) -> Dense (in, out)), then
compares on one fixed synthetic batch:

* the parameter counts;
* the logits and the loss (cross-entropy + 0.5 * wd * sum w^2) of a training-mode forward;
* the parameters after one SGD step and after one SAM step, and the BatchNorm running
  means after a SAM step (they must come from the first pass only).

Differences are relative L2 norms over the whole tree, ||a - b|| / ||b||. The check runs in
float64 by default: in float32 a few ReLU inputs within rounding distance of zero flip
sign between two summation orders (channels_last vs NHWC kernels), which moves the
gradients by ~1e-3 in relative L2 norm with both implementations correct (seen here:
a single element of 131,072 at one layer). Use ``--dtype float32`` to see that.

Running variances are not compared: PyTorch's running_var uses the unbiased batch
variance, flax's BatchNorm the biased one (timing is unaffected).

Usage::

    python benchmarks/peers/crosscheck.py --model wrn16_4 --batch-size 8
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_ENABLE_X64", "1")

import common
import jax
import jax.numpy as jnp
import jax_step
import numpy as np
import torch
import torch_step


def torch_to_jax(model):
    """The JAX (params, state) holding the PyTorch model's weights and running stats."""
    def t(a):
        return jnp.asarray(a.detach().cpu().contiguous().numpy())

    def conv(w):
        return t(w.permute(2, 3, 1, 0))

    def bn(m):
        return ({"scale": t(m.weight), "bias": t(m.bias)},
                {"mean": t(m.running_mean), "var": t(m.running_var)})

    params = {"init_conv": conv(model.init_conv.weight), "blocks": []}
    state = {"blocks": []}
    for b in model.blocks:
        p1, s1 = bn(b.init_bn)
        p2, s2 = bn(b.bn_2)
        params["blocks"].append({"init_bn": p1, "bn_2": p2, "conv1": conv(b.conv1.weight),
                                 "conv2": conv(b.conv2.weight)})
        state["blocks"].append({"init_bn": s1, "bn_2": s2})
    params["pre_pool_bn"], state["pre_pool_bn"] = bn(model.pre_pool_bn)
    params["dense"] = {"kernel": t(model.dense.weight.T), "bias": t(model.dense.bias)}
    return params, state


def rel_diff(a, b) -> float:
    """||a - b|| / ||b|| over all the leaves of two pytrees (global L2 norms)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    num = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(la, lb))
    den = sum(float(jnp.sum(jnp.square(y))) for y in lb)
    return (num / den) ** 0.5


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn16_4", choices=sorted(common.MODELS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--tol", type=float, default=None,
                   help="largest relative difference accepted (default 1e-9 in float64, "
                        "5e-2 in float32)")
    args = p.parse_args()
    tdtype = getattr(torch, args.dtype)
    if args.tol is None:
        args.tol = 1e-9 if args.dtype == "float64" else 5e-2

    torch.manual_seed(common.SEED)
    x_np, y_np = common.synthetic_batch(args.batch_size, args.num_classes)
    x_np = x_np.astype(args.dtype)
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2)
    yt = torch.from_numpy(y_np)
    xj, yj = jnp.asarray(x_np), jnp.asarray(y_np.astype(np.int32))

    def build():
        torch.manual_seed(common.SEED)
        return torch_step.build_model(args.model, args.num_classes).to(
            dtype=tdtype, memory_format=torch.channels_last)

    results = {}
    model = build()
    params, state = torch_to_jax(model)
    _, _, layout = jax_step.init(jax.random.PRNGKey(0), args.model, args.num_classes)
    sgd, sam, loss_fn = jax_step.make_steps(layout, args.num_classes)
    results["params (torch, jax)"] = (torch_step.num_params(model), jax_step.num_params(params))

    # training-mode forward (batch statistics) + loss
    trainer = torch_step.Trainer(model)
    with torch.no_grad():
        logits_t = model(xt).numpy()
    logits_j, _ = jax_step.apply(params, state, xj, layout)
    results["logits rel diff"] = rel_diff(jnp.asarray(logits_t), logits_j)
    loss_j = float(loss_fn(params, state, xj, yj)[0])
    loss_t = trainer.full_loss(xt, yt)
    results["loss (torch, jax)"] = (round(loss_t, 6), round(loss_j, 6))

    def update_diff(step_name):
        """Relative difference of the parameter updates (w_after - w_before) of one step
        taken from identical weights, and of the BatchNorm running means after it."""
        model = build()
        params, state = torch_to_jax(model)
        before = jax.tree_util.tree_map(jnp.copy, params)   # `params` is donated below
        mom = jax.tree_util.tree_map(jnp.zeros_like, params)
        trainer = torch_step.Trainer(model)
        getattr(trainer, f"{step_name}_step")(xt, yt)
        p_j, s_j, _, _ = (sam if step_name == "sam" else sgd)(params, state, mom, xj, yj)
        p_t, s_t = torch_to_jax(model)
        delta = lambda p: jax.tree_util.tree_map(jnp.subtract, p, before)
        means = lambda s: [b[k]["mean"] for b in s["blocks"] for k in ("init_bn", "bn_2")]
        return rel_diff(delta(p_t), delta(p_j)), rel_diff(means(s_t), means(s_j))

    results["SGD step: update rel diff"], _ = update_diff("sgd")
    (results["SAM step: update rel diff"],
     results["SAM step: BN running means rel diff"]) = update_diff("sam")

    ok = results["params (torch, jax)"][0] == results["params (torch, jax)"][1]
    for k, v in results.items():
        flag = ""
        if "rel diff" in k:
            flag = "ok" if v < args.tol else "MISMATCH"
            ok = ok and v < args.tol
        print(f"{k:40s} {v}  {flag}")
    print(f"crosscheck ({args.dtype}, tol {args.tol:g})", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

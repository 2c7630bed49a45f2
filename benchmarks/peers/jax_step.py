"""JAX peer for minisam's benchmark: google-research/sam's WideResNet and SAM step, jitted.

Written with plain ``jax.numpy`` / ``jax.lax`` (no Flax, so no Flax version pinning), float32,
NHWC activations and HWIO kernels, mirroring:

* ``sam_jax/models/wide_resnet.py``: ``WideResnet`` -> ``WideResnetGroup`` ->
  ``WideResnetBlock`` and ``_output_add`` (``nn.avg_pool`` with window = stride, then
  ``jnp.pad`` of the extra channels), convolutions as ``flax.nn.Conv(padding='SAME',
  bias=False)`` = ``lax.conv_general_dilated(..., 'SAME')``;
* ``sam_jax/models/utils.py``: ``activation`` = ``flax.nn.BatchNorm`` (batch statistics in
  training, biased variance E[x^2] - E[x]^2, momentum 0.9, eps 1e-5) then ReLU;
  ``conv_kernel_init_fn`` (variance_scaling 2.0 fan_out normal) and ``dense_layer_init_fn``;
* ``sam_jax/training_utils/flax_training.py``: ``train_step``: ``forward_and_loss``
  (``cross_entropy_loss`` + ``0.5 * l2_reg * sum(x ** 2)`` over all parameters),
  ``get_sam_gradient`` with ``dual_vector`` (global-norm normalised gradient, the second
  ``value_and_grad`` at ``model + rho * dual``, the BatchNorm state of the first pass
  kept), then ``flax.optim.Momentum(beta=0.9, nesterov=True)``. Gradient clipping and the
  learning-rate schedule are left out (constant lr 0.1), as in the PyTorch peer.

The whole SGD step and the whole SAM step are each one ``jax.jit`` with the parameters,
BatchNorm state and momentum donated. On GPU the default matmul/conv precision is set to
'highest' (plain float32, no TF32) unless ``--tf32`` is given.

Usage::

    python benchmarks/peers/jax_step.py --model wrn16_4 --batch-size 32 --device cpu \
        --warmup 3 --steps 10 --threads 2 --json out.json
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def _preparse():
    """Settings that must be in place before jax is imported (device, thread count)."""
    argv = sys.argv[1:]
    dev = "cpu"
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            dev = argv[i + 1]
        elif a.startswith("--device="):
            dev = a.split("=", 1)[1]
        elif a == "--threads" and i + 1 < len(argv):
            common.restrict_cpus(int(argv[i + 1]))
        elif a.startswith("--threads="):
            common.restrict_cpus(int(a.split("=", 1)[1]))
    if __name__ == "__main__":
        os.environ.setdefault("JAX_PLATFORMS", "cpu" if dev == "cpu" else "cuda")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_preparse()

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --------------------------------------------------------------------------- model

def block_layout(blocks_per_group: int, channel_multiplier: int):
    """Static description of the blocks: (in_channels, out_channels, stride,
    activate_before_residual) for each ``WideResnetBlock``, group by group."""
    layout, cin = [], 16
    for g, (ch, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
        cout = ch * channel_multiplier
        for i in range(blocks_per_group):
            layout.append((cin, cout, stride if i == 0 else 1, g == 0 and i == 0))
            cin = cout
    return layout


def init(key, model: str, num_classes: int):
    """Parameters and BatchNorm state, initialised like the JAX code."""
    bpg, k = common.MODELS[model]
    layout = block_layout(bpg, k)
    conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    keys = iter(jax.random.split(key, 2 * len(layout) + 2))

    def bn(c):
        return ({"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)},
                {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)})

    params = {"init_conv": conv_init(next(keys), (3, 3, 3, 16), jnp.float32), "blocks": []}
    state = {"blocks": []}
    for cin, cout, _, _ in layout:
        p1, s1 = bn(cin)
        p2, s2 = bn(cout)
        params["blocks"].append({
            "init_bn": p1, "bn_2": p2,
            "conv1": conv_init(next(keys), (3, 3, cin, cout), jnp.float32),
            "conv2": conv_init(next(keys), (3, 3, cout, cout), jnp.float32)})
        state["blocks"].append({"init_bn": s1, "bn_2": s2})
    c = layout[-1][1]
    params["pre_pool_bn"], state["pre_pool_bn"] = bn(c)
    scale = 1.0 / num_classes ** 0.5  # dense_layer_init_fn
    params["dense"] = {
        "kernel": jax.random.uniform(next(keys), (c, num_classes), jnp.float32, -1.0) * scale,
        "bias": jnp.zeros((num_classes,), jnp.float32)}
    return params, state, layout


def conv(x, w, stride: int = 1):
    """``flax.nn.Conv(padding='SAME', bias=False)``, NHWC x HWIO."""
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm_relu(x, p, s):
    """``utils.activation`` in training mode: flax BatchNorm on batch statistics + ReLU.

    Returns the activation and the updated running statistics."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean)
    y = (x - mean) * lax.rsqrt(var + common.BN_EPSILON) * p["scale"] + p["bias"]
    m = common.BN_MOMENTUM
    new_s = {"mean": m * s["mean"] + (1 - m) * mean, "var": m * s["var"] + (1 - m) * var}
    return jax.nn.relu(y), new_s


def output_add(block_x, orig_x):
    """``_output_add``: avg-pool (window = stride) and zero-pad channels when they differ."""
    if block_x.shape[-1] != orig_x.shape[-1]:
        stride = orig_x.shape[-2] // block_x.shape[-2]
        if stride > 1:
            n, h, w, c = orig_x.shape
            orig_x = orig_x.reshape(n, h // stride, stride, w // stride, stride, c).mean((2, 4))
        orig_x = jnp.pad(orig_x, [(0, 0), (0, 0), (0, 0), (0, block_x.shape[-1] - orig_x.shape[-1])])
    return block_x + orig_x


def apply(params, state, x, layout):
    """``WideResnet.apply(train=True)``: logits and the new BatchNorm state."""
    new_state = {"blocks": []}
    x = conv(x, params["init_conv"])
    for (_, _, stride, abr), p, s in zip(layout, params["blocks"], state["blocks"]):
        ns = {}
        if abr:
            x, ns["init_bn"] = batch_norm_relu(x, p["init_bn"], s["init_bn"])
            orig_x = block_x = x
        else:
            orig_x = x
            block_x, ns["init_bn"] = batch_norm_relu(x, p["init_bn"], s["init_bn"])
        block_x = conv(block_x, p["conv1"], stride)
        block_x, ns["bn_2"] = batch_norm_relu(block_x, p["bn_2"], s["bn_2"])
        block_x = conv(block_x, p["conv2"])
        x = output_add(block_x, orig_x)
        new_state["blocks"].append(ns)
    x, new_state["pre_pool_bn"] = batch_norm_relu(x, params["pre_pool_bn"], state["pre_pool_bn"])
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["dense"]["kernel"] + params["dense"]["bias"], new_state


# --------------------------------------------------------------------------- step

def make_steps(layout, num_classes: int):
    """The jitted SGD and SAM steps: (params, state, mom, x, y) -> (params, state, mom, loss)."""

    def forward_and_loss(params, state, x, y):
        logits, new_state = apply(params, state, x, layout)
        one_hot = jax.nn.one_hot(y, num_classes, dtype=logits.dtype)
        loss = -jnp.sum(one_hot * jax.nn.log_softmax(logits)) / x.shape[0]
        weight_l2 = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(params))
        return loss + common.WEIGHT_DECAY * 0.5 * weight_l2, new_state

    grad_fn = jax.value_and_grad(forward_and_loss, has_aux=True)

    def nesterov(params, grad, mom):
        """flax.optim.Momentum(nesterov=True): m = beta m + g; w -= lr (g + beta m)."""
        b, lr = common.MOMENTUM, common.LEARNING_RATE
        mom = jax.tree_util.tree_map(lambda m, g: b * m + g, mom, grad)
        params = jax.tree_util.tree_map(lambda w, g, m: w - lr * (g + b * m), params, grad, mom)
        return params, mom

    def dual_vector(y):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(e)) for e in jax.tree_util.tree_leaves(y)))
        return jax.tree_util.tree_map(lambda e: e / norm, y)

    def sgd_step(params, state, mom, x, y):
        (loss, new_state), grad = grad_fn(params, state, x, y)
        params, mom = nesterov(params, grad, mom)
        return params, new_state, mom, loss

    def sam_step(params, state, mom, x, y):
        (loss, new_state), grad = grad_fn(params, state, x, y)   # BN state: this pass
        grad = dual_vector(grad)
        noised = jax.tree_util.tree_map(lambda a, b: a + common.RHO * b, params, grad)
        _, grad = grad_fn(noised, state, x, y)
        params, mom = nesterov(params, grad, mom)
        return params, new_state, mom, loss

    donate = (0, 1, 2)
    return (jax.jit(sgd_step, donate_argnums=donate), jax.jit(sam_step, donate_argnums=donate),
            jax.jit(forward_and_loss))


def num_params(params) -> int:
    return int(sum(np.prod(w.shape) for w in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------- benchmark

def device_name(dev) -> str:
    if dev.platform == "cpu":
        return common.cpu_name()
    return getattr(dev, "device_kind", str(dev))


def peak_device_mb(dev):
    """peak_bytes_in_use of the device allocator (cumulative), or None where unsupported."""
    try:
        stats = dev.memory_stats()
    except (RuntimeError, NotImplementedError, AttributeError):  # JaxRuntimeError included
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def versions(dev) -> dict:
    import jaxlib
    v = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
         "python": sys.version.split()[0], "backend": dev.platform}
    client = getattr(dev, "client", None)
    if client is not None and hasattr(client, "platform_version"):
        v["platform_version"] = client.platform_version
    return v


class Runner:
    """Holds the (donated, hence re-bound every step) training state."""

    def __init__(self, args, dev):
        self.x, self.y = (jax.device_put(a, dev) for a in common.synthetic_batch(
            args.batch_size, args.num_classes))
        self.y = self.y.astype(jnp.int32)
        params, state, layout = init(jax.random.PRNGKey(common.SEED), args.model, args.num_classes)
        self.layout = layout
        self.params = jax.device_put(params, dev)
        self.state = jax.device_put(state, dev)
        self.mom = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        self.sgd, self.sam, self.loss = make_steps(layout, args.num_classes)

    def step(self, fn):
        self.params, self.state, self.mom, self.last_loss = fn(
            self.params, self.state, self.mom, self.x, self.y)

    def sync(self):
        jax.block_until_ready((self.params, self.state, self.mom))

    def full_loss(self) -> float:
        return float(self.loss(self.params, self.state, self.x, self.y)[0])


def get_device(args):
    try:
        dev = jax.devices()[0]
    except Exception as e:  # e.g. JAX_PLATFORMS=cuda without the CUDA plugin installed
        raise RuntimeError(f"JAX could not start its {os.environ.get('JAX_PLATFORMS')!r} "
                           f"backend ({type(e).__name__}: {e}); for --device gpu install "
                           "jax's CUDA extra") from e
    return dev


def run_row(args) -> dict:
    dev = get_device(args)
    if dev.platform != "cpu" and not args.tf32:
        jax.config.update("jax_default_matmul_precision", "highest")
    if args.device == "gpu" and dev.platform == "cpu":
        raise RuntimeError("--device gpu but JAX found no GPU")

    r = Runner(args, dev)
    n = num_params(r.params)
    sgd = common.time_steps(lambda: r.step(r.sgd), r.sync, args.warmup, args.steps)
    sgd_dev = peak_device_mb(dev)
    sgd_mem = sgd_dev if sgd_dev is not None else common.peak_rss_mb()
    del r

    r = Runner(args, dev)  # SAM starts from the same fresh model
    sam = common.time_steps(lambda: r.step(r.sam), r.sync, args.warmup, args.steps)
    sam_dev = peak_device_mb(dev)
    sam_mem = sam_dev if sam_dev is not None else common.peak_rss_mb()
    return common.make_row(
        "jax-jit", device_name(dev), args, sgd, sam, max(sgd_mem, sam_mem), versions(dev),
        sgd_peak_memory_mb=round(sgd_mem, 1), sam_peak_memory_mb=round(sam_mem, 1),
        memory_kind=("device memory_stats peak_bytes_in_use (cumulative over the process)"
                     if sam_dev is not None else
                     "ru_maxrss of the whole process (cumulative: SAM value includes SGD phase)"),
        num_params=n, final_loss=round(r.full_loss(), 4),
        tf32=bool(args.tf32 and dev.platform != "cpu"), padding="XLA SAME",
        memory_format="NHWC/HWIO", threads=args.threads,
        compile_note="first warm-up step of each kind includes jit compilation")


def check(args) -> int:
    dev = get_device(args)
    r = Runner(args, dev)
    losses = [r.full_loss()]
    for _ in range(args.check_steps):
        r.step(r.sam)
        losses.append(r.full_loss())
    ok = common.print_check("jax-jit", num_params(r.params), losses)
    return 0 if ok else 1


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--tf32", action="store_true",
                       help="on GPU, keep XLA's default (TF32) conv/matmul precision")
        p.add_argument("--count-params", action="store_true",
                       help="print the parameter count and exit")

    args = common.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.count_params:
        shapes = jax.eval_shape(lambda k: init(k, args.model, args.num_classes)[0],
                                jax.random.PRNGKey(0))
        print(num_params(shapes))
        return 0
    if args.check_steps:
        return check(args)
    try:
        row = run_row(args)
    except Exception as e:  # record the failure instead of a number
        row = common.make_row("jax-jit", "", args, None, None, None,
                              {"jax": jax.__version__}, error=f"{type(e).__name__}: {e}")
        common.emit([row], args.json)
        raise
    common.emit([row], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

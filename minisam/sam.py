"""Sharpness-Aware Minimization: Algorithm 1 of Foret et al. (ICLR 2021), as the JAX code does it.

Read ``sam_gradient`` and ``descent`` top to bottom (``train_step`` is the two); they mirror
sam_jax ``flax_training.train_step`` and ``get_sam_gradient``:

1. g = grad L(w) on this replica's batch (BN running stats from this pass are kept);
2. the dual vector e = rho * g / ||g||  (eq. 2; g averaged over replicas first when
   perturbations are synced, otherwise each replica perturbs with its own g: m-sharpness);
3. g_sam = grad L(w + e)  (the perturbed pass; its BN stats are thrown away);
4. g_sam averaged over replicas, clipped by global norm, then a Nesterov momentum step.

L is the cross entropy (label smoothing optional) plus ``0.5 * wd * ||w||^2`` over *all*
parameters; at w + e the L2 term is evaluated at w + e too. ``rho = 0`` is plain SGD.

Those are the JAX code's choices, and ``SAMConfig()``'s defaults. Other implementations
choose differently; each choice is a switch on ``SAMConfig`` (``minisam.semantics`` says
who does what, and holds one preset per implementation): where weight decay lives, an
epsilon on the norm, whether the perturbed pass updates BN's running statistics, ASAM's
adaptive scaling in its two conventions, how w is restored, Nesterov or heavy-ball.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .backend import get_xp
from .distributed import group_mean
from .distributed.local import LocalComm
from .nn.loss import error_rate, one_hot, softmax_cross_entropy
from .optim import clip_by_global_norm, momentum_update
from .tree import global_norm, like_tree, sum_of_squares, tree_map


WEIGHT_DECAY_IN = ("loss", "optimizer")
PERTURBED_BN_STATS = ("discard", "update")
ADAPTIVE = ("none", "davda54", "asam")
RESTORE = ("copy", "subtract")


@dataclass(frozen=True)
class SAMConfig:
    rho: float = 0.05                 # radius of the perturbation; 0 gives SGD
    weight_decay: float = 5e-4        # L2 coefficient
    label_smoothing: float = 0.0
    gradient_clipping: float = 5.0    # max global norm; 0 disables
    sync_perturbations: bool = False  # average g over replicas before the dual vector
    inner_group_size: int = 0         # ... over groups of this many replicas (0: all; JAX's
                                      # --inner_group_size)
    momentum: float = 0.9             # beta of the momentum buffer
    # -- the choices implementations disagree on (minisam.semantics); defaults: the JAX code
    weight_decay_in: str = "loss"     # "loss": in L at w and w + e; "optimizer": wd * w added
                                      # to the SAM gradient at w, after clipping (torch SGD)
    norm_eps: float = 0.0             # e = rho g / (||g|| + norm_eps)
    perturbed_bn_stats: str = "discard"  # or "update": the perturbed pass's BN stats kept
    adaptive: str = "none"            # ASAM's scaling: "none", "davda54" or "asam" (official)
    asam_eta: float = 0.01            # "asam" only: T_w = |w| + eta on kernels and scales
    restore: str = "copy"             # w after the ascent: "copy" (exact) or "subtract" (w+e-e)
    nesterov: bool = True             # False: heavy-ball momentum (torch SGD's default)
    clip_before_sync: bool = False    # clip each replica's gradient, then average (JAX: after)

    def __post_init__(self):
        def number(name):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"{name} must be a number, got {v!r}")
            return v
        for name in ("rho", "weight_decay", "gradient_clipping", "norm_eps", "asam_eta"):
            if not (math.isfinite(number(name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        for name in ("label_smoothing", "momentum"):
            if not 0 <= number(name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("sync_perturbations", "nesterov", "clip_before_sync"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.inner_group_size, bool) or not isinstance(self.inner_group_size, int) \
                or self.inner_group_size < 0:
            raise ValueError(f"inner_group_size must be an integer >= 0 (0: all replicas), got "
                             f"{self.inner_group_size!r}")
        for name, choices in (("weight_decay_in", WEIGHT_DECAY_IN), ("adaptive", ADAPTIVE),
                              ("perturbed_bn_stats", PERTURBED_BN_STATS), ("restore", RESTORE)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")


def loss_and_grad(model, params, images, onehot, cfg: SAMConfig):
    """sam_jax ``forward_and_loss`` under ``value_and_grad``: one forward, one backward.

    Returns (loss, cross_entropy, logits, grads); BN running stats are updated in ``model``."""
    model.set_params(params)
    logits = model.forward(images, train=True)
    ce, dlogits = softmax_cross_entropy(logits, onehot, cfg.label_smoothing)
    model.backward(dlogits, input_grad=False)   # no gradient for the images, as in JAX
    grads = like_tree(model.get_grads(), params)  # one buffer, as params are (tree.FlatTree)
    if cfg.weight_decay_in != "loss":        # weight decay is the optimizer's (see SAMConfig)
        return ce, ce, logits, grads
    loss = ce + cfg.weight_decay * 0.5 * sum_of_squares(params)
    grads = tree_map(lambda g, w: g + cfg.weight_decay * w, grads, params)
    return loss, ce, logits, grads


def dual_vector(g: dict, eps: float = 0.0):
    """sam_jax ``dual_vector``: g / ||g||_2 with the global norm (eq. 2 with q = 2), no epsilon
    (``eps``: davda54's ``g / (||g|| + 1e-12)``).

    Returns (direction, ||g||)."""
    norm = global_norm(g)
    scale = norm + eps if eps else norm
    return tree_map(lambda v: v / scale, g), norm


def adaptive_scale(params: dict, cfg: SAMConfig) -> dict:
    """ASAM's normalisation operator T_w (Kwon et al., ICML 2021), elementwise, per key:
    ``"davda54"``: |w| on every parameter, no eta (davda54/sam ``adaptive=True``);
    ``"asam"``: |w| + eta on the parameters PyTorch names ``weight`` (conv and dense
    kernels, BN scales), 1 (no scaling) on biases (SamsungLabs/ASAM ``ASAM.ascent_step``).
    Packed like ``params`` (one buffer if they are a FlatTree)."""
    if cfg.adaptive == "davda54":
        return tree_map(abs, params)
    return like_tree({k: abs(w) + cfg.asam_eta if not k.endswith("/bias") else get_xp(w).ones_like(w)
                      for k, w in params.items()}, params)


def perturbation(g: dict, params: dict, cfg: SAMConfig):
    """The ascent step e and the norm it divides by. SAM: e = rho g / ||g|| (eq. 2).
    ASAM: e = rho T^2 g / ||T g||, T = ``adaptive_scale``, so ASAM with T = 1 is SAM.

    Returns (e, the norm before any epsilon)."""
    if cfg.adaptive == "none":
        direction, norm = dual_vector(g, cfg.norm_eps)
        return tree_map(lambda d: cfg.rho * d, direction), norm
    t = adaptive_scale(params, cfg)
    unit, norm = dual_vector(tree_map(lambda tk, v: tk * v, t, g), cfg.norm_eps)
    return tree_map(lambda tk, u: cfg.rho * (tk * u), t, unit), norm


def sam_gradient(model, params, state, images, labels, cfg: SAMConfig, comm=LocalComm(),
                 trace=None):
    """Steps 1-3 of ``train_step``: the gradient at w + e on this replica's batch.

    Returns (SAM gradient, BN state to keep, w for the update, cross entropy and logits of
    the last pass); with rho = 0, the plain gradient. ``trace`` as in ``train_step``."""
    onehot = one_hot(labels, model.config["num_outputs"])
    model.set_state(state)
    loss, ce, logits, grad = loss_and_grad(model, params, images, onehot, cfg)    # 1. g at w
    new_state = model.get_state()
    if trace is not None:
        trace.update(loss=loss, cross_entropy=ce, logits=logits, grad=grad, state=new_state)
    if cfg.rho > 0:
        g = group_mean(comm, grad, cfg.inner_group_size) if cfg.sync_perturbations else grad
        e, g_norm = perturbation(g, params, cfg)                                  # 2. e
        perturbed = tree_map(lambda w, ek: w + ek, params, e)
        loss_p, ce, logits, grad = loss_and_grad(model, perturbed, images, onehot, cfg)  # 3.
        if cfg.perturbed_bn_stats == "update":
            new_state = model.get_state()             # keep the perturbed pass's BN stats
        model.set_state(new_state)                    # JAX: drop them
        if cfg.restore == "subtract":                 # w + e - e, in float32
            params = tree_map(lambda w, ek: w - ek, perturbed, e)
        if trace is not None:
            trace.update(grad_for_perturbation_norm=g_norm, perturbation=e,
                         perturbed_loss=loss_p, perturbed_cross_entropy=ce,
                         perturbed_logits=logits, sam_grad=grad)
    return grad, new_state, params, ce, logits


def descent(params, momentum, grad, lr, cfg: SAMConfig, comm=LocalComm(), trace=None):
    """Step 4 of ``train_step``: average over replicas, clip, then the momentum step
    (``clip_before_sync``: clip each replica's gradient first, then average).

    Returns (params, momentum, the gradient the optimizer used)."""
    if cfg.clip_before_sync:
        grad, _ = clip_by_global_norm(grad, cfg.gradient_clipping)
    grad = comm.allreduce_mean(grad)
    if trace is not None:
        trace.update(grad_synced=grad)
    if not cfg.clip_before_sync:
        grad, _ = clip_by_global_norm(grad, cfg.gradient_clipping)
    if trace is not None:
        trace.update(grad_clipped=grad)
    if cfg.weight_decay_in == "optimizer":
        grad = tree_map(lambda g, w: g + cfg.weight_decay * w, grad, params)
    params, momentum = momentum_update(params, grad, momentum, lr, cfg.momentum, cfg.nesterov)
    return params, momentum, grad


def train_step(model, params, state, momentum, images, labels, lr, cfg: SAMConfig,
               comm=LocalComm(), trace=None):
    """One SAM (or, with rho = 0, SGD) step on this replica's slice of the batch.

    Returns (params, state, momentum, metrics). ``trace``, if a dict, receives the
    intermediate values (named like reference_results' keys) for verification."""
    grad, state, params, ce, logits = sam_gradient(model, params, state, images, labels, cfg,
                                                   comm, trace)                   # 1.-3.
    params, momentum, grad = descent(params, momentum, grad, lr, cfg, comm, trace)  # 4.
    return params, state, momentum, step_metrics(ce, logits, labels, grad, params)


def step_metrics(ce, logits, labels, grad, params) -> dict:
    """What every step reports (sam_jax ``train_step``'s metrics), all on the device."""
    return {"train_loss": ce, "train_error_rate": error_rate(logits, labels),
            "gradient_norm": global_norm(grad), "param_norm": global_norm(params)}


def eval_step(model, params, state, images, labels, label_smoothing=0.0):
    """sam_jax ``eval_step``: eval-mode logits (running BN stats), loss and error rate."""
    model.set_params(params)
    model.set_state(state)
    logits = model.forward(images, train=False)
    onehot = one_hot(labels, model.config["num_outputs"])
    loss, _ = softmax_cross_entropy(logits, onehot, label_smoothing)
    return logits, {"loss": loss, "error_rate": error_rate(logits, labels)}

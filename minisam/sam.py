"""Sharpness-Aware Minimization: Algorithm 1 of Foret et al. (ICLR 2021), as the JAX code does it.

Read ``train_step`` top to bottom; it mirrors sam_jax ``flax_training.train_step`` and
``get_sam_gradient``:

1. g = grad L(w) on this replica's batch (BN running stats from this pass are kept);
2. the dual vector e = rho * g / ||g||  (eq. 2; g averaged over replicas first when
   perturbations are synced, otherwise each replica perturbs with its own g: m-sharpness);
3. g_sam = grad L(w + e)  (the perturbed pass; its BN stats are thrown away);
4. g_sam averaged over replicas, clipped by global norm, then a Nesterov momentum step.

L is the cross entropy (label smoothing optional) plus ``0.5 * wd * ||w||^2`` over *all*
parameters; at w + e the L2 term is evaluated at w + e too. ``rho = 0`` is plain SGD.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .distributed.local import LocalComm
from .nn.loss import error_rate, one_hot, softmax_cross_entropy
from .optim import clip_by_global_norm, nesterov_update
from .tree import global_norm


@dataclass(frozen=True)
class SAMConfig:
    rho: float = 0.05                 # radius of the perturbation; 0 gives SGD
    weight_decay: float = 5e-4        # L2 coefficient in the loss
    label_smoothing: float = 0.0
    gradient_clipping: float = 5.0    # max global norm; 0 disables
    sync_perturbations: bool = False  # average g over replicas before the dual vector
    momentum: float = 0.9             # Nesterov beta

    def __post_init__(self):
        def number(name):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"{name} must be a number, got {v!r}")
            return v
        for name in ("rho", "weight_decay", "gradient_clipping"):
            if not (math.isfinite(number(name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)!r}")
        for name in ("label_smoothing", "momentum"):
            if not 0 <= number(name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.sync_perturbations, bool):
            raise TypeError(f"sync_perturbations must be True or False, got "
                            f"{self.sync_perturbations!r}")


def loss_and_grad(model, params, images, onehot, cfg: SAMConfig):
    """sam_jax ``forward_and_loss`` under ``value_and_grad``: one forward, one backward.

    Returns (loss, cross_entropy, logits, grads); BN running stats are updated in ``model``."""
    model.set_params(params)
    logits = model.forward(images, train=True)
    ce, dlogits = softmax_cross_entropy(logits, onehot, cfg.label_smoothing)
    weight_l2 = sum((w * w).sum() for w in params.values())
    loss = ce + cfg.weight_decay * 0.5 * weight_l2
    model.backward(dlogits)
    grads = {k: g + cfg.weight_decay * params[k] for k, g in model.get_grads().items()}
    return loss, ce, logits, grads


def dual_vector(g: dict):
    """sam_jax ``dual_vector``: g / ||g||_2 with the global norm (eq. 2 with q = 2), no epsilon.

    Returns (unit direction, ||g||)."""
    norm = global_norm(g)
    return {k: v / norm for k, v in g.items()}, norm


def train_step(model, params, state, momentum, images, labels, lr, cfg: SAMConfig,
               comm=LocalComm(), trace=None):
    """One SAM (or, with rho = 0, SGD) step on this replica's slice of the batch.

    Returns (params, state, momentum, metrics). ``trace``, if a dict, receives the
    intermediate values (named like reference_results' keys) for verification."""
    onehot = one_hot(labels, model.config["num_outputs"])
    model.set_state(state)
    loss, ce, logits, grad = loss_and_grad(model, params, images, onehot, cfg)    # 1. g at w
    new_state = model.get_state()
    if trace is not None:
        trace.update(loss=loss, cross_entropy=ce, logits=logits, grad=grad, state=new_state)
    if cfg.rho > 0:
        g = comm.allreduce_mean(grad) if cfg.sync_perturbations else grad
        direction, g_norm = dual_vector(g)                                        # 2. e
        e = {k: cfg.rho * d for k, d in direction.items()}
        perturbed = {k: w + e[k] for k, w in params.items()}
        loss_p, ce, logits, grad = loss_and_grad(model, perturbed, images, onehot, cfg)  # 3.
        model.set_state(new_state)                    # drop the perturbed pass's BN stats
        if trace is not None:
            trace.update(grad_for_perturbation_norm=g_norm, perturbation=e,
                         perturbed_loss=loss_p, perturbed_cross_entropy=ce,
                         perturbed_logits=logits, sam_grad=grad)
    grad = comm.allreduce_mean(grad)                                              # 4.
    if trace is not None:
        trace.update(grad_synced=grad)
    grad, _ = clip_by_global_norm(grad, cfg.gradient_clipping)
    params, momentum = nesterov_update(params, grad, momentum, lr, cfg.momentum)
    metrics = {"train_loss": ce, "train_error_rate": error_rate(logits, labels),
               "gradient_norm": global_norm(grad), "param_norm": global_norm(params)}
    if trace is not None:
        trace.update(grad_clipped=grad)
    return params, new_state, momentum, metrics


def eval_step(model, params, state, images, labels, label_smoothing=0.0):
    """sam_jax ``eval_step``: eval-mode logits (running BN stats), loss and error rate."""
    model.set_params(params)
    model.set_state(state)
    logits = model.forward(images, train=False)
    onehot = one_hot(labels, model.config["num_outputs"])
    loss, _ = softmax_cross_entropy(logits, onehot, label_smoothing)
    return logits, {"loss": loss, "error_rate": error_rate(logits, labels)}

"""Softmax cross-entropy with label smoothing, and the error rate.

Mirrors sam_jax ``flax_training.cross_entropy_loss``: smoothed targets
``y' = (1 - ls) * y + ls / K``, ``loss = -sum(y' * log_softmax(logits)) / B``. Because
each row of y' sums to one, ``dloss/dlogits = (softmax(logits) - y') / B``.
"""
from __future__ import annotations

from ..backend import get_xp


def one_hot(labels, num_classes, dtype="float32"):
    xp = get_xp(labels)
    return (labels[:, None] == xp.arange(num_classes)[None, :]).astype(dtype)


def log_softmax(logits):
    """``jax.nn.log_softmax``: shift by the row max, subtract log-sum-exp."""
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits, onehot, label_smoothing=0.0):
    """Return (loss, dloss/dlogits) for a batch of logits [B, K] and one-hot targets [B, K]."""
    if logits.ndim != 2 or onehot.shape != logits.shape:
        raise ValueError(f"expected logits [B, K] and one-hot labels of the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(onehot.shape)}")
    xp = get_xp(logits)
    b, k = logits.shape
    if label_smoothing > 0:
        onehot = (1 - label_smoothing) * onehot + label_smoothing / k
    logp = log_softmax(logits)
    loss = -(onehot * logp).sum() / b
    dlogits = (xp.exp(logp) - onehot) / b
    return loss, dlogits.astype(logits.dtype, copy=False)


def error_rate(logits, labels):
    """Fraction of the batch whose arg-max class is not the label (sam_jax compute_metrics)."""
    return (logits.argmax(axis=1) != labels).mean()

"""SAM is not one algorithm: what each implementation chooses, as ``SAMConfig`` switches.

Every implementation below computes "the gradient at w + rho g/||g||, then an SGD step",
and they still disagree on details that change the numbers (and, with BN and weight
decay, the results). Each row is a field of ``sam.SAMConfig``; each preset is one
implementation's choices, read in its source:

===================  ======================  ======================  =====================
switch               google-research/sam     davda54/sam             SamsungLabs/ASAM
                     (``sam_jax``: default)  (``davda54``)           (``asam_official``)
===================  ======================  ======================  =====================
weight_decay_in      "loss": 0.5 wd ||w||^2   "optimizer": torch SGD   "optimizer" (its
                     in the loss, so in g,    adds wd*w at the         example's torch SGD)
                     and at w + e in pass 2   restored w, pass 2 only
norm_eps             0 (``dual_vector``)      1e-12 on the norm        1e-16 on the norm
perturbed_bn_stats   "discard": pass 1's      "update": both passes    "update" (no bypass)
                     state is kept            update (README usage);
                                              its example bypasses BN
                                              (``davda54_bypass``)
adaptive             "none"                   "davda54" when           "asam": |w| + eta on
                                              ``adaptive=True``: |w|   weights (kernels, BN
                                              on every tensor, no eta  scales), 1 on biases
gradient_clipping    5.0 (flag default)       none                     none
restore              "copy" (w is never       "copy" (``p.data =       "subtract" (``p.sub_
                     overwritten)             old_p``)                 (eps)``)
nesterov             True (flax Momentum)     False in its example     False in its example
                                              (torch SGD default)
===================  ======================  ======================  =====================

juntang-zhuang/GSAM's ``GSAM`` class (``gsam_official``) makes davda54's choices except two:
it always discards the perturbed pass's BN statistics (``disable_running_stats`` inside
``step``) and restores w by subtraction (``unperturb``). No implementation above clips
before the all-reduce (``clip_before_sync``), but a per-replica clip is a common
hand-written variant, so it is a switch too.

Sources: google-research/sam ``sam_jax/training_utils/flax_training.py`` (``train_step``,
``get_sam_gradient``, ``dual_vector``, ``clip_by_global_norm``); davda54/sam ``sam.py``
(``first_step``, ``second_step``, ``_grad_norm``) and ``example/train.py`` with
``example/utility/bypass_bn.py``; SamsungLabs/ASAM ``asam.py`` (``ASAM.ascent_step``,
``descent_step``) and ``example_cifar.py``; juntang-zhuang/GSAM ``gsam/gsam.py``. optax's ``optax.contrib.sam`` leaves most of
these to the caller (README: "SAM is not one algorithm").

The base optimizer's other settings (lr, momentum 0.9, the schedule) and the loss's label
smoothing are run settings, not semantics: presets here set only the rows above.
"""
from __future__ import annotations

SWITCHES = ("weight_decay_in", "norm_eps", "perturbed_bn_stats", "adaptive", "asam_eta",
            "gradient_clipping", "clip_before_sync", "restore", "nesterov")

_JAX = dict(weight_decay_in="loss", norm_eps=0.0, perturbed_bn_stats="discard",
            adaptive="none", asam_eta=0.01, gradient_clipping=5.0, clip_before_sync=False,
            restore="copy", nesterov=True)
_DAVDA54 = dict(_JAX, weight_decay_in="optimizer", norm_eps=1e-12,
                perturbed_bn_stats="update", gradient_clipping=0.0, nesterov=False)

SEMANTICS: dict[str, dict] = {
    "sam_jax": _JAX,
    "davda54": _DAVDA54,
    "davda54_bypass": dict(_DAVDA54, perturbed_bn_stats="discard"),
    "davda54_asam": dict(_DAVDA54, perturbed_bn_stats="discard", adaptive="davda54"),
    "asam_official": dict(_DAVDA54, norm_eps=1e-16, adaptive="asam", asam_eta=0.01,
                          restore="subtract"),
    "gsam_official": dict(_DAVDA54, perturbed_bn_stats="discard", restore="subtract"),
}
DESCRIPTIONS = {
    "sam_jax": "google-research/sam (the default): weight decay in the loss, no epsilon, "
               "perturbed pass's BN stats discarded, clipping at 5, Nesterov",
    "davda54": "davda54/sam's SAM class as its README uses it: torch SGD weight decay, norm "
               "+ 1e-12, BN stats updated by both passes, no clipping, heavy-ball momentum",
    "davda54_bypass": "davda54/sam as its example/train.py runs it: like davda54, with the "
                      "BN bypass (perturbed pass's stats discarded)",
    "davda54_asam": "davda54/sam's adaptive=True as its example runs it: |w| on every "
                    "parameter, no eta, BN bypass",
    "asam_official": "SamsungLabs/ASAM: |w| + eta on weights only (eta 0.01, the class "
                     "default; its example passes --eta, default 0), norm + 1e-16, w restored "
                     "by subtraction, torch SGD weight decay, heavy-ball",
    "gsam_official": "juntang-zhuang/GSAM's GSAM class (use with --sam-variant gsam): torch SGD "
                     "weight decay, norm + 1e-12 (also in its cosine), perturbed pass's BN "
                     "stats discarded, w restored by subtraction, heavy-ball in its example",
}


def semantics(name: str) -> dict:
    """The switch values of an implementation (a copy); ValueError naming the known ones."""
    if name not in SEMANTICS:
        raise ValueError(f"unknown SAM semantics {name!r}; expected one of {sorted(SEMANTICS)}")
    return dict(SEMANTICS[name])

"""``TrainConfig``: everything that determines a training run, validated once.

Saved in every run directory's config.json and in every checkpoint; ``minisam train``'s
flags are its fields (the CLI reads the field list, defaults and choices from here).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .backend import DEVICES
from .data import DATASETS, SOURCES, Augment, default_augment
from .models import parse_wrn_name
from .sam import SAMConfig

SCHEDULES = ("cosine", "constant", "gsam-official")
SMALL_DATASET_MODEL = "wrn10_2"   # the CLI's model for digits and synthetic
SAM_FIELDS = tuple(f.name for f in dataclasses.fields(SAMConfig))
_SAM = SAMConfig()   # the SAM fields' defaults live in SAMConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run.

    Defaults follow the JAX code's flags where it has them (lr 0.1, clipping 5.0, momentum
    0.9, cosine schedule, basic augmentation) and the paper's WRN settings otherwise
    (weight decay 5e-4; the JAX flag default is 1e-3). The SAM fields (rho, weight_decay,
    label_smoothing, gradient_clipping, momentum, sync_perturbations and the semantics
    switches) are those of ``SAMConfig``, with its defaults, and are validated by building it.
    """
    dataset: str = "cifar10"
    data_dir: str | None = None
    data_source: str = "auto"          # CIFAR: "auto", "archive" or "tfds"
    image_size: int | None = None      # digits only (default 16)
    validation: bool = False           # evaluate on the last 10% of train instead of test
    model: str = "wrn28_10"
    batch_norm: bool = True            # False: the BN-free WideResnet (identity for each BN)
    epochs: int = 200
    batch_size: int = 128              # global batch, split evenly over replicas
    lr: float = 0.1
    schedule: str = "cosine"           # or "constant", "gsam-official" (GSAM's example)
    weight_decay: float = 5e-4
    rho: float = 0.05                  # 0 = SGD
    label_smoothing: float = 0.0
    gradient_clipping: float = 5.0     # 0 disables
    momentum: float = 0.9
    sync_perturbations: bool = False
    inner_group_size: int = _SAM.inner_group_size   # sync within groups of replicas; 0: all
    # the SAM semantics switches (sam.SAMConfig, minisam.semantics), SAMConfig's defaults
    weight_decay_in: str = _SAM.weight_decay_in
    norm_eps: float = _SAM.norm_eps
    perturbed_bn_stats: str = _SAM.perturbed_bn_stats
    adaptive: str = _SAM.adaptive
    asam_eta: float = _SAM.asam_eta
    restore: str = _SAM.restore
    nesterov: bool = _SAM.nesterov
    clip_before_sync: bool = _SAM.clip_before_sync
    # SAM's variants (minisam.variants)
    sam_variant: str = "sam"           # or "gsam", "looksam"
    gsam_alpha: float = 0.4            # GSAM's alpha (juntang-zhuang/GSAM example default)
    rho_min: float | None = None       # GSAM: rho follows lr down to rho_min; None: constant
    looksam_k: int = 5                 # LookSAM: a full SAM step every k steps (LookSAM-5)
    looksam_alpha: float = 0.7         # LookSAM: weight of the reused orthogonal part
    micro_batch: int = 0               # m-SAM: micro-batches of this size per replica; 0 = off
    crop: int | None = None            # reflect padding before the crop; None: dataset default
    flip: bool | None = None           # None: dataset default
    cutout: int = 0                    # side of the cutout square (JAX: 16); 0 = off
    label_noise: float = 0.0           # symmetric noise on the training labels
    seed: int = 0
    replicas: int = 1
    device: str = "cpu"
    tf32: bool = False                 # GPU: float32 GEMMs on TF32 tensor cores (backend.set_tf32)
    eval_batch_size: int | None = None  # None: batch_size

    def __post_init__(self):
        def bad(name, what):
            raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def integer(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        for name, choices in (("dataset", DATASETS), ("data_source", SOURCES),
                              ("schedule", SCHEDULES), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}; "
                                 f"expected one of {choices}")
        if not isinstance(self.model, str):
            bad("model", "a model name such as 'wrn28_10'")
        parse_wrn_name(self.model)  # ValueError with the accepted names
        self.sam_config()           # rho, weight decay, smoothing, clipping, momentum, sync
        for name in ("epochs", "batch_size", "replicas"):
            if not integer(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        if self.eval_batch_size is not None and (not integer(self.eval_batch_size)
                                                 or self.eval_batch_size < 1):
            bad("eval_batch_size", "a positive integer or None")
        if self.batch_size % self.replicas:
            raise ValueError(f"batch size {self.batch_size} is not divisible by replicas="
                             f"{self.replicas}; each replica takes batch_size / replicas "
                             "examples, so pick a multiple of the replica count")
        if not (_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "a positive finite number")
        if not (_real(self.label_noise) and 0 <= self.label_noise <= 1):
            bad("label_noise", "in [0, 1]")
        if not integer(self.cutout) or self.cutout < 0:
            bad("cutout", "a non-negative integer")
        for name in ("crop", "image_size"):
            v = getattr(self, name)
            if v is not None and (not integer(v) or v < 0):
                bad(name, "a non-negative integer or None")
        if self.tf32 is not False and (self.tf32 is not True or self.device != "gpu"):
            raise ValueError(f"tf32 must be True or False and needs device 'gpu' (NumPy has no "
                             f"TF32), got tf32={self.tf32!r} with device {self.device!r}")
        for name in ("validation", "flip", "batch_norm"):
            v = getattr(self, name)
            if not (isinstance(v, bool) or (name == "flip" and v is None)):
                bad(name, "True or False" + (" or None" if name == "flip" else ""))
        if not integer(self.seed) or not 0 <= self.seed < 2 ** 32:
            bad("seed", "an integer in [0, 2**32)")
        self._check_variant()

    def _check_variant(self):
        from .variants import VARIANTS
        if self.sam_variant not in VARIANTS:
            raise ValueError(f"unknown sam variant {self.sam_variant!r}; expected one of "
                             f"{VARIANTS}")
        for name in ("gsam_alpha", "looksam_alpha"):
            v = getattr(self, name)
            if not (_real(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {v!r}")
        if isinstance(self.looksam_k, bool) or not isinstance(self.looksam_k, int) \
                or self.looksam_k < 1:
            raise ValueError(f"looksam_k must be a positive integer, got {self.looksam_k!r}")
        if self.rho_min is not None and not (_real(self.rho_min) and 0 <= self.rho_min
                                             <= self.rho):
            raise ValueError(f"rho_min must be in [0, rho={self.rho}] or None, got "
                             f"{self.rho_min!r}")
        if self.inner_group_size and self.replicas > 1 and self.replicas % self.inner_group_size:
            raise ValueError(f"inner_group_size {self.inner_group_size} must divide the "
                             f"{self.replicas} replicas")
        per_replica = self.batch_size // self.replicas
        if (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                or self.micro_batch < 0 or (self.micro_batch and per_replica % self.micro_batch)):
            raise ValueError(f"micro_batch must be 0 (off) or divide the {per_replica} examples "
                             f"of each replica, got {self.micro_batch!r}")
        if self.micro_batch and self.sam_variant != "sam":
            raise ValueError("micro_batch (m-SAM) goes with sam_variant 'sam' only")
        if self.schedule == "gsam-official" and self.sam_variant != "gsam":
            raise ValueError("schedule 'gsam-official' is GSAM's lr and rho together: it needs "
                             "sam_variant 'gsam'")
        if self.sam_variant == "looksam" and self.rho == 0:
            raise ValueError("sam_variant 'looksam' needs rho > 0 (its full steps are SAM steps)")
        if self.micro_batch and self.restore != "copy":
            raise ValueError("micro_batch (m-SAM) restores w by copy only: use restore 'copy'")

    def lr_schedule(self, steps_per_epoch: int):
        """lr(step), step counted from 0: the JAX code's per-step cosine, a constant, or
        juntang-zhuang/GSAM's example's exact sequence (``variants.gsam_official_schedule``)."""
        from .optim import constant_schedule, cosine_schedule
        if self.schedule == "constant":
            return constant_schedule(self.lr)
        if self.schedule == "cosine":
            return cosine_schedule(self.lr, self.epochs, steps_per_epoch)
        cosine_schedule(self.lr, self.epochs, steps_per_epoch)    # the same argument checks
        at = self._gsam_official(steps_per_epoch)
        return lambda step: at(step + 1)[0]

    def _gsam_official(self, steps_per_epoch: int):
        from .variants import gsam_official_schedule
        rho_min = self.rho if self.rho_min is None else self.rho_min
        return gsam_official_schedule(self.lr, self.epochs * steps_per_epoch, self.rho, rho_min)

    def step_function(self, steps_per_epoch: int = 1):
        """The per-replica step this config trains with (``variants.step_function``): a new
        one for each replica, since LookSAM's carries that replica's state."""
        from .variants import step_function
        rho_at = (lambda step, at=self._gsam_official(steps_per_epoch): at(step + 1)[1]) \
            if self.schedule == "gsam-official" else None
        return step_function(self.sam_variant, self.micro_batch, self.gsam_alpha,
                             self.rho_min, self.lr, self.looksam_k, self.looksam_alpha, rho_at)

    def sam_config(self) -> SAMConfig:
        """The SAM step's settings (``sam.SAMConfig``), which validates them."""
        return SAMConfig(**{name: getattr(self, name) for name in SAM_FIELDS})

    def augment(self) -> Augment:
        """The dataset's basic augmentation (``data.default_augment`` without cutout: the
        JAX code's ``image_level_augmentations='basic'``, ``batch_level='none'``), with the
        crop/flip overrides, plus cutout of side ``cutout`` if > 0."""
        base = default_augment(self.dataset, cutout_size=0)
        return Augment(crop_pad=base.crop_pad if self.crop is None else self.crop,
                       flip=base.flip if self.flip is None else self.flip, cutout=self.cutout)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resume_conflicts(saved: TrainConfig, given: dict) -> str | None:
    """None if every field in ``given`` agrees with the saved config, else one sentence
    naming the fields that differ (a resumed run continues with its saved config)."""
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; expected some of {list(FIELDS)}")
    diffs = [f"{k} (saved {getattr(saved, k)!r}, given {v!r})" for k, v in given.items()
             if getattr(saved, k) != v]
    if not diffs:
        return None
    return ("a resumed run continues with its saved config, and these fields differ: "
            + ", ".join(diffs) + "; drop them, or start a new run in another directory")

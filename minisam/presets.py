"""Named training setups for ``minisam train --preset NAME``; explicit flags override them.

Sources:

* **SAM paper**, Foret et al., ICLR 2021, Appendix C.1 and Table 6 ("Hyper-parameter used
  to produce the CIFAR-{10,100} results"): batch size 256 for CIFAR; WRN-28-10 for 200
  epochs with lr 0.1, weight decay 0.0005, rho 0.05 (CIFAR-10) / 0.1 (CIFAR-100); for 1800
  epochs lr 0.05, weight decay 0.001, same rho. Sec. 3.1: all results use the basic
  augmentation (horizontal flip, 4-pixel padding, random crop); cutout and AutoAugment are
  extra rows of Table 1. The SGD baselines use the same lr and weight decay (grid-searched
  before applying SAM) and were allowed twice the epochs, the best of both reported.
* **google-research/sam** (the JAX code): cosine schedule without warm-up, Nesterov momentum
  0.9, gradient clipping at global norm 5.0 (its README: "max_grad_norm = 5.0"), no label
  smoothing for CIFAR (flag default 0.0), weight decay on every parameter including BN.
* **WRN-16-8 on CIFAR-10** as in davda54/sam's ``example/train.py`` (the widely copied
  PyTorch SAM example): 200 epochs, batch 128, lr 0.1, weight decay 0.0005, label smoothing
  0.1, basic augmentation plus cutout (16x16), rho 0.05 (its README's SAM row). That script
  uses a step schedule and no clipping; here the JAX code's cosine schedule and clipping apply.

The other Table 6 rows (Shake-Shake, PyramidNet) need models minisam does not have.
"""
from __future__ import annotations

from .semantics import semantics

PRESETS: dict[str, dict] = {}
DESCRIPTIONS: dict[str, str] = {}

for _ds, _rho in (("cifar10", 0.05), ("cifar100", 0.1)):
    _basic = dict(dataset=_ds, model="wrn28_10", batch_size=256, crop=4, flip=True, cutout=0,
                  label_smoothing=0.0, gradient_clipping=5.0, schedule="cosine")
    for _epochs, _lr, _wd, _tag in ((200, 0.1, 5e-4, ""), (1800, 0.05, 1e-3, "-1800ep")):
        for _opt, _r in (("sam", _rho), ("sgd", 0.0)):
            name = f"{_ds}-wrn28_10{_tag}-{_opt}"
            PRESETS[name] = dict(_basic, epochs=_epochs, lr=_lr, weight_decay=_wd, rho=_r)
            DESCRIPTIONS[name] = (
                f"SAM paper Table 6, WRN-28-10 ({_epochs} epochs) on {_ds}: batch 256, lr {_lr}, "
                f"wd {_wd}, " + (f"rho {_r}" if _r else "SGD baseline (rho 0)") +
                ", basic augmentation (add --cutout 16 for the cutout rows)")

for _opt, _r in (("sam", 0.05), ("sgd", 0.0)):
    name = f"cifar10-wrn16_8-{_opt}"
    PRESETS[name] = dict(dataset="cifar10", model="wrn16_8", epochs=200, batch_size=128, lr=0.1,
                         weight_decay=5e-4, label_smoothing=0.1, crop=4, flip=True, cutout=16,
                         gradient_clipping=5.0, schedule="cosine", rho=_r)
    DESCRIPTIONS[name] = ("common WRN-16-8 CIFAR-10 setup (davda54/sam example): 200 epochs, "
                          "batch 128, lr 0.1, wd 5e-4, label smoothing 0.1, cutout 16, "
                          + (f"rho {_r}" if _r else "SGD (rho 0)"))

# davda54/sam's README rows (WRN-16-8, CIFAR-10: SGD 3.20%, SAM rho 0.05 2.86%, ASAM rho 2.0
# 2.55% test error) with its example/train.py's semantics: torch SGD (momentum 0.9, not
# Nesterov, weight decay 5e-4 in the optimizer), the BN bypass, no clipping, label smoothing
# 0.1, crop + flip + cutout 16. Not minisam's: its StepLR (x0.2 at 30/60/80% of the epochs;
# here cosine) and its cutout applied with probability 0.5 (here always).
_DAVDA54 = dict(dataset="cifar10", model="wrn16_8", epochs=200, batch_size=128, lr=0.1,
                weight_decay=5e-4, label_smoothing=0.1, crop=4, flip=True, cutout=16,
                schedule="cosine")
for _opt, _r, _sem in (("sgd", 0.0, "davda54_bypass"), ("sam", 0.05, "davda54_bypass"),
                       ("asam", 2.0, "davda54_asam")):
    name = f"cifar10-wrn16_8-davda54-{_opt}"
    PRESETS[name] = dict(_DAVDA54, rho=_r, **semantics(_sem))
    DESCRIPTIONS[name] = (f"davda54/sam's WRN-16-8 CIFAR-10 row ({_opt.upper()}"
                          + (f", rho {_r}" if _r else "") + f") with its example's semantics "
                          f"({_sem}; cosine schedule instead of its StepLR)")

# SamsungLabs/ASAM's README command for CIFAR-10 (example_cifar.py --minimizer ASAM --rho 0.5):
# WRN-28-10, batch 128, 200 epochs, lr 0.1, weight decay 5e-4 and momentum 0.9 in torch SGD
# (not Nesterov), label smoothing 0.1, crop + flip, eta 0.0 (the script's default; the class
# default is 0.01). Its cosine annealing steps per epoch; here per step.
PRESETS["cifar10-wrn28_10-asam-official"] = dict(
    dataset="cifar10", model="wrn28_10", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4,
    label_smoothing=0.1, crop=4, flip=True, cutout=0, schedule="cosine", rho=0.5,
    **dict(semantics("asam_official"), asam_eta=0.0))
DESCRIPTIONS["cifar10-wrn28_10-asam-official"] = (
    "SamsungLabs/ASAM's CIFAR-10 command: WRN-28-10, rho 0.5, eta 0 (its script's default), "
    "official ASAM semantics, label smoothing 0.1, batch 128")

# juntang-zhuang/GSAM's example/train.py defaults: WRN-16-8, batch 128, 200 epochs, lr 0.1,
# torch SGD (momentum 0.9, weight decay 5e-4), label smoothing 0.1, adaptive (davda54's
# form), rho 2.0 at every lr (rho_max = rho_min), alpha 0.4; its data pipeline is
# davda54's (crop, flip, cutout); its lr and rho step by step: schedule "gsam-official".
PRESETS["cifar10-wrn16_8-gsam-official"] = dict(
    _DAVDA54, rho=2.0, sam_variant="gsam", gsam_alpha=0.4, rho_min=None,
    schedule="gsam-official",
    **dict(semantics("gsam_official"), adaptive="davda54"))
DESCRIPTIONS["cifar10-wrn16_8-gsam-official"] = (
    "juntang-zhuang/GSAM's example: WRN-16-8, GSAM alpha 0.4, adaptive, rho 2.0 constant, "
    "gsam_official semantics, label smoothing 0.1, cutout 16")


def preset(name: str) -> dict:
    """The settings of a preset (a copy); ValueError naming the known presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return dict(PRESETS[name])

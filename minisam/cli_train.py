"""``minisam train``: its flags (the fields of ``config.TrainConfig``) and what it does.

Split from ``cli.py`` for length; ``cli.build_parser`` adds it like the others, and
``UserError`` (a mistake the user can fix) lives here for both.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .backend import DEVICES
from .config import DEFAULTS, FIELDS, SCHEDULES, SMALL_DATASET_MODEL
from .data import DATASETS, SOURCES


class UserError(Exception):
    """A mistake the user can fix (bad flag value, missing file): one line, exit status 2."""


def say(rank: int, msg: str):
    if rank == 0:
        print(msg, file=sys.stderr)


def _default(name: str) -> str:
    return f"(default {DEFAULTS[name]})"


def _explicit(args) -> dict:
    """The TrainConfig fields given on the command line (their argparse default is None)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}


def _given(args) -> dict:
    """Fields from --preset < --semantics < explicit flags."""
    from .presets import preset
    from .semantics import semantics
    values = preset(args.preset) if args.preset else {}
    values.update(semantics(args.semantics) if args.semantics else {})
    values.update(_explicit(args))
    return values


def build_config(args):
    """TrainConfig from defaults < preset < semantics < explicit flags."""
    from .config import TrainConfig
    values = _given(args)
    if "dataset" not in values:
        raise UserError(f"choose a dataset with --dataset ({', '.join(DATASETS)}) or a setup "
                        "with --preset")
    if "model" not in values and values["dataset"] in ("digits", "synthetic"):
        values["model"] = SMALL_DATASET_MODEL
    return TrainConfig(**values)


def _default_out(cfg, args) -> str:
    opt = f"sam{cfg.rho:g}" if cfg.rho > 0 else "sgd"
    name = args.preset or f"{cfg.dataset}-{cfg.model}-{opt}"
    return os.path.join("runs", f"{name}-seed{cfg.seed}")


def _device(args) -> str:
    """The device this train command will run on: the flag, else the resumed run's or the
    preset's, else the default (a missing run is reported later, by the Trainer)."""
    from .presets import preset
    from .rundir import read_config
    if args.device:
        return args.device
    try:
        saved = read_config(args.out) if args.resume and args.out else {}
    except (OSError, ValueError, KeyError):
        saved = {}
    given = preset(args.preset) if args.preset else {}
    return saved.get("device") or given.get("device") or DEFAULTS["device"]


def cmd_train(args) -> int:
    from .distributed.env import world_size
    from .train import Trainer
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.gpus is not None:
        from .distributed.launch import relaunch_on_gpus
        return relaunch_on_gpus(args.gpus, args.argv, args.device)
    comm = None
    if world_size() > 1:   # a rank started by minisam.launch, torchrun, srun or mpirun
        from .distributed import comm_from_env
        comm = comm_from_env(device=_device(args))   # refuses the CPU in one line
    kw = dict(max_steps=args.max_steps, progress=not args.no_progress, comm=comm)
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR, the run directory to continue")
        trainer = Trainer(_given(args), args.out, resume=True, **kw)
        out = args.out
        say(trainer.rank, f"resuming {out} in epoch {trainer.epoch + 1} after step "
            f"{trainer.step_in_epoch} of {trainer.steps_per_epoch} (global step {trainer.step})")
    else:
        cfg = build_config(args)
        out = args.out or _default_out(cfg, args)
        trainer = Trainer(cfg, out, **kw)
        cfg = trainer.cfg
        opt = f"SAM rho={cfg.rho:g}" if cfg.rho > 0 else "SGD"
        say(trainer.rank, f"training {cfg.model} on {cfg.dataset} with {opt}: {cfg.epochs} "
            f"epochs x {trainer.steps_per_epoch} steps, batch {cfg.batch_size}"
            f"{f' over {cfg.replicas} replicas' if cfg.replicas > 1 else ''}, lr {cfg.lr:g} "
            f"({cfg.schedule}); run directory {out}")
    rec = trainer.fit()
    if trainer.rank != 0:
        return 0
    if "stopped_at_step" in rec:
        print(f"stopped after {rec['stopped_at_step']} steps (--max-steps); checkpoint saved; "
              f"continue with: minisam train --resume --out {shlex.quote(out)}")
        return 0
    print(f"done: epoch {rec['epoch']}: train loss {rec['train_loss']:.4f}, train error "
          f"{rec['train_error_rate']:.2%}; {'validation' if trainer.cfg.validation else 'test'} "
          f"loss {rec['test_loss']:.4f}, error {rec['test_error_rate']:.2%}; run directory {out}")
    return 0


def train_parser(sub):
    from .presets import DESCRIPTIONS
    from .sam import ADAPTIVE, PERTURBED_BN_STATS, RESTORE, WEIGHT_DECAY_IN
    from .semantics import DESCRIPTIONS as SEM_DESCRIPTIONS, SEMANTICS
    from .variants import VARIANTS
    t = sub.add_parser(
        "train", help="train a WideResnet with SAM or SGD",
        description="Train with SAM (or SGD with --rho 0) like the JAX code: cosine schedule per "
                    "step, Nesterov momentum, weight decay, clipping; evaluates every epoch, "
                    "logs metrics.jsonl, checkpoints every epoch (atomically). Ctrl-C saves a "
                    "checkpoint at the current step; --resume continues exactly.")
    g = t.add_argument_group("setup")
    g.add_argument("--preset", choices=sorted(DESCRIPTIONS), metavar="NAME",
                   help="start from a named setup; explicit flags override it. " +
                   "; ".join(f"{k}: {v}" for k, v in sorted(DESCRIPTIONS.items())))
    g.add_argument("--dataset", choices=DATASETS,
                   help="training data: CIFAR from --data-dir or tensorflow-datasets; digits "
                        "(embedded, offline); synthetic (random templates, for smoke tests)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="CIFAR: folder with cifar-10-python.tar.gz / cifar-100-python.tar.gz or "
                        "their extracted folders (or tensorflow-datasets' data_dir)")
    g.add_argument("--data-source", choices=SOURCES,
                   help="CIFAR: read the local archive, tensorflow-datasets, or auto (archive if "
                        f"found in --data-dir, else tfds) {_default('data_source')}")
    g.add_argument("--image-size", type=int, metavar="N",
                   help="digits only: upscale the 8x8 images to NxN (default 16; 8 = native)")
    g.add_argument("--validation", action="store_const", const=True,
                   help="hold out the last 10%% of the training set and evaluate on it instead "
                        "of the test set (the JAX code's --use_test_set=False)")
    g.add_argument("--model", metavar="NAME",
                   help="WideResnet wrn<depth>_<width>, depth = 6n+4, e.g. wrn28_10, wrn16_8, "
                        f"wrn10_2 (default: {DEFAULTS['model']}, the JAX default; "
                        f"{SMALL_DATASET_MODEL} for digits and synthetic)")
    g.add_argument("--no-batch-norm", dest="batch_norm", action="store_const", const=False,
                   help="the WideResnet without batch norm (an identity where each BN was), as "
                        "the SAM paper measured its Hessian")
    g = opt = t.add_argument_group("optimisation")
    g.add_argument("--rho", type=float, help="SAM neighbourhood radius; 0 trains with plain SGD "
                   f"(Nesterov momentum) {_default('rho')}")
    g.add_argument("--epochs", type=int,
                   help=f"epochs; the cosine schedule spans them {_default('epochs')}")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help=f"global batch size, split evenly over --replicas {_default('batch_size')}")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_default('lr')}")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule per step: cosine from lr to 0 without warm-up "
                        "(sam_jax get_cosine_schedule), constant, or gsam-official (with "
                        "--sam-variant gsam: juntang-zhuang/GSAM's example's lr and rho, step by "
                        f"step) {_default('schedule')}")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"L2 coefficient on all parameters, BN included {_default('weight_decay')}")
    g.add_argument("--label-smoothing", type=float, metavar="LS",
                   help=_default("label_smoothing"))
    g.add_argument("--gradient-clipping", type=float, metavar="NORM",
                   help="clip the (synced) gradient to this global norm; 0 = off "
                        f"{_default('gradient_clipping')}")
    g.add_argument("--momentum", type=float, help=f"momentum beta {_default('momentum')}")
    g.add_argument("--sync-perturbations", action="store_const", const=True,
                   help="average the first gradient over replicas before the SAM perturbation "
                        "(default: each replica perturbs with its own gradient, m-sharpness)")
    g.add_argument("--inner-group-size", type=int, metavar="G",
                   help="with --sync-perturbations: average the first gradient within groups "
                        "of G consecutive replicas only (the JAX code's --inner_group_size); "
                        f"0 = all {_default('inner_group_size')}")
    g = t.add_argument_group(
        "SAM semantics and variants", "the choices SAM implementations disagree on "
        "(minisam.semantics; README 'SAM is not one algorithm'; defaults: google-research/"
        "sam's), and SAM's variants (minisam.variants)")
    g.add_argument("--semantics", choices=sorted(SEMANTICS), metavar="NAME",
                   help="one implementation's choices for every switch below; explicit flags "
                        "override it. " + "; ".join(f"{k}: {v}" for k, v in
                                                     sorted(SEM_DESCRIPTIONS.items())))
    g.add_argument("--weight-decay-in", choices=WEIGHT_DECAY_IN,
                   help="loss: 0.5 wd ||w||^2 in the loss, at w and at w + e (JAX); optimizer: "
                        "wd * w added to the SAM gradient at w after clipping (torch SGD) "
                        f"{_default('weight_decay_in')}")
    g.add_argument("--norm-eps", type=float, metavar="EPS",
                   help="e = rho g / (||g|| + EPS) (davda54: 1e-12, ASAM: 1e-16) "
                        f"{_default('norm_eps')}")
    g.add_argument("--perturbed-bn-stats", choices=PERTURBED_BN_STATS,
                   help="discard: keep the first pass's BN running stats (JAX, davda54's "
                        "bypass); update: the perturbed pass updates them too "
                        f"{_default('perturbed_bn_stats')}")
    g.add_argument("--adaptive", choices=ADAPTIVE,
                   help="ASAM's scaling of the perturbation: davda54 (|w| on every parameter) or "
                        f"asam (|w| + eta on kernels and BN scales) {_default('adaptive')}")
    g.add_argument("--asam-eta", type=float, metavar="ETA",
                   help=f"--adaptive asam: the eta in |w| + eta {_default('asam_eta')}")
    g.add_argument("--restore", choices=RESTORE,
                   help="how w comes back after the ascent: copy (exact) or subtract (w + e - e, "
                        f"as ASAM's descent_step) {_default('restore')}")
    g.add_argument("--sam-variant", choices=VARIANTS,
                   help="sam; gsam (Zhuang et al. 2022: descend along g_s minus --gsam-alpha "
                        "times g's part orthogonal to g_s; rho follows lr down to --rho-min); "
                        "looksam (Liu et al. 2022: a full SAM step every --looksam-k steps, one "
                        "pass plus the kept orthogonal part of g_s in between) "
                        f"{_default('sam_variant')}")
    g.add_argument("--looksam-k", type=int, metavar="K",
                   help=f"LookSAM: a full SAM step every K steps {_default('looksam_k')}")
    g.add_argument("--looksam-alpha", type=float, metavar="ALPHA",
                   help="LookSAM: weight of the reused part, g + ALPHA ||g|| / ||g_v|| g_v "
                        f"{_default('looksam_alpha')}")
    g.add_argument("--gsam-alpha", type=float, metavar="ALPHA",
                   help=f"GSAM's alpha; 0 is SAM {_default('gsam_alpha')}")
    g.add_argument("--rho-min", type=float, metavar="RHO",
                   help="GSAM: rho at lr 0; rho moves with lr from --rho at the peak lr "
                        "(default: --rho, constant)")
    g.add_argument("--micro-batch", type=int, metavar="M",
                   help="m-SAM in one process: cut each replica's batch into micro-batches of M "
                        "examples, each with its own perturbation (one from their mean with "
                        f"--sync-perturbations); 0 = off {_default('micro_batch')}")
    g.add_argument("--clip-before-sync", action="store_const", const=True,
                   help="clip each replica's gradient, then average (default: average, then "
                        "clip the mean, as the JAX code does)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum (JAX), or heavy-ball with --no-nesterov (torch SGD's "
                        "default) (default on)")
    g = opt
    g.add_argument("--replicas", type=int, metavar="R",
                   help="data-parallel replicas; on the CPU, R threads each with its own BN "
                        f"statistics and SAM perturbation {_default('replicas')}")
    g.add_argument("--gpus", type=int, metavar="N",
                   help="run as N processes, one per GPU, over NCCL (python -m minisam.launch "
                        "--nproc N -- train ...); implies --device gpu")
    g.add_argument("--device", choices=DEVICES, help=f"NumPy or CuPy {_default('device')}")
    g.add_argument("--tf32", action="store_const", const=True,
                   help="GPU only: run float32 matrix products on TF32 tensor cores (faster, "
                        "about 1e-3 relative error per product; default off: plain float32)")
    g.add_argument("--seed", type=int, help="model init, data order, augmentation and label "
                   f"noise all derive from it {_default('seed')}")
    g = t.add_argument_group("data augmentation and noise")
    g.add_argument("--crop", type=int, metavar="PAD",
                   help="reflect-pad by PAD pixels then random-crop back (default: 4 for CIFAR, "
                        "1 for digits, off for synthetic)")
    g.add_argument("--no-crop", dest="crop", action="store_const", const=0,
                   help="no pad-and-crop")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for CIFAR, off for digits)")
    g.add_argument("--cutout", type=int, metavar="SIZE",
                   help="cutout: zero a SIZE x SIZE square per batch (JAX: 16); 0 = off "
                        f"{_default('cutout')}")
    g.add_argument("--label-noise", type=float, metavar="RATE",
                   help="replace this fraction of the training labels by random classes, once, "
                        f"from --seed {_default('label_noise')}")
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="DIR",
                   help="run directory for config.json, metrics.jsonl and checkpoint.npz "
                        "(default runs/<preset or dataset-model-opt>-seed<seed>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (end of an epoch, "
                        "Ctrl-C or --max-steps); bitwise the same result as not stopping")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N global steps with a checkpoint (smoke tests; the schedule "
                        "still spans --epochs)")
    g.add_argument("--eval-batch-size", type=int, metavar="B", help="default: --batch-size")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return t, cmd_train

"""The ``minisam`` command line: declarations only; the library does the work.

Commands: ``demo`` (SGD vs SAM on noisy digits, offline), ``train``, ``eval``, ``plot``,
``verify`` (against the JAX reference cases), ``bench``. Each has a ``_<name>_parser``
that declares its flags and a ``cmd_<name>`` that calls the library. User mistakes print
one line and exit with status 2. Set MINISAM_DEBUG=1 to see tracebacks.

The ``train`` flags are the fields of ``config.TrainConfig``: their names, choices and
defaults are read from there (and ``backend.DEVICES``, ``data.DATASETS``/``SOURCES``).
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def say(rank: int, msg: str):
    if rank == 0:
        print(msg, file=sys.stderr)


def _default(name: str) -> str:
    return f"(default {DEFAULTS[name]})"


# ---------------------------------------------------------------------------------------
# train

def _explicit(args) -> dict:
    """The TrainConfig fields given on the command line (their argparse default is None)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}


def build_config(args):
    """TrainConfig from defaults < preset < explicit flags."""
    from .config import TrainConfig
    from .presets import preset
    values = preset(args.preset) if args.preset else {}
    values.update(_explicit(args))
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
        from .presets import preset
        given = dict(preset(args.preset) if args.preset else {}, **_explicit(args))
        trainer = Trainer(given, args.out, resume=True, **kw)
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


def _train_parser(sub):
    from .presets import DESCRIPTIONS
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
    g = t.add_argument_group("optimisation")
    g.add_argument("--rho", type=float, help="SAM neighbourhood radius; 0 trains with plain SGD "
                   f"(Nesterov momentum) {_default('rho')}")
    g.add_argument("--epochs", type=int,
                   help=f"epochs; the cosine schedule spans them {_default('epochs')}")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help=f"global batch size, split evenly over --replicas {_default('batch_size')}")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_default('lr')}")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule per step: cosine from lr to 0 without warm-up "
                        f"(sam_jax get_cosine_schedule) or constant {_default('schedule')}")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"L2 coefficient on all parameters, BN included {_default('weight_decay')}")
    g.add_argument("--label-smoothing", type=float, metavar="LS",
                   help=_default("label_smoothing"))
    g.add_argument("--gradient-clipping", type=float, metavar="NORM",
                   help="clip the (synced) gradient to this global norm; 0 = off "
                        f"{_default('gradient_clipping')}")
    g.add_argument("--momentum", type=float, help=f"Nesterov momentum {_default('momentum')}")
    g.add_argument("--sync-perturbations", action="store_const", const=True,
                   help="average the first gradient over replicas before the SAM perturbation "
                        "(default: each replica perturbs with its own gradient, m-sharpness)")
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


# ---------------------------------------------------------------------------------------
# eval, plot, demo

def cmd_eval(args) -> int:
    from .evaluate import evaluate_checkpoint
    res, data, meta = evaluate_checkpoint(args.checkpoint, args.split, args.device,
                                          args.dataset, args.data_dir, args.data_source,
                                          args.batch_size)
    err = res["error_rate"]
    print(f"{data.name} {data.split} ({len(data)} examples), checkpoint epoch {meta['epoch']} "
          f"step {meta['step']}: loss {res['loss']:.4f}, error {err:.2%}, accuracy {1 - err:.2%}")
    return 0


def _eval_parser(sub):
    e = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Loss and error of a checkpoint's parameters (BN in eval mode, "
                                   "replica-averaged statistics) on its dataset's test split.")
    e.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT.npz")
    e.add_argument("--dataset", choices=DATASETS, help="default: the run's dataset")
    e.add_argument("--data-dir", metavar="DIR", help="default: the run's")
    e.add_argument("--data-source", choices=SOURCES, help="default: the run's")
    e.add_argument("--split", choices=["test", "train"], default="test",
                   help="test (or validation, for --validation runs; default) or train")
    e.add_argument("--batch-size", type=int, metavar="B",
                   help="default: the run's eval batch size")
    e.add_argument("--device", choices=DEVICES, help="default: the run's")
    return e, cmd_eval


def cmd_plot(args) -> int:
    from .plots import plot_comparison, plot_training_curves
    for d in args.runs:
        if not os.path.isdir(d):
            raise UserError(f"{d!r} is not a directory; pass run directories (they hold "
                            "metrics.jsonl)")
    if len(args.runs) == 1:
        path = plot_training_curves(args.runs[0], args.out)
    else:
        path = plot_comparison(args.runs, args.out or "comparison.png")
    print(path)
    return 0


def _plot_parser(sub):
    p = sub.add_parser("plot", help="plot loss and error curves of runs as PNG",
                       description="One run directory: its train/test loss and error curves "
                                   "(RUN_DIR/curves.png). Several: one comparison figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.png",
                   help="default RUN_DIR/curves.png, or comparison.png for several runs")
    return p, cmd_plot


def cmd_demo(args) -> int:
    from .demo import run_demo
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(args.out, quick=args.quick, epochs=args.epochs, label_noise=args.label_noise,
             rho=args.rho, seed=args.seed, progress=not args.no_progress)
    return 0


def _demo_parser(sub):
    from .demo import FULL, SAM_RHO
    d = sub.add_parser(
        "demo", help="SGD vs SAM on digits with noisy labels (offline, a few minutes)",
        description="Train the same small WideResnet with SGD and with SAM on the embedded "
                    f"digits with {FULL['label_noise']:.0%} of the training labels randomised; "
                    "print accuracies, losses, the top Hessian eigenvalue and m-sharpness of "
                    "both solutions; write a PNG comparing the curves and loss slices.")
    d.add_argument("--out", default=os.path.join("runs", "demo"), metavar="DIR",
                   help="where the two runs, results.json and sgd_vs_sam.png go "
                        "(default runs/demo)")
    d.add_argument("--epochs", type=int, help=f"epochs per run (default {FULL['epochs']})")
    d.add_argument("--label-noise", type=float, metavar="RATE",
                   help=f"default {FULL['label_noise']}")
    d.add_argument("--rho", type=float, default=SAM_RHO, help=f"SAM's rho (default {SAM_RHO})")
    d.add_argument("--seed", type=int, default=0, help="default 0")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    return d, cmd_demo


# ---------------------------------------------------------------------------------------
# verify, bench

def cmd_verify(args) -> int:
    from .backend import xp_for
    from .reference import format_rows, format_summary
    from .ties import describe_tie
    from .verify import format_steps, verify_case
    xp_for(args.device)  # fail early and clearly if the GPU is unusable
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        print("minisam verify: CUPY_TF32 is ignored here: the cases are compared to 1e-5, and "
              "TF32 products carry about 1e-3 relative error, so verify runs plain float32",
              file=sys.stderr)
    failed = False
    for case in args.cases:
        report = verify_case(case, args.device, resolve_ties=not args.no_ties)
        print(f"== {case}  (device: {args.device}; every step from the reference's state "
              "after the step before)")
        print(format_rows(report.rows))
        for site, value in report.ties:
            print(f"   float32 tie set to the reference's side: {describe_tie(site, value)}")
        if args.float64:
            print("-- the same steps in float64, against the float32 reference:")
            print(format_rows(report.rows64))
        print("-- max rel err per step, values / gradients, params, momentum, BN state:")
        print(format_steps(report))
        print(format_summary(report.rows) + "\n")
        failed |= not report.ok
    return 1 if failed else 0


def _verify_parser(sub):
    v = sub.add_parser(
        "verify", help="compare minisam with a reference case from the original JAX code",
        description="Rebuild a reference case (NAME.npz + NAME.json manifest) from its config "
                    "and run every step from the reference's own state after the step before "
                    "(step-wise), comparing every key with the JAX numbers; exits 1 if any key "
                    "group is outside tolerance. Also prints, per step, the chained run (every "
                    "step from our own previous state) and float64 runs of both kinds, which "
                    "show how much float32 chaos the case has.")
    v.add_argument("cases", nargs="+", metavar="CASE.npz",
                   help="reference case(s), e.g. reference_results/wrn10x2_single.npz")
    v.add_argument("--device", choices=DEVICES, default="cpu",
                   help="run on the CPU (NumPy) or a GPU (CuPy); default cpu")
    v.add_argument("--no-ties", action="store_true",
                   help="do not resolve float32 ReLU ties (inputs within float32 noise of zero "
                        "whose side depends on rounding); show the raw comparison")
    v.add_argument("--float64", action="store_true",
                   help="also print every key group of the float64 step-wise run against the "
                        "float32 reference: what float32 noise alone looks like on this case")
    return v, cmd_verify


def cmd_bench(args) -> int:
    import json
    from .bench import bench, format_result
    from .rundir import atomic_write
    r = bench(args.model, args.batch_size, args.device, args.warmup, args.steps,
              args.num_classes, args.rho, tf32=args.tf32)
    print(format_result(r))
    if args.json:
        atomic_write(args.json, json.dumps(r, indent=1).encode())
    return 0


def _bench_parser(sub):
    b = sub.add_parser(
        "bench", help="time an SGD step and a SAM step (images/s, ms, SAM/SGD, memory)",
        description="Time one SGD step (rho = 0) and one SAM step of a WideResnet on a fixed "
                    "synthetic CIFAR-shaped batch: warm-up steps, then the median of timed, "
                    "device-synchronised steps. Prints images/s, ms per step, the SAM/SGD "
                    "ratio and peak memory, and optionally writes JSON.")
    b.add_argument("--model", default="wrn16_4",
                   help="WideResnet preset: wrn16_4, wrn16_8, wrn28_10 or wrn<6n+4>_<k> "
                        "(default wrn16_4)")
    b.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    b.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (NumPy) or gpu (CuPy); default cpu")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    b.add_argument("--steps", type=int, default=10,
                   help="timed steps; the median is reported (default 10)")
    b.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    b.add_argument("--rho", type=float, default=0.05,
                   help="SAM radius for the SAM step (default 0.05)")
    b.add_argument("--tf32", action="store_true",
                   help="GPU only: float32 matrix products on TF32 tensor cores (default off)")
    b.add_argument("--json", metavar="OUT.json", help="also write the result as JSON here")
    return b, cmd_bench


# ---------------------------------------------------------------------------------------

COMMANDS = (_demo_parser, _train_parser, _eval_parser, _plot_parser, _verify_parser,
            _bench_parser)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="minisam",
                description="Sharpness-Aware Minimization from scratch in NumPy/CuPy.")
    p.add_argument("--version", action="version", version=f"minisam {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in COMMANDS:
        parser, func = register(sub)
        parser.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .train import NonFiniteLossError, TrainingInterrupted
    debug = os.environ.get("MINISAM_DEBUG")
    try:
        return args.func(args)
    except NonFiniteLossError as e:
        if debug:
            raise
        print(f"minisam {args.command}: training diverged: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"minisam {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (UserError, ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"minisam {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minisam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

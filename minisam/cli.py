"""The ``minisam`` command line. User mistakes print one line and exit with status 2.

Commands: ``demo`` (SGD vs SAM on noisy digits, offline), ``train``, ``eval``, ``plot``,
``verify`` (against the JAX reference cases). Set MINISAM_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag value, missing file): one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------
# verify

def cmd_verify(args) -> int:
    from .backend import xp_for
    from .reference import describe_tie, format_rows, verify
    xp_for(args.device)  # fail early and clearly if the GPU is unusable
    failed = False
    for case in args.cases:
        rows, ties = verify(case, args.device, resolve_ties=not args.no_ties)
        print(f"== {case}  (device: {args.device})")
        print(format_rows(rows))
        for site, value in ties:
            print(f"   float32 tie set to the reference's side: {describe_tie(site, value)}")
        ok = all(r.ok for r in rows)
        worst = {kind: max((r.max_rel for r in rows if r.kind == "rel" and
                            (r.tol == tol)), default=0.0) for kind, tol in (("values", 1e-5), ("gradients", 1e-4))}
        print(f"-> {'PASS' if ok else 'FAIL'}: max rel err {worst['values']:.2e} on values "
              f"(tol 1e-5), {worst['gradients']:.2e} on gradients/params/state (tol 1e-4)\n")
        failed |= not ok
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------
# train

# Flags that set TrainConfig fields (dest == field name). Their argparse default is None,
# so "given on the command line" is visible and explicit flags override a preset.
CONFIG_FLAGS = ("dataset", "data_dir", "data_source", "image_size", "validation", "model",
                "epochs", "batch_size", "lr", "schedule", "weight_decay", "rho",
                "label_smoothing", "gradient_clipping", "momentum", "sync_perturbations",
                "crop", "flip", "cutout", "label_noise", "seed", "replicas", "device",
                "eval_batch_size")
SMALL_DATASET_MODEL = "wrn10_2"   # default model for digits and synthetic


def _explicit(args) -> dict:
    return {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}


def build_config(args):
    """TrainConfig from defaults < preset < explicit flags."""
    from .presets import preset
    from .train import TrainConfig
    values = preset(args.preset) if args.preset else {}
    values.update(_explicit(args))
    if "dataset" not in values:
        raise UserError("choose a dataset with --dataset (digits, cifar10, cifar100, "
                        "synthetic) or a setup with --preset")
    if "model" not in values and values["dataset"] in ("digits", "synthetic"):
        values["model"] = SMALL_DATASET_MODEL
    return TrainConfig(**values)


def _default_out(cfg, args) -> str:
    opt = f"sam{cfg.rho:g}" if cfg.rho > 0 else "sgd"
    name = args.preset or f"{cfg.dataset}-{cfg.model}-{opt}"
    return os.path.join("runs", f"{name}-seed{cfg.seed}")


def _without_gpus(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def _launch_gpus(args) -> int:
    """``--gpus N``: run this same command as N processes, one per GPU (minisam.launch)."""
    from .launch import LAUNCHED_ENV, launch
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    if os.environ.get(LAUNCHED_ENV) == "1":
        raise UserError("--gpus given inside a launched rank; each rank runs the plain command")
    if args.device == "cpu":
        raise UserError("--gpus runs one process per GPU; drop --device cpu (use --replicas "
                        "for thread replicas on the CPU)")
    argv = _without_gpus(args.argv)
    if args.device is None:
        argv += ["--device", "gpu"]
    return launch(args.gpus, argv)


def cmd_train(args) -> int:
    from .presets import preset
    from .train import Trainer, load_checkpoint
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.gpus is not None:
        return _launch_gpus(args)
    comm = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:   # a rank started by minisam.launch
        from .parallel import comm_from_env
        comm = comm_from_env(device="gpu")
    rank = comm.rank if comm is not None else 0
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR, the run directory to continue")
        saved = load_checkpoint(args.out).config
        given = dict(preset(args.preset) if args.preset else {}, **_explicit(args))
        changed = {k: (getattr(saved, k), v) for k, v in given.items() if getattr(saved, k) != v}
        if changed:
            diffs = ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, (a, b) in changed.items())
            raise UserError("--resume continues the run with its saved config; drop these "
                            f"flags or start a new run with another --out: {diffs}")
        trainer = Trainer(None, args.out, resume=True, max_steps=args.max_steps,
                          progress=not args.no_progress, comm=comm)
        cfg, out = trainer.cfg, args.out
        say(rank, f"resuming {out} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch} "
              f"(global step {trainer.step})")
    else:
        cfg = build_config(args)
        out = args.out or _default_out(cfg, args)
        trainer = Trainer(cfg, out, max_steps=args.max_steps, progress=not args.no_progress,
                          comm=comm)
        cfg = trainer.cfg
        opt = f"SAM rho={cfg.rho:g}" if cfg.rho > 0 else "SGD"
        say(rank, f"training {cfg.model} on {cfg.dataset} with {opt}: {cfg.epochs} epochs x "
              f"{trainer.steps_per_epoch} steps, batch {cfg.batch_size}"
              f"{f' over {cfg.replicas} replicas' if cfg.replicas > 1 else ''}, lr {cfg.lr:g} "
              f"({cfg.schedule}); run directory {out}")
    rec = trainer.fit()
    if rank != 0:
        return 0
    if "stopped_at_step" in rec:
        print(f"stopped after {rec['stopped_at_step']} steps (--max-steps); checkpoint saved; "
              f"continue with: minisam train --resume --out {out}")
        return 0
    print(f"done: epoch {rec['epoch']}: train loss {rec['train_loss']:.4f}, train error "
          f"{rec['train_error_rate']:.2%}; {'validation' if cfg.validation else 'test'} loss "
          f"{rec['test_loss']:.4f}, error {rec['test_error_rate']:.2%}; run directory {out}")
    return 0


# ---------------------------------------------------------------------------------------
# eval, plot, demo

def say(rank: int, msg: str):
    if rank == 0:
        print(msg, file=sys.stderr)


def cmd_eval(args) -> int:
    from .backend import tree_to_device
    from .data import Loader, load_dataset
    from .sam import eval_step
    from .train import load_checkpoint, model_from_checkpoint
    ck = load_checkpoint(args.checkpoint)
    cfg = ck.config
    device = args.device or cfg.device
    dataset = args.dataset or cfg.dataset
    image_size = cfg.image_size if dataset == cfg.dataset else None
    train, test = load_dataset(dataset, args.data_dir or cfg.data_dir,
                               args.data_source or cfg.data_source, image_size, cfg.validation)
    data = train if args.split == "train" else test
    model = model_from_checkpoint(ck, data.num_classes, data.image_shape[-1])
    params, state = tree_to_device(ck.params, device), tree_to_device(ck.state, device)
    loader = Loader(data, args.batch_size or cfg.eval_batch_size or cfg.batch_size,
                    train=False, device=device)
    loss = err = 0.0
    for x, y in loader:
        _, m = eval_step(model, params, state, x, y, cfg.label_smoothing)
        loss += float(m["loss"]) * len(y)
        err += float(m["error_rate"]) * len(y)
    n = len(data)
    m = ck.meta
    print(f"{dataset} {data.split} ({n} examples), checkpoint epoch {m['epoch']} step {m['step']}: "
          f"loss {loss / n:.4f}, error {err / n:.2%}, accuracy {1 - err / n:.2%}")
    return 0


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


def cmd_demo(args) -> int:
    from .demo import run_demo
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(args.out, quick=args.quick, epochs=args.epochs, label_noise=args.label_noise,
             rho=args.rho, seed=args.seed, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------------------

def _add_train_flags(t):
    from .presets import DESCRIPTIONS
    g = t.add_argument_group("setup")
    g.add_argument("--preset", choices=sorted(DESCRIPTIONS), metavar="NAME",
                   help="start from a named setup; explicit flags override it. " +
                   "; ".join(f"{k}: {v}" for k, v in sorted(DESCRIPTIONS.items())))
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "digits", "synthetic"],
                   help="training data: CIFAR from --data-dir or tensorflow-datasets; digits "
                        "(embedded, offline); synthetic (random templates, for smoke tests)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="CIFAR: folder with cifar-10-python.tar.gz / cifar-100-python.tar.gz or "
                        "their extracted folders (or tensorflow-datasets' data_dir)")
    g.add_argument("--data-source", choices=["auto", "archive", "tfds"],
                   help="CIFAR: read the local archive, tensorflow-datasets, or auto (archive if "
                        "found in --data-dir, else tfds; default)")
    g.add_argument("--image-size", type=int, metavar="N",
                   help="digits only: upscale the 8x8 images to NxN (default 16; 8 = native)")
    g.add_argument("--validation", action="store_const", const=True,
                   help="hold out the last 10%% of the training set and evaluate on it instead "
                        "of the test set (the JAX code's --use_test_set=False)")
    g.add_argument("--model", metavar="NAME",
                   help="WideResnet wrn<depth>_<width>, depth = 6n+4, e.g. wrn28_10, wrn16_8, "
                        f"wrn10_2 (default: wrn28_10, the JAX default; {SMALL_DATASET_MODEL} "
                        "for digits and synthetic)")
    g = t.add_argument_group("optimisation")
    g.add_argument("--rho", type=float, help="SAM neighbourhood radius; 0 trains with plain SGD "
                   "(Nesterov momentum) (default 0.05)")
    g.add_argument("--epochs", type=int,
                   help="epochs; the cosine schedule spans them (default 200)")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="global batch size, split evenly over --replicas (default 128)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")
    g.add_argument("--schedule", choices=["cosine", "constant"],
                   help="learning-rate schedule per step: cosine from lr to 0 without warm-up "
                        "(sam_jax get_cosine_schedule; default) or constant")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help="L2 coefficient on all parameters, BN included (default 5e-4)")
    g.add_argument("--label-smoothing", type=float, metavar="LS", help="default 0")
    g.add_argument("--gradient-clipping", type=float, metavar="NORM",
                   help="clip the (synced) gradient to this global norm; 0 = off (default 5)")
    g.add_argument("--momentum", type=float, help="Nesterov momentum (default 0.9)")
    g.add_argument("--sync-perturbations", action="store_const", const=True,
                   help="average the first gradient over replicas before the SAM perturbation "
                        "(default: each replica perturbs with its own gradient, m-sharpness)")
    g.add_argument("--replicas", type=int, metavar="R",
                   help="data-parallel replicas; on the CPU, R threads each with its own BN "
                        "statistics and SAM perturbation (default 1)")
    g.add_argument("--gpus", type=int, metavar="N",
                   help="run as N processes, one per GPU, over NCCL (python -m minisam.launch "
                        "--nproc N -- train ...); implies --device gpu")
    g.add_argument("--device", choices=["cpu", "gpu"], help="NumPy or CuPy (default cpu)")
    g.add_argument("--seed", type=int, help="model init, data order, augmentation and label "
                   "noise all derive from it (default 0)")
    g = t.add_argument_group("data augmentation and noise")
    g.add_argument("--crop", type=int, metavar="PAD",
                   help="reflect-pad by PAD pixels then random-crop back (default: 4 for CIFAR, "
                        "1 for digits, off for synthetic)")
    g.add_argument("--no-crop", dest="crop", action="store_const", const=0,
                   help="no pad-and-crop")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for CIFAR, off for digits)")
    g.add_argument("--cutout", type=int, metavar="SIZE",
                   help="cutout: zero a SIZE x SIZE square per batch (JAX: 16); 0 = off (default)")
    g.add_argument("--label-noise", type=float, metavar="RATE",
                   help="replace this fraction of the training labels by random classes, once, "
                        "from --seed (default 0)")
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="minisam",
        description="Sharpness-Aware Minimization from scratch in NumPy/CuPy.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "demo", help="SGD vs SAM on digits with noisy labels (offline, a few minutes)",
        description="Train the same small WideResnet with SGD and with SAM on the embedded "
                    "digits with 30%% of the training labels randomised; print accuracies, "
                    "losses, the top Hessian eigenvalue and m-sharpness of both solutions; "
                    "write a PNG comparing the curves and loss slices.")
    d.add_argument("--out", default=os.path.join("runs", "demo"), metavar="DIR",
                   help="where the two runs, results.json and sgd_vs_sam.png go "
                        "(default runs/demo)")
    d.add_argument("--epochs", type=int, help="epochs per run (default 40)")
    d.add_argument("--label-noise", type=float, metavar="RATE", help="default 0.3")
    d.add_argument("--rho", type=float, default=0.1, help="SAM's rho (default 0.1)")
    d.add_argument("--seed", type=int, default=0, help="default 0")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser(
        "train", help="train a WideResnet with SAM or SGD",
        description="Train with SAM (or SGD with --rho 0) like the JAX code: cosine schedule per "
                    "step, Nesterov momentum, weight decay, clipping; evaluates every epoch, "
                    "logs metrics.jsonl, checkpoints every epoch (atomically). Ctrl-C saves a "
                    "checkpoint at the current step; --resume continues exactly.")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Loss and error of a checkpoint's parameters (BN in eval mode, "
                                   "replica-averaged statistics) on its dataset's test split.")
    e.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT.npz")
    e.add_argument("--dataset", choices=["cifar10", "cifar100", "digits", "synthetic"],
                   help="default: the run's dataset")
    e.add_argument("--data-dir", metavar="DIR", help="default: the run's")
    e.add_argument("--data-source", choices=["auto", "archive", "tfds"], help="default: the run's")
    e.add_argument("--split", choices=["test", "train"], default="test",
                   help="test (or validation, for --validation runs; default) or train")
    e.add_argument("--batch-size", type=int, metavar="B")
    e.add_argument("--device", choices=["cpu", "gpu"], help="default: the run's")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="plot loss and error curves of runs as PNG",
                        description="One run directory: its train/test loss and error curves "
                                    "(RUN_DIR/curves.png). Several: one comparison figure.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", metavar="FILE.png",
                    help="default RUN_DIR/curves.png, or comparison.png for several runs")
    pl.set_defaults(func=cmd_plot)

    v = sub.add_parser(
        "verify", help="compare minisam with a reference case from the original JAX code",
        description="Rebuild a reference case (NAME.npz + NAME.json manifest) from its config, "
                    "run it and compare every key with the JAX numbers. Prints one row per key "
                    "group and exits 1 if any group is outside tolerance.")
    v.add_argument("cases", nargs="+", metavar="CASE.npz",
                   help="reference case(s), e.g. reference_results/wrn10x2_single.npz")
    v.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="run on the CPU (NumPy) or a GPU (CuPy); default cpu")
    v.add_argument("--no-ties", action="store_true",
                   help="do not resolve float32 ReLU ties (inputs within ~1e-6 of zero whose "
                        "side depends on rounding); show the raw comparison")
    v.set_defaults(func=cmd_verify)

    from . import bench
    bench.add_parser(sub)
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
        return 130
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

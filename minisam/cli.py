"""The ``minisam`` command line: declarations only; the library does the work.

Commands: ``demo`` (SGD vs SAM on noisy digits, offline), ``train``, ``eval``, ``plot``,
``verify`` (against the JAX and PyTorch reference cases), ``bench``, ``experiment``. Each has a ``_<name>_parser``
that declares its flags and a ``cmd_<name>`` that calls the library. User mistakes print
one line and exit with status 2. Set MINISAM_DEBUG=1 to see tracebacks.

The ``train`` command lives in ``cli_train.py``; its flags are the fields of
``config.TrainConfig``, their names, choices and defaults read from there.
"""
from __future__ import annotations

import argparse
import os
import sys

from .backend import DEVICES
from .cli_train import UserError, train_parser
from .data import DATASETS, SOURCES


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------
# train (declared in cli_train.py)

_train_parser = train_parser


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
             rho=args.rho, seed=args.seed, fair_sgd=args.fair_sgd,
             progress=not args.no_progress)
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
    d.add_argument("--fair-sgd", action="store_true",
                   help="a third run, SGD for twice the epochs (in DIR/sgd2x): the paper's fair "
                        "baseline, since a SAM step costs two gradient evaluations (sec. 3.1); "
                        "default: SGD trains as many epochs as SAM")
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
        "verify", help="compare minisam with reference cases from the JAX and PyTorch code",
        description="Rebuild a reference case (NAME.npz + NAME.json manifest) from its config "
                    "and run every step from the reference's own state after the step before "
                    "(step-wise), comparing every key with the reference's numbers (the JAX "
                    "code's, or davda54/sam's under the semantics its manifest names); exits 1 "
                    "if any key "
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
              args.num_classes, args.rho, tf32=args.tf32, variants=args.variants)
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
    b.add_argument("--variants", action="store_true",
                   help="also time GSAM, LookSAM (k = 5: one full SAM step in five) and "
                        "micro-batch m-SAM (m = 8), with their forward-backward passes per step")
    b.add_argument("--json", metavar="OUT.json", help="also write the result as JSON here")
    return b, cmd_bench


# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# experiment

def cmd_experiment(args) -> int:
    from .experiments import run
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.rho <= 0:
        raise UserError(f"--rho must be > 0 (SAM's radius), got {args.rho}")
    out = args.out or os.path.join("runs", f"experiment-{args.name}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data_dir and args.dataset == "digits":
        raise UserError("--data-dir is for CIFAR; the digits are embedded (add --dataset "
                        "cifar10 or cifar100)")
    rec = run(args.name, out, quick=args.quick, rho=args.rho, batch_norm=args.batch_norm,
              epochs=args.epochs, device=args.device, seed=args.seed, fair_sgd=args.fair_sgd,
              dataset=args.dataset, data_dir=args.data_dir, model=args.model,
              batch_size=args.batch_size, progress=not args.no_progress)
    if rec.get("table"):
        print(rec["table"])
    print(f"{args.name}: {rec['seconds']:.0f} s; wrote {os.path.join(out, args.name + '.json')} "
          f"and {rec['png']}")
    return 0


def _experiment_parser(sub):
    from .experiments import EXPERIMENTS
    from .experiments.common import DATASETS as EXPERIMENT_DATASETS
    from .experiments.common import FAIR_SGD
    e = sub.add_parser(
        "experiment", help="one of the SAM paper's experiments in miniature, with its figure",
        description="Run an experiment of the SAM paper in miniature on the embedded digits "
                    "(or on CIFAR with --dataset, the same settings at 32x32) "
                    "and write NAME.json (every number it plots) and NAME.png. hessian: SGD "
                    "and SAM from the same start, the top 5 Hessian eigenvalues (Lanczos) every "
                    "2 epochs, lambda_max and lambda_max / lambda_5 (sec. 4.2, Fig. 3 left). "
                    "m-sharpness: m-SAM on a grid of m and rho, test error against rho, and the "
                    "rank correlation of each m-sharpness (first-order and projected ascent) "
                    "with the generalisation gap (sec. 4.1, Fig. 3 middle and right). "
                    "label-noise: SGD (last epoch and early stopped on a clean validation "
                    "split), SAM (rho chosen on that split) and bootstrapped SAM at 20% to 80% "
                    "symmetric label noise, printed beside the paper's Table 4 (sec. 3.3).")
    e.add_argument("name", choices=EXPERIMENTS, help="the experiment")
    e.add_argument("--out", metavar="DIR", help="where the JSON and PNG go (default "
                   "runs/experiment-NAME)")
    e.add_argument("--quick", action="store_true",
                   help="a smaller model, image size and budget: seconds, for tests")
    e.add_argument("--epochs", type=int, help="training epochs (default: the experiment's)")
    e.add_argument("--dataset", choices=EXPERIMENT_DATASETS, default="digits",
                   help="digits (embedded, default) or CIFAR at 32x32 from --data-dir or "
                        "tensorflow-datasets; give a GPU, a larger --model and more --epochs")
    e.add_argument("--data-dir", metavar="DIR", help="CIFAR: the folder holding "
                   "cifar-10-python.tar.gz / cifar-100-python.tar.gz (or tfds' data_dir)")
    e.add_argument("--model", metavar="NAME", help="a WideResnet, wrnDEPTH_WIDTH (e.g. "
                   "wrn16_4); default: the experiment's (wrn10_1 or wrn10_2)")
    e.add_argument("--batch-size", type=int, help="default: the experiment's")
    e.add_argument("--rho", type=float, default=0.05,
                   help="hessian: SAM's rho (default 0.05); m-sharpness and label-noise "
                        "train a grid of rho")
    e.add_argument("--fair-sgd", action="store_true", help=FAIR_SGD + "; default: SGD "
                   "trains as many epochs as SAM (the record's sgd_baseline says which)")
    e.add_argument("--batch-norm", action="store_true",
                   help="hessian: the WideResnet with batch norm (default: without, as the "
                        "paper measured it)")
    e.add_argument("--device", choices=DEVICES, default="cpu",
                   help="train on the CPU or a GPU (the Hessian is measured on the CPU, in "
                        "float64); default cpu")
    e.add_argument("--seed", type=int, default=0, help="default 0")
    e.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    return e, cmd_experiment


COMMANDS = (_demo_parser, _train_parser, _eval_parser, _plot_parser, _verify_parser,
            _bench_parser, _experiment_parser)


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

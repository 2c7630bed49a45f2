"""The ``minisam`` command line. User mistakes print one line and exit with status 2."""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag value, missing file): one line, exit status 2."""


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minisam",
        description="Sharpness-Aware Minimization from scratch in NumPy/CuPy.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UserError, ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"minisam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minisam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

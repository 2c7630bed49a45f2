"""gpu_check: minisam against PyTorch from the benchmark rows in OUT/bench_*.json.

    python benchmarks/gpu_check/ratios.py OUT [--expect wrn16_8,wrn28_10]

Reads every OUT/bench_*.json (benchmarks/run_all.py results with a "rows" list, a list of
rows, or one row as `minisam bench --json` writes it), prints a table of the rows and one
RATIO line per model and precision, and writes OUT/bench_summary.json. A row's precision
is its "tf32" field (true: tf32, false: fp32), or, where a row has none (error rows), "tf32"
if the file's name says so, else fp32.

Ratios are minisam / torch: throughput > 1 means minisam is faster; memory is minisam's
peak of live bytes (a CuPy MemoryHook) over torch.cuda.max_memory_allocated, both peaks
of live tensors, > 1 means minisam needs more. The CuPy pool's total (cached blocks
included, `pool_mb`) is printed beside it, not compared.

Exit status 1 if there are no rows, or if any model seen (or named in --expect) has no
fp32 minisam row or one with an error."""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

MINISAM, TORCH = "minisam", "pytorch-eager"


def precision(row: dict, filename: str) -> str:
    if row.get("tf32") is not None:
        return "tf32" if row["tf32"] else "fp32"
    return "tf32" if "tf32" in filename else "fp32"


def load_rows(out: str) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
        name = os.path.basename(path)
        if name == "bench_summary.json":
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{name}: unreadable ({e})")
            continue
        got = data["rows"] if isinstance(data, dict) and "rows" in data else (
            data if isinstance(data, list) else [data])
        for r in got:
            if not isinstance(r, dict):
                continue
            r = dict(r, file=name)
            r["precision"] = precision(r, name)
            rows.append(r)
    return rows


def _ratio(a, b):
    return a / b if a and b else None


def _find(rows, model, prec, framework):
    return next((r for r in rows if r.get("model") == model and r["precision"] == prec
                 and r.get("framework") == framework), None)


def summarize(rows: list, expect=()) -> tuple:
    """One dict per (model, precision) that has a minisam or torch row; and the models
    whose fp32 minisam row is missing or failed."""
    summary, bad = [], []
    models = sorted({r.get("model") for r in rows if r.get("model")} | set(expect))
    for model in models:
        fp32 = _find(rows, model, "fp32", MINISAM)
        if fp32 is None or fp32.get("error"):
            bad.append(model)
        for prec in ("fp32", "tf32"):
            ms, pt = _find(rows, model, prec, MINISAM), _find(rows, model, prec, TORCH)
            if ms is None and pt is None:
                continue
            m, t = ms or {}, pt or {}
            summary.append({
                "model": model, "precision": prec,
                "minisam_sam_ms": m.get("sam_ms"), "torch_sam_ms": t.get("sam_ms"),
                "minisam_sgd_ms": m.get("sgd_ms"), "torch_sgd_ms": t.get("sgd_ms"),
                "sam_throughput_ratio_minisam_over_torch": _ratio(m.get("sam_images_per_s"),
                                                                  t.get("sam_images_per_s")),
                "sgd_throughput_ratio_minisam_over_torch": _ratio(m.get("sgd_images_per_s"),
                                                                  t.get("sgd_images_per_s")),
                "minisam_peak_memory_mb": m.get("peak_memory_mb"),
                "torch_peak_memory_mb": t.get("peak_memory_mb"),
                "peak_memory_ratio_live_over_torch_allocated": _ratio(
                    m.get("peak_memory_mb"), t.get("peak_memory_mb")),
                "minisam_peak_memory_kind": m.get("peak_memory_kind"),
                "torch_memory_kind": t.get("memory_kind"),
                "minisam_pool_mb": m.get("pool_mb"),
                "minisam_error": m.get("error") if ms else "no row",
                "torch_error": t.get("error") if pt else "no row",
            })
    return summary, bad


def fmt(v, spec: str) -> str:
    """A number, or a '-' as wide as the number would be."""
    if v is None:
        return format("-", ">" + (re.match(r"\d*", spec).group(0) or "1"))
    return format(v, spec)


def table(rows: list) -> str:
    lines = [f"{'model':9s} {'prec':5s} {'framework':15s} {'SGD ms':>9s} {'SAM ms':>9s} "
             f"{'SAM img/s':>10s} {'SAM/SGD':>8s} {'peak MiB':>9s} {'pool MiB':>9s}  error"]
    for r in rows:
        lines.append(
            f"{str(r.get('model', '?')):9s} {r['precision']:5s} {str(r.get('framework', '?')):15s} "
            f"{fmt(r.get('sgd_ms'), '9.1f')} {fmt(r.get('sam_ms'), '9.1f')} "
            f"{fmt(r.get('sam_images_per_s'), '10.1f')} {fmt(r.get('sam_sgd_ratio'), '8.2f')} "
            f"{fmt(r.get('peak_memory_mb'), '9.0f')} {fmt(r.get('pool_mb'), '9.0f')}  "
            f"{(r.get('error') or '')[:70]}")
    return "\n".join(lines)


def ratio_line(s: dict) -> str:
    line = (f"RATIO {s['model']} {s['precision']}: SAM throughput minisam/torch = "
            f"{fmt(s['sam_throughput_ratio_minisam_over_torch'], '.2f')} "
            f"(SAM {fmt(s['minisam_sam_ms'], '.1f')} ms vs {fmt(s['torch_sam_ms'], '.1f')} ms), "
            f"SGD {fmt(s['sgd_throughput_ratio_minisam_over_torch'], '.2f')}, "
            f"memory (peak live vs torch max allocated) "
            f"{fmt(s['peak_memory_ratio_live_over_torch_allocated'], '.2f')}")
    if s.get("minisam_pool_mb") is not None:
        line += f", CuPy pool {s['minisam_pool_mb']:.0f} MiB"
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the gpu_check output folder")
    p.add_argument("--expect", default="",
                   help="comma-separated models that must have an fp32 minisam row")
    args = p.parse_args(argv)
    expect = [m for m in args.expect.split(",") if m]
    rows = load_rows(args.out)
    print(table(rows))
    summary, bad = summarize(rows, expect)
    for s in summary:
        print(ratio_line(s))
    for model in bad:
        print(f"MISSING {model}: no fp32 minisam row without an error")
    with open(os.path.join(args.out, "bench_summary.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary, "failed_models": bad}, f, indent=1)
    if not rows:
        print("no benchmark rows found")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

"""``minisam verify``: is minisam the reference's computation, up to float32 noise?

The pass criterion is **step-wise** (teacher-forced): step k starts from the reference's own
parameters, momentum and per-replica BN state after step k-1, runs one SAM step and is
compared with the reference's step k, so every step is an independent check of the whole
SAM step. A **chained** run (every step from our own previous state, as training does) is
reported beside it, with float64 runs of both kinds: on a case with many replicas, few
images each and several steps, float32 noise (ReLU ties above all, see ``ties``) makes the
chained run drift from the reference within a step or two although every step agrees, and
the float64 columns show that drift is noise, not a bug.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .backend import set_tf32, tf32_enabled
from .reference import GRAD_RTOL, VALUE_RTOL, compare, load_case, run_case, sync_modes
from .ties import ReluTies, candidates, disagreements


@dataclass
class Report:
    """What ``verify_case`` found. ``rows`` (float32, step-wise, with the ties in ``ties``
    set to the reference's side) is the pass criterion; the rest shows how much float32
    chaos the case has: the chained run (every step from our own previous step, with the
    same ties set where they are still ties) and float64 runs of both kinds."""
    rows: list
    ties: list                    # [(site, value)], every flip kept
    rows64: list                  # float64, step-wise
    chained: list | None = None   # float32, chained
    chained64: list | None = None  # float64, chained

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def verify(npz_path: str, device: str = "cpu", resolve_ties: bool = True):
    """``verify_case`` without the chained runs; returns (step-wise rows, ties flipped)."""
    report = verify_case(npz_path, device, resolve_ties, chained=False)
    return report.rows, report.ties


ACCEPT = 0.75   # a flip is kept if it cuts the step's squared distance to the reference by 25%


def verify_case(npz_path: str, device: str = "cpu", resolve_ties: bool = True,
                chained: bool = True, max_trials: int = 96) -> Report:
    """``_verify_case`` in plain float32 GEMMs whatever the process's TF32 setting: TF32's
    relative error (about 1e-3) is a hundred times the tolerance (``backend.set_tf32``)."""
    was = tf32_enabled()
    set_tf32(False)
    try:
        return _verify_case(npz_path, device, resolve_ties, chained, max_trials)
    finally:
        set_tf32(was)


def _verify_case(npz_path: str, device: str = "cpu", resolve_ties: bool = True,
                 chained: bool = True, max_trials: int = 96) -> Report:
    """Load one case, run every step from the reference's own previous state, compare.

    If a step fails and ``resolve_ties``, its candidate ReLU ties (``ties.ReluTies``: inputs
    within float32 noise of zero, the noise measured against a float64 run of the same step
    that takes the sides set so far) are settled in two moves:

    1. the candidates float32 and float64 put on different sides are set to float64's side
       (the first pass, then the perturbed pass it leads to), if that brings the step closer
       to the reference; then each is undone again where that helps (float64's side need
       not be the reference's);
    2. the other candidates are tried on the other side of the kink one at a time, closest
       to zero first; a flip is kept if it cuts the step's squared distance to the reference
       by a quarter (several ties may share the error), and then the others get a new try.
       At most ``max_trials`` tries a step.

    A try re-runs only that step and sync mode and, where the change reaches the other
    replicas only through the final all-reduce, only that replica (the others' trees
    replayed). Every tie set is returned for the caller to print: nothing is hidden."""
    arrays, manifest = load_case(npz_path)
    modes, replicas = sync_modes(manifest["config"]), int(manifest["config"]["replicas"])
    per_replica = set(manifest.get("per_replica_keys", []))
    posted: dict = {}

    def stepwise(steps=None, mode=None, sides=None, log=posted):
        """A step-wise run in float64 (taking ``sides``) and in float32 measured against it
        (what the replicas post to collectives goes to ``log``)."""
        record = ReluTies(sides=sides, record=True, force=True)
        modes_ = None if mode is None else [mode]
        out64 = run_case(arrays, manifest, device, record, teacher=True, steps=steps,
                         modes=modes_, dtype=np.float64)
        watch = ReluTies(sides=sides, reference=record.inputs)
        out = run_case(arrays, manifest, device, watch, teacher=True, steps=steps,
                       modes=modes_, posted=log)
        return out, out64, watch, record.inputs

    def merge(into, part, mode=None, rank=None):
        out = dict(into)
        for k, v in part.items():
            if k.startswith("init/") and mode not in (None, modes[0]):
                continue                        # init/* comes from the first mode
            if rank is not None and k in per_replica:
                v, v[rank] = into[k].copy(), v
            out[k] = v
        return out

    def try_sides(trial, site, step):
        """The step's distance with ``trial`` sides: a float32 run of that step and mode only,
        of that replica only where its change reaches the others through the last all-reduce."""
        (mode, rank), call = site[0], site[3]
        lone = rank if replicas > 1 and (not mode or call == 1) else None
        part = run_case(arrays, manifest, device, ReluTies(sides=trial, reference=inputs),
                        teacher=True, steps=[step], modes=[mode], posted=posted, alone=lone)
        return _distance(arrays, merge(ours, part, mode, lone), step)

    def settle(sides, mode, step, found):
        """Run the step again in full with ``sides``, float64 taking the same sides."""
        part, part64, w, more = stepwise([step], mode, sides)
        new, new64 = merge(ours, part, mode), merge(ours64, part64, mode)
        inputs.update(more)
        return (new, new64, compare(arrays, new, manifest), _distance(arrays, new, step),
                w.found + [c for c in found if c[0][0][0] != mode])

    ours, ours64, watch, inputs = stepwise()
    scale = {k: max(1.0, float(np.abs(x).max())) for k, x in inputs.items()}
    rows, sides, kept = compare(arrays, ours, manifest), {}, []
    for step in range(1, int(manifest["config"]["num_steps"]) + 1) if resolve_ties else ():
        found, tried, trials = watch.found, set(), 0
        dist = _distance(arrays, ours, step)
        for call in (0, 1):  # the first pass's disagreements, then the perturbed pass's
            bulk = disagreements(found, step, call, sides)
            if _score(rows, step) == 0:
                break
            if not bulk:
                continue
            log: dict = {}
            part, part64, w, more = stepwise([step], None, {**sides, **bulk}, log)
            if _distance(arrays, merge(ours, part), step) >= dist:
                break
            sides = {**sides, **bulk}
            kept += [(site, v) for site, v, _, _ in found if site in bulk]
            ours, ours64 = merge(ours, part), merge(ours64, part64)
            rows, dist = compare(arrays, ours, manifest), _distance(arrays, ours, step)
            posted.update(log)
            inputs.update(more)
            found = w.found
            for site in bulk if _score(rows, step) > 0 else ():
                trial = {s: v for s, v in sides.items() if s != site}   # float64's side
                if try_sides(trial, site, step) < ACCEPT * dist:     # need not be the reference's
                    sides = trial
                    kept = [(s, v) for s, v in kept if s != site]
                    ours, ours64, rows, dist, found = settle(sides, site[0][0], step, found)
        while _score(rows, step) > 0 and trials < max_trials:
            fresh = [c for c in candidates(found, step, scale) if c[0] not in tried]
            for site, value, _, _ in fresh[:max_trials - trials]:
                tried.add(site)
                trials += 1
                trial = {**sides, site: not value > 0}
                if try_sides(trial, site, step) < ACCEPT * dist:
                    sides = trial
                    kept.append((site, value))
                    ours, ours64, rows, dist, found = settle(sides, site[0][0], step, found)
                    tried = set(sides)      # with this side set, the others deserve a new try
                    break
            else:
                break                       # no candidate helped
    report = Report(rows, kept, compare(arrays, ours64, manifest))
    if chained:
        report.chained = compare(arrays, run_case(arrays, manifest, device,
                                                  ReluTies(sides=sides)), manifest)
        report.chained64 = compare(arrays, run_case(arrays, manifest, device,
                                                    dtype=np.float64), manifest)
    return report


def _distance(arrays: dict, ours: dict, step: int) -> float:
    """Squared distance to the reference over the keys of ``step``, each key relative to
    its largest magnitude (what a tie on the wrong side adds to)."""
    d = 0.0
    for k, ref in arrays.items():
        if k.startswith(("input/", "init/params/", "init/state/")) or _step_of(k) != step:
            continue
        b = np.asarray(ref, np.float64)
        top = float(np.abs(b).max()) if b.size else 0.0
        d += float(np.sum((np.asarray(ours[k], np.float64) - b) ** 2)) / (top * top or 1.0)
    return d


def _step_of(group: str) -> int:
    m = re.search(r"(?:^|/)step(\d+)/", group)
    return int(m.group(1)) if m else 1   # init/* and sam/* belong to the first step


def _score(rows, step):
    """How far a step is from passing: sum over its failing groups of log10(error / tol)."""
    return sum(max(0.0, np.log10(max(r.max_rel if r.kind == "rel" else r.max_abs, 1e-30) / r.tol))
               for r in rows if _step_of(r.group) == step)


def per_step(rows) -> dict:
    """{step: (worst rel err on values, worst rel err on the rest, all pass)}."""
    out = {}
    for r in rows:
        v, g, ok = out.get(_step_of(r.group), (0.0, 0.0, True))
        if r.kind == "rel":
            v, g = (max(v, r.max_rel), g) if r.tol == VALUE_RTOL else (v, max(g, r.max_rel))
        out[_step_of(r.group)] = (v, g, ok and r.ok)
    return dict(sorted(out.items()))


def format_steps(report: Report) -> str:
    """Per step, the worst relative error (values / the rest) of every run of the report;
    only the step-wise float32 run is judged (ok / FAIL), the others show the chaos."""
    runs = [("step-wise (judged)", report.rows), ("chained", report.chained),
            ("float64 step-wise", report.rows64), ("float64 chained", report.chained64)]
    runs = [(name, per_step(rows)) for name, rows in runs if rows is not None]
    lines = ["step" + "".join(f"{name:>26s}" for name, _ in runs)]
    for step in runs[0][1]:
        cells = []
        for i, (_, table) in enumerate(runs):
            v, g, ok = table.get(step, (float("nan"), float("nan"), False))
            cells.append(f"{v:8.1e} / {g:7.1e}" + ((" ok  " if ok else " FAIL") if i == 0 else ""))
        lines.append(f"{step:<4d}" + "".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)

"""The verification machinery on cases made without JAX (tests/casegen.py): minisam's float64
run is the reference, on many replicas with a few images each, several steps, and float32
ReLU ties planted on purpose. Checks step-wise (teacher-forced) runs, per-replica BN state,
the replayed lone-replica runs of the tie search, the tie search itself, and the CLI."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from casegen import FIRST_RELU, make_case  # noqa: E402

from minisam.cli import main  # noqa: E402
from minisam.reference import compare, load_case, run_case  # noqa: E402
from minisam.verify import per_step, verify_case  # noqa: E402


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """4 replicas of 3 images, 100 classes, WRN-10-1 on 8x8 images, 4 steps, rho 0.1,
    label smoothing 0.1, per-replica perturbations, two ties planted in step 1."""
    path, sites = make_case(tmp_path_factory.mktemp("cases"), "planted", replicas=4,
                            per_replica=3, classes=100, steps=4, plant=2)
    return path, sites


def test_float64_step_wise_run_reproduces_the_float64_reference(planted):
    """Step k from the stored state after step k-1 (each replica its own BN state): in
    float64 that is the reference's own computation, so only the float32 storage differs."""
    arrays, manifest = load_case(planted[0])
    assert any("/state/" in k for k in manifest["per_replica_keys"])   # BN state per replica
    rows = compare(arrays, run_case(arrays, manifest, teacher=True, dtype=np.float64), manifest)
    assert max(r.max_rel for r in rows if r.kind == "rel") < 1e-6
    # the same run with every replica given replica 0's BN state is far off
    bad = dict(arrays)
    for k in manifest["per_replica_keys"]:
        if "/state/" in k and k.startswith("step"):
            bad[k] = np.broadcast_to(arrays[k][:1], arrays[k].shape)
    rows = compare(arrays, run_case(bad, manifest, teacher=True, dtype=np.float64), manifest)
    assert max(r.max_rel for r in rows if r.kind == "rel") > 1e-3


def test_a_lone_replica_replayed_matches_the_full_run_bitwise(planted):
    arrays, manifest = load_case(planted[0])
    posted = {}
    full = run_case(arrays, manifest, teacher=True, steps=[2], posted=posted)
    lone = run_case(arrays, manifest, teacher=True, steps=[2], posted=posted, alone=2)
    per = set(manifest["per_replica_keys"])
    assert lone.keys() == full.keys()
    for k, v in lone.items():
        np.testing.assert_array_equal(v, full[k][2] if k in per else full[k], err_msg=k)


def test_planted_ties_fail_the_raw_comparison_and_verify_finds_them(planted):
    path, sites = planted
    raw = verify_case(path, resolve_ties=False, chained=False)
    assert not per_step(raw.rows)[1][2]                   # step 1 fails without the ties
    report = verify_case(path)
    assert report.ok, [(r.group, r.max_rel) for r in report.rows if not r.ok]
    found = {(site[0][1], site[4]) for site, _ in report.ties
             if site[1] == 1 and site[2] == FIRST_RELU and site[3] == 0}
    assert set(sites) <= found
    assert all(abs(v) < 1e-4 for _, v in report.ties)
    assert len(report.chained) == len(report.rows) and report.chained64 is not None


def test_synced_perturbations_case_passes_step_wise(tmp_path):
    path, _ = make_case(tmp_path, "synced", replicas=3, per_replica=2, steps=3, sync=True,
                        classes=10, plant=1)
    assert verify_case(path, chained=False).ok


def test_cli_prints_step_wise_chained_and_float64(planted, capsys):
    code = main(["verify", planted[0], "--float64"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out
    assert "float32 tie set to the reference's side" in out
    assert "the same steps in float64" in out
    assert "step-wise (judged)" in out and "float64 chained" in out
    table = out[out.index("step-wise (judged)"):].splitlines()[1:5]
    assert [line.split()[0] for line in table] == ["1", "2", "3", "4"]

"""The shipped JAX reference cases, through the same code as `minisam verify`."""
import json
import os
import shutil

import numpy as np
import pytest

from minisam import cli
from minisam.reference import compare, load_case, run_case
from minisam.verify import verify

ROOT = os.path.join(os.path.dirname(__file__), "..", "reference_results")
CASES = ["wrn10x2_single", "wrn10x2_two_replicas", "wrn10x2_label_smoothing"]


@pytest.mark.parametrize("case", CASES)
def test_reference_case_passes(case):
    rows, ties = verify(os.path.join(ROOT, case + ".npz"))
    failing = [(r.group, r.max_rel) for r in rows if not r.ok]
    assert not failing, failing
    assert len(ties) <= 3   # a handful of float32 ReLU ties at most, each reported
    values = [r for r in rows if r.tol == 1e-5]
    assert values and max(r.max_rel for r in values) <= 1e-5


def test_a_single_relu_tie_moves_gradients_past_tolerance():
    """Why verify resolves float32 ties: one ReLU input within ~1e-6 of zero, put on the
    other side of the kink, changes the SAM gradient far beyond the 1e-4 tolerance.

    Which side this machine's float32 lands on depends on the BLAS kernel and thread count,
    so the test starts from the flips ``verify`` keeps (none on some machines, one on
    others) and toggles the closest tie of step 1's perturbed pass from there."""
    from minisam.ties import TIE_TOL, ReluTies
    case = os.path.join(ROOT, "wrn10x2_single.npz")
    arrays, manifest = load_case(case)
    rows, kept = verify(case)
    assert all(r.ok for r in rows)
    sides = {site: not value > 0 for site, value in kept}
    ties = ReluTies(sides=sides)
    base = compare(arrays, run_case(arrays, manifest, ties=ties, teacher=True), manifest)
    assert all(r.ok for r in base)
    step1 = [(site, v) for site, v, _, _ in ties.found if site[1] == 1 and site[3] == 1]
    assert step1 and all(abs(v) <= TIE_TOL * 10 for _, v in step1)
    site, value = min(step1, key=lambda t: abs(t[1]))
    toggled = {k: v for k, v in sides.items() if k != site}
    if site not in sides:
        toggled[site] = not value > 0
    flipped = compare(arrays, run_case(arrays, manifest, ties=ReluTies(sides=toggled),
                                       teacher=True), manifest)
    bad = {r.group for r in flipped if not r.ok}
    assert "sam/grad/*" in bad and "init/grad/*" not in bad


def test_inputs_follow_the_documented_recipe():
    arrays, manifest = load_case(os.path.join(ROOT, "wrn10x2_single.npz"))
    rng = np.random.RandomState(manifest["config"]["data_seed"])
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = rng.randint(0, 10, size=8)
    np.testing.assert_array_equal(arrays["input/images"], images)
    np.testing.assert_array_equal(arrays["input/labels"], labels)


def test_headline_values():
    arrays, manifest = load_case(os.path.join(ROOT, "wrn10x2_single.npz"))
    ours = run_case(arrays, manifest)
    assert float(ours["init/loss"]) == pytest.approx(2.7396460, abs=2e-6)
    assert float(ours["sam/perturbed_loss"]) == pytest.approx(2.9484129, abs=2e-6)
    assert float(ours["step1/metrics/train_loss"]) == pytest.approx(2.6530919, abs=2e-6)


def _copy_case(tmp_path, edit):
    src = os.path.join(ROOT, "wrn10x2_label_smoothing")
    dst = tmp_path / "case"
    shutil.copy(src + ".npz", str(dst) + ".npz")
    with open(src + ".json") as f:
        manifest = json.load(f)
    edit(manifest)
    with open(str(dst) + ".json", "w") as f:
        json.dump(manifest, f)
    return str(dst) + ".npz"


def test_manifest_missing_field_is_a_clear_error(tmp_path):
    path = _copy_case(tmp_path, lambda m: m["config"].pop("sam_rho"))
    with pytest.raises(ValueError, match="lacks field.*sam_rho"):
        load_case(path)
    assert cli.main(["verify", path]) == 2


def test_config_drives_the_run(tmp_path):
    """A manifest whose config says something else (rho) no longer matches the numbers."""
    def edit(m):
        m["config"]["sam_rho"] = 0.05
    arrays, manifest = load_case(_copy_case(tmp_path, edit))
    rows = compare(arrays, run_case(arrays, manifest), manifest)
    bad = {r.group for r in rows if not r.ok}
    assert "sam/perturbation/*" in bad and "init/grad/*" not in bad


def test_cli_verify_passes_and_reports(capsys):
    assert cli.main(["verify", os.path.join(ROOT, "wrn10x2_label_smoothing.npz")]) == 0
    out = capsys.readouterr().out
    assert "sam/grad/*" in out and "PASS" in out


def test_missing_case_and_manifest(tmp_path):
    assert cli.main(["verify", str(tmp_path / "nope.npz")]) == 2
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_case(str(tmp_path / "x.npz"))


TORCH_CASES = ["davda54_sam", "davda54_asam"]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_davda54_case_passes(case):
    """davda54/sam's own optimizer class, run in PyTorch: every key of every step within
    float32 noise, under the semantics its manifest names."""
    arrays, manifest = load_case(os.path.join(ROOT, case + ".npz"))
    rows, ties = verify(os.path.join(ROOT, case + ".npz"))
    failing = [(r.group, r.max_rel) for r in rows if not r.ok]
    assert not failing, failing
    assert len(ties) <= 4
    groups = {r.group for r in rows}
    for g in ("grad/*", "perturbation/*", "sam_grad/*", "step3/params/*", "step3/momentum/*",
              "step3/state/*", "step1/state_after_pass1/*", "step3/grad_norm"):
        assert g in groups, g


@pytest.mark.parametrize("case, switch, value, fails", [
    ("davda54_sam", "perturbed_bn_stats", "discard", "step1/state/*"),
    ("davda54_sam", "weight_decay_in", "loss", "grad/*"),
    ("davda54_sam", "nesterov", False, "step1/params/*"),
    ("davda54_asam", "adaptive", "none", "perturbation/*"),
    ("davda54_asam", "adaptive", "asam", "perturbation/*"),
    ("davda54_asam", "perturbed_bn_stats", "update", "step1/state/*"),
])
def test_the_cases_tell_the_semantics_apart(case, switch, value, fails, monkeypatch):
    """Each case fails on the switch it documents when that switch is set otherwise, so a
    pass means minisam's switch does what the PyTorch code does."""
    import dataclasses
    from minisam import reference
    real = reference.torch_sam_config
    monkeypatch.setattr(reference, "torch_sam_config",
                        lambda cfg: dataclasses.replace(real(cfg), **{switch: value}))
    arrays, manifest = load_case(os.path.join(ROOT, case + ".npz"))
    rows = compare(arrays, run_case(arrays, manifest, teacher=True), manifest)
    bad = {r.group for r in rows if not r.ok}
    assert fails in bad, bad


def test_torch_manifest_missing_field_is_a_clear_error(tmp_path):
    case = os.path.join(ROOT, "davda54_sam")
    for ext in (".npz", ".json"):
        shutil.copy(case + ext, tmp_path / ("c" + ext))
    with open(tmp_path / "c.json") as f:
        m = json.load(f)
    del m["config"]["grad_norm_eps"]
    m["config"]["lr_per_step"] = [0.1]
    with open(tmp_path / "c.json", "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match="lacks field.*grad_norm_eps"):
        load_case(str(tmp_path / "c.npz"))
    m["config"]["grad_norm_eps"] = 1e-12
    with open(tmp_path / "c.json", "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match="lr_per_step.*one value per step"):
        load_case(str(tmp_path / "c.npz"))
    m["config"]["lr_per_step"] = [0.1, 0.1, 0.1]
    m["config"]["variant"] = "gsam"
    with open(tmp_path / "c.json", "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match="runs variant 'gsam'"):
        load_case(str(tmp_path / "c.npz"))

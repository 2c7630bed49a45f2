"""GSAM, LookSAM and micro-batch m-SAM (minisam.variants): each reduces to SAM where its
paper says it does, and each is checked against its definition, in float64."""
import numpy as np
import pytest

from minisam.distributed.local import run_replicas
from minisam.models import WideResnet
from minisam.optim import nesterov_init
from minisam.sam import SAMConfig, train_step
from minisam.variants import (gsam_official_schedule, gsam_rho, gsam_step, looksam_step,
                              microbatch_step)


def problem(seed=0, n=8):
    rng = np.random.default_rng(seed)
    model = WideResnet(1, 1, 4, seed=seed)
    params = {k: v.astype(np.float64) for k, v in model.get_params().items()}
    state = {k: v.astype(np.float64) for k, v in model.get_state().items()}
    return model, params, state, rng.standard_normal((n, 8, 8, 3)), rng.integers(0, 4, n)


def run(step_fn, cfg, seed=0, n=8, **kw):
    model, params, state, x, y = problem(seed, n)
    trace = {}
    out = step_fn(model, params, state, nesterov_init(params), x, y, 0.1, cfg, trace=trace, **kw)
    return out, trace


def close(a, b, rtol=1e-10, atol=1e-13):
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def inner(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


CFG = SAMConfig(rho=0.1, gradient_clipping=0.0)


def test_gsam_with_alpha_zero_is_sam():
    (p, s, m, _), _ = run(gsam_step, CFG, alpha=0.0)
    (p0, s0, m0, _), _ = run(train_step, CFG)
    close(p, p0), close(s, s0), close(m, m0)


def test_gsam_descends_along_g_s_minus_alpha_times_the_part_of_g_orthogonal_to_g_s():
    alpha = 0.4
    (_, _, m, _), trace = run(gsam_step, CFG, alpha=alpha)
    g, g_s = trace["grad"], trace["sam_grad"]
    proj = inner(g, g_s) / inner(g_s, g_s)                  # g = proj g_s + g_orth
    g_orth = {k: g[k] - proj * g_s[k] for k in g}
    assert abs(inner(g_orth, g_s)) < 1e-10 * inner(g_s, g_s)
    close(m, {k: g_s[k] - alpha * g_orth[k] for k in g})    # first momentum = the gradient


def test_gsam_rho_follows_the_learning_rate():
    assert gsam_rho(0.1, 0.1, 0.05, 0.01) == pytest.approx(0.05)
    assert gsam_rho(0.0, 0.1, 0.05, 0.01) == pytest.approx(0.01)
    assert gsam_rho(0.05, 0.1, 0.05, 0.01) == pytest.approx(0.03)
    assert gsam_rho(0.07, 0.07, 2.0, 2.0, lr_min=0.07) == 2.0     # constant lr: rho_max


def test_gsam_official_schedule_as_its_example_wires_it():
    """juntang-zhuang/GSAM example/train.py: step 1 at the optimizer's lr with rho_min (the
    CosineScheduler reports 0.0 before its first step), step 2 at base lr with rho_max,
    then the cosine one step behind minisam's cosine_schedule."""
    at = gsam_official_schedule(0.1, total_steps=10, rho_max=0.05, rho_min=0.01)
    assert at(1) == (0.1, pytest.approx(0.01))
    assert at(2) == (0.1, pytest.approx(0.05))
    lr3, rho3 = at(3)
    assert lr3 == pytest.approx(0.1 * (np.cos(np.pi / 10) + 1) / 2)
    assert rho3 == pytest.approx(0.01 + 0.04 * lr3 / 0.1)
    with pytest.raises(ValueError, match="from 1"):
        at(0)


def test_looksam_with_k_1_is_sam_every_step():
    model, params, state, x, y = problem(1)
    mom, g_v = nesterov_init(params), None
    ref = (params, state, nesterov_init(params))
    for step in range(3):
        params, state, mom, _, g_v = looksam_step(model, params, state, mom, x, y, 0.1, CFG,
                                                  step=step, k=1, alpha=0.7, g_v=g_v)
        ref = train_step(model, *ref[:2], ref[2], x, y, 0.1, CFG)[:3]
        close(params, ref[0]), close(mom, ref[2])


def test_looksam_reuses_the_orthogonal_part_between_full_steps():
    alpha = 0.7
    model, params, state, x, y = problem(2)
    trace = {}
    p1, s1, m1, _, g_v = looksam_step(model, params, state, nesterov_init(params), x, y, 0.1,
                                      CFG, step=0, k=2, alpha=alpha, trace=trace)
    g, g_s = trace["grad"], trace["sam_grad"]
    assert abs(inner(g_v, g)) < 1e-10 * inner(g_s, g_s)      # g_v is orthogonal to g ...
    close(g_v, {k: g_s[k] - inner(g_s, g) / inner(g, g) * g[k] for k in g})   # ... the rest of g_s
    trace2 = {}
    p2, _, m2, _, g_v2 = looksam_step(model, p1, s1, m1, x, y, 0.1, CFG, step=1, k=2,
                                      alpha=alpha, g_v=g_v, trace=trace2)
    assert g_v2 is g_v                                        # kept, not recomputed
    assert "sam_grad" not in trace2                           # one pass only
    from minisam.sam import loss_and_grad
    from minisam.nn import one_hot
    model.set_state(s1)
    g1 = loss_and_grad(model, p1, x, one_hot(y, 4), CFG)[3]
    n1, nv = np.sqrt(inner(g1, g1)), np.sqrt(inner(g_v, g_v))
    want = {k: g1[k] + alpha * n1 / nv * g_v[k] for k in g1}
    close(m2, {k: 0.9 * m1[k] + want[k] for k in want})


@pytest.mark.parametrize("sync", [False, True])
def test_one_micro_batch_is_sam(sync):
    cfg = SAMConfig(rho=0.1, gradient_clipping=0.0, sync_perturbations=sync)
    (p, s, m, _), _ = run(microbatch_step, cfg, m=8)
    (p0, s0, m0, _), _ = run(train_step, cfg)
    close(p, p0), close(s, s0), close(m, m0)


@pytest.mark.parametrize("sync", [False, True])
def test_micro_batches_are_replicas_in_one_process(sync):
    """4 micro-batches of 2 in one process = 4 thread replicas of 2 images, per-replica
    perturbations (m-sharpness) or synced ones (SAM-correct gradient accumulation): the
    same parameters and momentum, and the BN state is the replicas' mean."""
    cfg = SAMConfig(rho=0.1, sync_perturbations=sync)
    (p, s, m, metrics), _ = run(microbatch_step, cfg, m=2)
    model0, params, state, x, y = problem()

    def replica(rank, comm):
        model = WideResnet(1, 1, 4, seed=0)
        sl = slice(2 * rank, 2 * rank + 2)
        return train_step(model, params, state, nesterov_init(params), x[sl], y[sl], 0.1, cfg,
                          comm)
    results = run_replicas(4, replica)
    close(p, results[0][0], rtol=1e-12), close(m, results[0][2], rtol=1e-12)
    close(s, {k: sum(r[1][k] for r in results) / 4 for k in s}, rtol=1e-12)
    assert float(metrics["train_loss"]) == pytest.approx(
        np.mean([float(r[3]["train_loss"]) for r in results]), rel=1e-12)


def test_micro_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="must divide the replica's batch of 8, got 3"):
        run(microbatch_step, CFG, m=3)
    with pytest.raises(ValueError, match="restore='copy'"):
        run(microbatch_step, SAMConfig(restore="subtract"), m=2)


@pytest.mark.parametrize("flags", [["--sam-variant", "gsam", "--rho-min", "0.02"],
                                   ["--micro-batch", "16"],
                                   ["--micro-batch", "16", "--sync-perturbations"]])
def test_training_runs_end_to_end_with_each_variant(flags, tmp_path, capsys):
    import json
    import os
    from minisam.cli import main
    run = str(tmp_path / "run")
    code = main(["train", "--dataset", "digits", "--image-size", "8", "--model", "wrn10_1",
                 "--epochs", "3", "--batch-size", "64", "--rho", "0.1", "--no-progress",
                 "--out", run, *flags])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert np.isfinite(last["train_loss"]) and last["test_error_rate"] < 0.2


@pytest.mark.parametrize("fields, needle", [
    (dict(micro_batch=5), r"micro_batch must be 0 \(off\) or divide the 32 examples"),
    (dict(micro_batch=8, sam_variant="gsam"), "goes with sam_variant 'sam' only"),
    (dict(sam_variant="lookahead"), "unknown sam variant 'lookahead'"),
    (dict(sam_variant="looksam", rho=0.0), "looksam' needs rho > 0"),
    (dict(sam_variant="looksam", looksam_k=0), "looksam_k must be a positive integer"),
    (dict(rho_min=0.5), r"rho_min must be in \[0, rho=0.05\]"),
    (dict(gsam_alpha=-1.0), "gsam_alpha must be >= 0"),
])
def test_bad_variant_settings_are_one_clear_error(fields, needle):
    from minisam.config import TrainConfig
    with pytest.raises(ValueError, match=needle):
        TrainConfig(dataset="digits", model="wrn10_1", batch_size=32, **fields)


def test_gsam_in_the_trainer_moves_rho_with_the_learning_rate(monkeypatch):
    """The Trainer's GSAM step runs at rho = rho_min + (rho - rho_min) lr / lr_max."""
    from minisam import variants
    from minisam.config import TrainConfig
    seen = []
    real = variants.gsam_step
    monkeypatch.setattr(variants, "gsam_step",
                        lambda *a, **k: seen.append((a[6], a[7].rho)) or real(*a, **k))
    cfg = TrainConfig(dataset="digits", model="wrn10_1", rho=0.1, rho_min=0.02,
                      sam_variant="gsam", lr=0.2)
    step = cfg.step_function()
    model, params, state, x, y = problem()
    for lr in (0.2, 0.1, 0.0):
        step(model, params, state, nesterov_init(params), x, y, lr, cfg.sam_config())
    assert [rho for _, rho in seen] == pytest.approx([0.1, 0.06, 0.02])


def test_bench_reports_each_variant_with_its_passes_per_step():
    from minisam.bench import bench, format_result
    r = bench("wrn10_1", 8, warmup=0, steps=1, variants=True)
    v = r["variants"]
    assert set(v) == {"sgd", "sam", "gsam", "looksam", "m-sam"}
    assert [v[k]["passes_per_step"] for k in ("sgd", "sam", "gsam", "m-sam")] == [1, 2, 2, 2]
    assert v["looksam"]["passes_per_step"] == pytest.approx(1.2)     # k = 5
    assert all(x["ms"] > 0 for x in v.values()) and v["sgd"]["vs_sgd"] == 1.0
    assert "looksam" in format_result(r) and "passes per step" in format_result(r)


def test_the_published_setups_carry_their_implementations_semantics():
    from minisam.presets import preset
    asam = preset("cifar10-wrn16_8-davda54-asam")
    assert (asam["rho"], asam["adaptive"], asam["nesterov"], asam["weight_decay_in"],
            asam["perturbed_bn_stats"], asam["gradient_clipping"]) == (
        2.0, "davda54", False, "optimizer", "discard", 0.0)
    assert preset("cifar10-wrn16_8-davda54-sam")["adaptive"] == "none"
    official = preset("cifar10-wrn28_10-asam-official")
    assert (official["rho"], official["adaptive"], official["asam_eta"], official["restore"]) == (
        0.5, "asam", 0.0, "subtract")


@pytest.mark.parametrize("replicas", [1, 2])
def test_looksam_in_the_trainer_resumes_bitwise(tmp_path, replicas):
    """LookSAM keeps each replica's g_v between full steps; the checkpoint carries it, so a
    run stopped between full steps (30 is not a multiple of k = 4) resumes exactly."""
    from minisam.config import TrainConfig
    from minisam.rundir import load_checkpoint
    from minisam.train import Trainer
    from tests.test_train import assert_same_run
    cfg = TrainConfig(dataset="digits", image_size=8, model="wrn10_1", epochs=2, batch_size=64,
                      rho=0.1, sam_variant="looksam", looksam_k=4, replicas=replicas)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(cfg, a, progress=False).fit()
    Trainer(cfg, b, progress=False, max_steps=30).fit()
    ck = load_checkpoint(b)
    assert len(ck.replica_carry) == replicas and set(ck.replica_carry[0]) == set(ck.params)
    Trainer(None, b, progress=False, resume=True).fit()
    assert_same_run(a, b)
    # without the carried g_v the resumed run differs: the carry is what makes it exact
    c = str(tmp_path / "c")
    Trainer(cfg, c, progress=False, max_steps=30).fit()
    t = Trainer(None, c, progress=False, resume=True)
    for f in t.step_fns:
        f.g_v = None
    t.fit()
    with pytest.raises(AssertionError):
        assert_same_run(a, c)


def test_looksam_trains_end_to_end_from_the_cli(tmp_path, capsys):
    import json
    import os
    from minisam.cli import main
    run = str(tmp_path / "run")
    code = main(["train", "--dataset", "digits", "--image-size", "8", "--model", "wrn10_1",
                 "--epochs", "3", "--batch-size", "64", "--rho", "0.1", "--no-progress",
                 "--sam-variant", "looksam", "--looksam-k", "5", "--out", run])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert np.isfinite(last["train_loss"]) and last["test_error_rate"] < 0.2


def test_clipping_before_the_all_reduce_clips_each_replica():
    """clip_before_sync: the mean of the replicas' clipped gradients (JAX: the clipped mean)."""
    from minisam.optim import clip_by_global_norm
    cfg = SAMConfig(rho=0.0, gradient_clipping=0.5, clip_before_sync=True)
    model, params, state, x, y = problem()

    def replica(rank, comm):
        m = WideResnet(1, 1, 4, seed=0)
        sl = slice(4 * rank, 4 * rank + 4)
        trace = {}
        out = train_step(m, params, state, nesterov_init(params), x[sl], y[sl], 0.1, cfg, comm,
                         trace)
        return out, trace
    (out0, t0), (_, t1) = run_replicas(2, replica)
    raw = [t0["grad"], t1["grad"]]
    assert all(np.sqrt(inner(g, g)) > 0.5 for g in raw)            # both get clipped
    want = {k: (clip_by_global_norm(raw[0], 0.5)[0][k] + clip_by_global_norm(raw[1], 0.5)[0][k])
            / 2 for k in raw[0]}
    close(out0[2], want)                                           # first momentum = gradient


def _replica_perturbations(cfg, replicas=4):
    model, params, state, x, y = problem(3, n=8)
    b = 8 // replicas

    def replica(rank, comm):
        m = WideResnet(1, 1, 4, seed=0)
        sl = slice(b * rank, b * rank + b)
        trace = {}
        train_step(m, params, state, nesterov_init(params), x[sl], y[sl], 0.1, cfg, comm, trace)
        return trace
    return run_replicas(replicas, replica)


def test_inner_groups_sync_the_perturbation_within_each_group():
    """JAX's --inner_group_size: with 4 replicas in groups of 2, replicas 0 and 1 perturb
    with the mean of their two gradients, 2 and 3 with theirs; group size 4 is plain
    sync and 1 is per-replica."""
    cfg = SAMConfig(rho=0.1, sync_perturbations=True, inner_group_size=2)
    traces = _replica_perturbations(cfg)
    for group in ((0, 1), (2, 3)):
        g = {k: (traces[group[0]]["grad"][k] + traces[group[1]]["grad"][k]) / 2
             for k in traces[0]["grad"]}
        n = np.sqrt(inner(g, g))
        for r in group:
            close(traces[r]["perturbation"], {k: 0.1 * v / n for k, v in g.items()},
                  rtol=1e-12)
    assert not np.allclose(traces[0]["perturbation"]["Dense_3/bias"],
                           traces[2]["perturbation"]["Dense_3/bias"])
    whole = _replica_perturbations(SAMConfig(rho=0.1, sync_perturbations=True))
    four = _replica_perturbations(SAMConfig(rho=0.1, sync_perturbations=True,
                                            inner_group_size=4))
    alone = _replica_perturbations(SAMConfig(rho=0.1))
    ones = _replica_perturbations(SAMConfig(rho=0.1, sync_perturbations=True,
                                            inner_group_size=1))
    for r in range(4):
        close(four[r]["perturbation"], whole[r]["perturbation"], rtol=0, atol=0)
        close(ones[r]["perturbation"], alone[r]["perturbation"], rtol=0, atol=0)


def test_inner_group_size_must_divide_the_replicas():
    from minisam.config import TrainConfig
    with pytest.raises(ValueError, match="inner_group_size 3 must divide the 4 replicas"):
        TrainConfig(dataset="digits", model="wrn10_1", batch_size=32, replicas=4,
                    inner_group_size=3)
    with pytest.raises(ValueError, match="inner_group_size must be an integer >= 0"):
        SAMConfig(inner_group_size=-2)


def test_the_trainer_runs_gsam_official_schedule_step_by_step_across_a_resume(tmp_path,
                                                                              monkeypatch):
    """--schedule gsam-official: the Trainer's (lr, rho) at every step is the official
    example's sequence (step 1 at rho_min, the lr one step behind), resumed or not."""
    from minisam import variants
    from minisam.config import TrainConfig
    from minisam.train import Trainer
    seen = []
    real = variants.gsam_step
    monkeypatch.setattr(variants, "gsam_step",
                        lambda *a, **k: seen.append((a[6], a[7].rho)) or real(*a, **k))
    cfg = TrainConfig(dataset="digits", image_size=8, model="wrn10_1", epochs=1, batch_size=256,
                      rho=0.1, rho_min=0.02, sam_variant="gsam", schedule="gsam-official")
    run = str(tmp_path / "run")
    t = Trainer(cfg, run, progress=False, max_steps=3)
    t.fit()
    Trainer(None, run, progress=False, resume=True).fit()
    total = t.steps_per_epoch
    at = gsam_official_schedule(0.1, total, 0.1, 0.02)
    assert len(seen) == total and seen[0] == (0.1, pytest.approx(0.02))
    for k, (lr, rho) in enumerate(seen, start=1):
        assert (lr, rho) == (pytest.approx(at(k)[0]), pytest.approx(at(k)[1]))
    with pytest.raises(ValueError, match="needs sam_variant 'gsam'"):
        TrainConfig(dataset="digits", model="wrn10_1", schedule="gsam-official")

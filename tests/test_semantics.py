"""The SAM semantics switches (sam.SAMConfig, minisam.semantics), each against its definition
written out here, in float64 on a small WideResnet."""
import json
import os

import numpy as np
import pytest

from minisam import sam as sam_mod
from minisam.cli import main
from minisam.models import WideResnet
from minisam.nn import one_hot
from minisam.optim import nesterov_init, nesterov_update
from minisam.sam import SAMConfig, loss_and_grad, train_step
from minisam.semantics import SEMANTICS, SWITCHES, semantics
from minisam.tree import global_norm


def problem(seed=0):
    rng = np.random.default_rng(seed)
    model = WideResnet(1, 1, 4, seed=seed)
    params = {k: v.astype(np.float64) for k, v in model.get_params().items()}
    state = {k: v.astype(np.float64) for k, v in model.get_state().items()}
    x = rng.standard_normal((8, 8, 8, 3))
    y = rng.integers(0, 4, 8).astype(np.int32)
    return model, params, state, x, y


def ce_grad(model, params, state, x, y):
    """The cross-entropy gradient alone, and the BN state after that forward."""
    model.set_state(state)
    _, _, _, g = loss_and_grad(model, params, x, one_hot(y, 4), SAMConfig(weight_decay=0.0))
    return g, model.get_state()


def step(cfg, seed=0, momentum=None):
    model, params, state, x, y = problem(seed)
    m0 = nesterov_init(params) if momentum is None else momentum
    trace = {}
    out = train_step(model, params, state, m0, x, y, 0.1, cfg, trace=trace)
    return out, trace, (model, params, state, x, y)


def close(a, b, rtol=1e-10):
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-13, err_msg=k)


def test_sam_config_defaults_are_the_jax_semantics():
    jax = semantics("sam_jax")
    assert set(jax) == set(SWITCHES)
    assert {k: getattr(SAMConfig(), k) for k in SWITCHES} == jax
    for name, values in SEMANTICS.items():    # every preset is a valid SAMConfig
        SAMConfig(**values)


def test_weight_decay_in_the_optimizer_is_torch_sgd():
    """d = g(w + e) + wd * w with g the cross-entropy gradient only (in e too)."""
    wd, rho = 1e-2, 0.05
    cfg = SAMConfig(rho=rho, weight_decay=wd, weight_decay_in="optimizer", gradient_clipping=0)
    (new_p, _, new_m, _), trace, (model, params, state, x, y) = step(cfg)
    g1, s1 = ce_grad(model, params, state, x, y)
    e = {k: rho * v / global_norm(g1) for k, v in g1.items()}
    g2, _ = ce_grad(model, {k: params[k] + e[k] for k in params}, s1, x, y)
    d = {k: g2[k] + wd * params[k] for k in params}
    want_p, want_m = nesterov_update(params, d, nesterov_init(params), 0.1)
    close(trace["perturbation"], e)
    close(new_m, want_m)
    close(new_p, want_p)
    assert trace["loss"] == trace["cross_entropy"]          # no L2 term in the loss


def test_norm_eps_is_added_to_the_norm():
    (_, _, _, _), trace, (model, params, state, x, y) = step(SAMConfig(rho=0.05))
    n = float(trace["grad_for_perturbation_norm"])
    (_, _, _, _), trace_eps, _ = step(SAMConfig(rho=0.05, norm_eps=n))   # eps = ||g||: half
    assert global_norm(trace_eps["perturbation"]) == pytest.approx(0.025, rel=1e-12)
    close(trace_eps["perturbation"], {k: v / 2 for k, v in trace["perturbation"].items()})


@pytest.mark.parametrize("mode", ["discard", "update"])
def test_perturbed_bn_stats(mode):
    """discard: the state after pass 1 (JAX); update: after pass 1 and then pass 2."""
    (_, new_state, _, _), trace, (model, params, state, x, y) = step(
        SAMConfig(rho=0.5, perturbed_bn_stats=mode))
    _, s1 = ce_grad(model, params, state, x, y)
    perturbed = {k: params[k] + trace["perturbation"][k] for k in params}
    _, s2 = ce_grad(model, perturbed, s1, x, y)
    close(new_state, s1 if mode == "discard" else s2)
    assert max(np.abs(s1[k] - s2[k]).max() for k in s1) > 1e-6   # the two differ here


def test_adaptive_davda54_and_official_asam_by_their_formulas():
    rho, eta = 0.5, 0.01
    _, trace_d, (model, params, state, x, y) = step(SAMConfig(rho=rho, adaptive="davda54"))
    g, _ = ce_grad(model, params, state, x, y)
    g = {k: g[k] + 5e-4 * params[k] for k in g}     # weight decay in the loss (JAX default)
    n = np.sqrt(sum(((np.abs(params[k]) * g[k]) ** 2).sum() for k in g))   # || |w| g ||
    close(trace_d["perturbation"], {k: rho * params[k] ** 2 * g[k] / n for k in g})
    _, trace_a, _ = step(SAMConfig(rho=rho, adaptive="asam", asam_eta=eta))
    t = {k: (np.ones_like(w) if k.endswith("/bias") else np.abs(w) + eta)
         for k, w in params.items()}
    assert any(k.endswith("/scale") for k in t) and any(k.endswith("/bias") for k in t)
    n = np.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in g))
    close(trace_a["perturbation"], {k: rho * t[k] ** 2 * g[k] / n for k in g})


def test_asam_with_unit_scaling_is_sam(monkeypatch):
    _, sam_trace, _ = step(SAMConfig(rho=0.3))
    monkeypatch.setattr(sam_mod, "adaptive_scale",
                        lambda params, cfg: {k: np.ones_like(w) for k, w in params.items()})
    (_, _, _, _), asam_trace, _ = step(SAMConfig(rho=0.3, adaptive="asam"))
    close(asam_trace["perturbation"], sam_trace["perturbation"], rtol=1e-13)
    close(asam_trace["sam_grad"], sam_trace["sam_grad"], rtol=1e-12)


def test_restore_by_subtraction_updates_from_w_plus_e_minus_e():
    """In float32 (w + e) - e is not always w: 'subtract' must update from that value."""
    model, params, state, x, y = problem(2)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    state = {k: v.astype(np.float32) for k, v in state.items()}
    x = x.astype(np.float32)
    trace = {}
    cfg = SAMConfig(rho=2.0, restore="subtract", gradient_clipping=0.0)
    new_p, _, _, _ = train_step(model, params, state, nesterov_init(params), x, y, 0.1, cfg,
                                trace=trace)
    e = trace["perturbation"]
    restored = {k: (params[k] + e[k]) - e[k] for k in params}
    assert any(not np.array_equal(restored[k], params[k]) for k in params)  # rounding shows
    want, _ = nesterov_update(restored, trace["grad_clipped"], nesterov_init(params), 0.1)
    for k in params:
        np.testing.assert_array_equal(new_p[k], want[k])


def test_heavy_ball_momentum_by_hand():
    from minisam.optim import momentum_update
    p, g, m = {"w": np.array([1.0])}, {"w": np.array([0.5])}, {"w": np.array([0.2])}
    new_p, new_m = momentum_update(p, g, m, lr=0.1, beta=0.9, nesterov=False)
    assert new_m["w"][0] == pytest.approx(0.9 * 0.2 + 0.5)
    assert new_p["w"][0] == pytest.approx(1.0 - 0.1 * (0.9 * 0.2 + 0.5))


@pytest.mark.parametrize("bad, needle", [
    (dict(weight_decay_in="both"), "weight_decay_in must be one of"),
    (dict(adaptive=None), "adaptive must be one of"),
    (dict(norm_eps=-1e-12), "norm_eps must be >= 0"),
    (dict(perturbed_bn_stats="keep"), "perturbed_bn_stats must be one of"),
    (dict(restore="assign"), "restore must be one of"),
])
def test_bad_switch_values_are_one_clear_error(bad, needle):
    with pytest.raises(ValueError, match=needle):
        SAMConfig(**bad)
    with pytest.raises(TypeError, match="nesterov must be True or False"):
        SAMConfig(nesterov=1)


@pytest.mark.parametrize("name", sorted(SEMANTICS))
def test_training_runs_end_to_end_with_each_semantics(name, tmp_path, capsys):
    run = str(tmp_path / name)
    code = main(["train", "--dataset", "digits", "--image-size", "8", "--model", "wrn10_1",
                 "--epochs", "3", "--batch-size", "64", "--semantics", name,
                 "--rho", "0.1", "--no-progress", "--out", run])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    saved = saved.get("config", saved)
    assert {k: saved[k] for k in SWITCHES} == SEMANTICS[name]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = rows[-1]
    assert np.isfinite(last["train_loss"]) and last["test_error_rate"] < 0.2   # it learns


def test_explicit_flags_override_the_semantics_preset(capsys):
    from minisam.cli import build_parser
    from minisam.cli_train import build_config
    args = build_parser().parse_args(["train", "--dataset", "digits", "--semantics", "davda54",
                                      "--norm-eps", "0", "--nesterov"])
    cfg = build_config(args)
    assert cfg.weight_decay_in == "optimizer" and cfg.perturbed_bn_stats == "update"
    assert cfg.norm_eps == 0.0 and cfg.nesterov is True and cfg.gradient_clipping == 0.0
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "digits", "--semantics", "pytorch"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'pytorch'" in err[0]

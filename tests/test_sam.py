"""The SAM step: dual vector, rho = 0 is SGD, BN state from the first pass, replicas."""
import numpy as np
import pytest

from minisam.models import WideResnet
from minisam.optim import (clip_by_global_norm, cosine_schedule, global_norm, nesterov_init,
                           nesterov_update)
from minisam.distributed.local import LocalComm, run_replicas
from minisam.sam import SAMConfig, dual_vector, loss_and_grad, train_step
from minisam.nn import one_hot


def small_problem(seed=0, n=8):
    rng = np.random.default_rng(seed)
    model = WideResnet(1, 1, 4, seed=seed)
    x = rng.standard_normal((n, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, n).astype(np.int32)
    return model, model.get_params(), model.get_state(), x, y


def test_dual_vector_has_radius_rho():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    e, norm = dual_vector(g)
    assert norm == 5.0 and global_norm(e) == pytest.approx(1.0)
    np.testing.assert_allclose(e["a"], [0.6, 0.0])


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 4.0], np.float32)}
    clipped, norm = clip_by_global_norm(g, 1.0)
    assert norm == 5.0 and global_norm(clipped) == pytest.approx(1.0)
    assert clip_by_global_norm(g, 10.0)[0]["a"] is g["a"] or np.array_equal(clip_by_global_norm(g, 10.0)[0]["a"], g["a"])
    assert clip_by_global_norm(g, 0.0)[0] is g


def test_nesterov_update_by_hand():
    p, g = {"w": np.array([1.0])}, {"w": np.array([0.5])}
    m = {"w": np.array([0.2])}
    new_p, new_m = nesterov_update(p, g, m, lr=0.1, beta=0.9)
    assert new_m["w"][0] == pytest.approx(0.9 * 0.2 + 0.5)
    assert new_p["w"][0] == pytest.approx(1.0 - 0.1 * (0.5 + 0.9 * 0.68))


def test_cosine_schedule():
    lr = cosine_schedule(0.1, num_epochs=1, steps_per_epoch=4)
    assert [round(lr(s), 6) for s in range(5)] == [0.1, 0.085355, 0.05, 0.014645, 0.0]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cosine_schedule(0.1, 1, 0)


def test_rho_zero_is_sgd():
    model, params, state, x, y = small_problem()
    cfg = SAMConfig(rho=0.0, gradient_clipping=0.0)
    new_p, _, _, metrics = train_step(model, params, state, nesterov_init(params), x, y, 0.1, cfg)
    _, ce, _, g = loss_and_grad(model, params, x, one_hot(y, 4), cfg)
    expected, _ = nesterov_update(params, g, nesterov_init(params), 0.1)
    for k in params:
        np.testing.assert_allclose(new_p[k], expected[k], rtol=1e-6, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx(float(ce), rel=1e-6)


def test_sam_gradient_is_gradient_at_perturbed_point_and_keeps_first_pass_state():
    model, params, state, x, y = small_problem(1)
    cfg = SAMConfig(rho=0.1, gradient_clipping=0.0)
    trace = {}
    _, new_state, momentum, _ = train_step(model, params, state, nesterov_init(params), x, y,
                                           0.1, cfg, trace=trace)
    _, _, _, g = loss_and_grad(model, params, x, one_hot(y, 4), cfg)
    e = {k: 0.1 * v / global_norm(g) for k, v in g.items()}
    assert global_norm(trace["perturbation"]) == pytest.approx(0.1, rel=1e-5)
    model.set_state(state)
    _, _, _, g_sam = loss_and_grad(model, {k: params[k] + e[k] for k in params}, x,
                                   one_hot(y, 4), cfg)
    for k in params:  # first momentum = the (unclipped) SAM gradient
        np.testing.assert_allclose(momentum[k], g_sam[k], rtol=1e-4, atol=1e-6)
    model.set_state(state)
    model.set_params(params)
    model.forward(x, train=True)       # the unperturbed pass's BN statistics
    for k, v in model.get_state().items():
        np.testing.assert_allclose(new_state[k], v, rtol=1e-6)


@pytest.mark.parametrize("sync", [False, True])
def test_two_thread_replicas_match_manual_computation(sync):
    model, params, state, x, y = small_problem(2, n=8)
    cfg = SAMConfig(rho=0.05, gradient_clipping=0.0, sync_perturbations=sync)

    def replica(rank, comm):
        m = WideResnet(1, 1, 4, seed=2)
        sl = slice(rank * 4, rank * 4 + 4)
        return train_step(m, params, state, nesterov_init(params), x[sl], y[sl], 0.1, cfg, comm)

    (p0, s0, _, _), (p1, s1, _, _) = run_replicas(2, replica)
    for k in params:   # every replica ends with the same params
        np.testing.assert_array_equal(p0[k], p1[k])
    # by hand: per-replica (or averaged) gradient -> perturbation -> SAM grads -> mean
    gs = [loss_and_grad(model, params, x[r * 4:r * 4 + 4], one_hot(y[r * 4:r * 4 + 4], 4), cfg)[3]
          for r in range(2)]
    if sync:
        gs = [{k: (gs[0][k] + gs[1][k]) / 2 for k in params}] * 2
    sam = []
    for r in range(2):
        model.set_state(state)
        e, _ = dual_vector(gs[r])
        pert = {k: params[k] + 0.05 * e[k] for k in params}
        sam.append(loss_and_grad(model, pert, x[r * 4:r * 4 + 4], one_hot(y[r * 4:r * 4 + 4], 4), cfg)[3])
    mean = {k: (sam[0][k] + sam[1][k]) / 2 for k in params}
    expected, _ = nesterov_update(params, mean, nesterov_init(params), 0.1)
    for k in params:
        np.testing.assert_allclose(p0[k], expected[k], rtol=1e-5, atol=1e-6)
    # per-replica BN statistics: the two replicas saw different data
    assert any(not np.array_equal(s0[k], s1[k]) for k in s0)


def test_replica_error_is_raised_not_hung():
    def replica(rank, comm):
        if rank == 1:
            raise ValueError("boom")
        comm.allreduce_mean({"a": np.zeros(1)})
    with pytest.raises(ValueError, match="boom"):
        run_replicas(2, replica)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="rho"):
        SAMConfig(rho=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        SAMConfig(label_smoothing=1.5)
    assert LocalComm().allreduce_mean({"a": 1})["a"] == 1


def test_sam_config_is_the_one_validation_of_the_sam_fields():
    """TrainConfig validates its SAM fields by building a SAMConfig, so both reject the
    same values with the same message."""
    import pytest
    from minisam.config import TrainConfig
    for bad, kind, needle in ((dict(rho=float("inf")), ValueError, "rho must be >= 0 and finite"),
                              (dict(weight_decay=-1e-4), ValueError, "weight_decay must be >= 0"),
                              (dict(gradient_clipping=float("nan")), ValueError, "finite"),
                              (dict(label_smoothing=1.0), ValueError, "label_smoothing must be in"),
                              (dict(momentum=float("nan")), ValueError, "momentum must be in"),
                              (dict(rho="0.1"), TypeError, "rho must be a number"),
                              (dict(rho=True), TypeError, "rho must be a number"),
                              (dict(sync_perturbations="no"), TypeError, "True or False")):
        with pytest.raises(kind, match=needle):
            SAMConfig(**bad)
        with pytest.raises(kind, match=needle):
            TrainConfig(dataset="digits", model="wrn10_1", **bad)
    cfg = TrainConfig(dataset="digits", model="wrn10_1", rho=0.2, momentum=0.8)
    assert cfg.sam_config() == SAMConfig(rho=0.2, weight_decay=5e-4, momentum=0.8)

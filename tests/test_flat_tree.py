"""Flat trees (``tree.FlatTree``): parameters, gradients and momentum as views into one
buffer. The fast form must give the plain dict path's bits, step after step, on one replica
and on thread replicas, and the trainer must hold its parameters that way."""
import numpy as np
import pytest

from minisam.distributed.local import run_replicas
from minisam.models import WideResnet
from minisam.optim import nesterov_init
from minisam.sam import SAMConfig, train_step
from minisam.train import Trainer
from minisam.tree import (FlatTree, axpy, flat_tree, global_norm, inner, like_tree,
                          mean_in_rank_order, sum_of_squares, tree_map)

from .test_train import small


def unsorted_tree(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"z/kernel": (3, 3, 2, 4), "a/scale": (4,), "m/kernel": (5, 3), "b/bias": (3,)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_flat_tree_is_a_dict_of_views_into_one_buffer_in_the_trees_order():
    t = unsorted_tree()
    f = flat_tree(t)
    assert isinstance(f, FlatTree) and list(f) == list(t)          # the tree's order
    assert f.flat.ndim == 1 and f.flat.size == sum(v.size for v in t.values())
    for k, v in t.items():
        np.testing.assert_array_equal(f[k], v)
        assert f[k].shape == v.shape and f[k].flags.c_contiguous
        assert np.shares_memory(f[k], f.flat) and not np.shares_memory(f[k], v)   # a copy
    # the buffer is laid out in sorted key order (flat.plan_layout), like every rank's
    assert np.shares_memory(f["a/scale"], f.flat[:4])
    g = flat_tree({k: v + 1 for k, v in t.items()}, like=f)
    assert g.layout is f.layout
    assert like_tree(t, f).layout is f.layout and like_tree(t, t) is t


def test_trees_that_do_not_fit_one_buffer_are_left_as_they_are():
    mixed = dict(unsorted_tree(), step=np.array([3.0]))            # float32 and float64
    assert flat_tree(mixed) is mixed
    assert flat_tree({}) == {}


def test_tree_map_runs_once_on_the_buffers_and_gives_the_plain_bits():
    a, b = unsorted_tree(0), unsorted_tree(1)
    fa, fb = flat_tree(a), flat_tree(b, like=flat_tree(a))
    calls = []

    def fn(x, y):
        calls.append(x.shape)
        return 0.9 * x + y - 0.1 * (y + 0.9 * x)

    flat = tree_map(fn, fa, fb)
    assert isinstance(flat, FlatTree) and len(calls) == 1 and list(flat) == list(a)
    plain = tree_map(fn, a, b)
    assert type(plain) is dict and len(calls) == 1 + len(a)
    mixed = tree_map(fn, fa, b)                                    # one plain tree: key by key
    assert type(mixed) is dict
    for k in a:
        np.testing.assert_array_equal(flat[k], plain[k])
        np.testing.assert_array_equal(mixed[k], plain[k])
    np.testing.assert_array_equal(axpy(0.3, fb, fa).flat, flat_tree(axpy(0.3, b, a)).flat)


def test_reductions_of_a_flat_tree_are_the_plain_bits():
    a, b = unsorted_tree(0), unsorted_tree(1)
    fa = flat_tree(a)
    fb = flat_tree(b, like=fa)
    assert sum_of_squares(fa) == sum((v * v).sum() for v in a.values())   # the old formula
    assert global_norm(fa) == global_norm(a)
    assert inner(fa, fb) == inner(a, b)
    mean = mean_in_rank_order([fa, fb, fa])
    assert isinstance(mean, FlatTree)
    for k, v in mean_in_rank_order([a, b, a]).items():
        np.testing.assert_array_equal(mean[k], v)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 8, 8, 3)).astype(np.float32),
            rng.integers(0, 4, n).astype(np.int32))


def run_steps(cfg, flat: bool, steps=3, comm=None, rank=0):
    model = WideResnet(1, 1, 4, seed=0)
    params, state = model.get_params(), model.get_state()
    params = flat_tree(params) if flat else {k: v.copy() for k, v in params.items()}
    momentum = nesterov_init(params)
    metrics = []
    for step in range(steps):
        x, y = batch(seed=step)
        if comm is not None:
            x, y = x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]
        kw = {} if comm is None else {"comm": comm}
        params, state, momentum, m = train_step(model, params, state, momentum, x, y, 0.1,
                                                cfg, **kw)
        metrics.append(m)
    return params, state, momentum, metrics


def assert_same_bits(a, b):
    pa, sa, ma, metrics_a = a
    pb, sb, mb, metrics_b = b
    for tree_a, tree_b in ((pa, pb), (sa, sb), (ma, mb)):
        assert list(tree_a) == list(tree_b)
        for k in tree_a:
            np.testing.assert_array_equal(tree_a[k], tree_b[k], err_msg=k)
    for x, y in zip(metrics_a, metrics_b):
        assert {k: float(v) for k, v in x.items()} == {k: float(v) for k, v in y.items()}


CONFIGS = {
    "jax": SAMConfig(),
    "sgd": SAMConfig(rho=0.0),
    "torch-like": SAMConfig(weight_decay_in="optimizer", nesterov=False, norm_eps=1e-12,
                            restore="subtract", gradient_clipping=0.0),
    "asam": SAMConfig(adaptive="asam", rho=0.5),
    "clipped": SAMConfig(gradient_clipping=0.05, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sam_steps_on_flat_trees_are_bitwise_the_plain_steps(name):
    flat = run_steps(CONFIGS[name], flat=True)
    assert isinstance(flat[0], FlatTree) and isinstance(flat[2], FlatTree)
    assert_same_bits(flat, run_steps(CONFIGS[name], flat=False))


@pytest.mark.parametrize("sync", [False, True])
def test_thread_replicas_average_flat_trees_bitwise(sync):
    cfg = SAMConfig(sync_perturbations=sync)
    flat = run_replicas(2, lambda r, comm: run_steps(cfg, True, 2, comm, r))
    plain = run_replicas(2, lambda r, comm: run_steps(cfg, False, 2, comm, r))
    for r in range(2):
        assert isinstance(flat[r][0], FlatTree)
        assert_same_bits(flat[r], plain[r])
    for k in flat[0][0]:                            # both replicas hold the same parameters
        np.testing.assert_array_equal(flat[0][0][k], flat[1][0][k])


def test_the_trainer_holds_parameters_and_momentum_as_flat_trees(tmp_path):
    run = str(tmp_path / "run")
    tr = Trainer(small(epochs=1), run, progress=False, max_steps=2)
    assert isinstance(tr.params, FlatTree) and isinstance(tr.momentum, FlatTree)
    tr.fit()
    assert isinstance(tr.params, FlatTree) and tr.momentum.layout == tr.params.layout
    resumed = Trainer(None, run, progress=False, resume=True)
    assert isinstance(resumed.params, FlatTree) and resumed.momentum.layout == resumed.params.layout
    for k in tr.params:
        np.testing.assert_array_equal(resumed.params[k], tr.params[k])
        np.testing.assert_array_equal(resumed.momentum[k], tr.momentum[k])

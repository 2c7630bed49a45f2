"""Loader: per-epoch shuffling from (seed, epoch), drop remainder, replicas, resume."""
import numpy as np
import pytest

from minisam.backend import gpu_available
from minisam.data import Augment, Dataset, Loader


def toy(n=100, shape=(6, 6, 3), k=5):
    # Image i is filled with the value i: a batch tells which examples it holds.
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                             (n, *shape)).copy()
    return Dataset(images, np.arange(n) % k, k, "toy")


def ids(images):
    return np.asarray(images)[:, 0, 0, 0].astype(int)


def test_permutation_depends_only_on_seed_and_epoch():
    ds = toy()
    a, b = Loader(ds, 10, seed=7), Loader(ds, 10, seed=7)
    for e in range(3):
        list(a.epoch(e))  # a has history, b computes epoch 5 cold
    np.testing.assert_array_equal(a.permutation(5), b.permutation(5))
    want = np.random.default_rng([7, 0, 5]).permutation(100)
    np.testing.assert_array_equal(a.permutation(5), want)
    assert sorted(a.permutation(1)) == list(range(100))
    assert not np.array_equal(a.permutation(1), a.permutation(2))
    assert not np.array_equal(a.permutation(1), Loader(ds, 10, seed=8).permutation(1))
    batches = [ids(x) for x, _ in a.epoch(1)]
    np.testing.assert_array_equal(np.concatenate(batches), a.permutation(1))


def test_train_drops_remainder_eval_keeps_it():
    ds = toy(100)
    train = Loader(ds, 32, seed=0)
    assert train.steps_per_epoch == len(train) == 3
    got = [ids(x) for x, _ in train.epoch(0)]
    assert [len(g) for g in got] == [32, 32, 32]
    assert len(set(np.concatenate(got))) == 96
    ev = Loader(ds, 32, train=False)
    assert ev.steps_per_epoch == 4
    got = [(ids(x), y) for x, y in ev]
    assert [len(g) for g, _ in got] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([g for g, _ in got]), np.arange(100))  # in order
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), ds.labels)
    assert got[0][1].dtype == np.int32


def test_eval_has_no_augmentation_and_no_shuffle():
    ds = toy(20)
    ev = Loader(ds, 8, train=False, seed=3)
    x, _ = ev.batch(0, 0)
    np.testing.assert_array_equal(x, ds.images[:8])
    np.testing.assert_array_equal(ev.batch(4, 1)[0], ds.images[8:16])  # same for any epoch
    with pytest.raises(ValueError, match="augment=None"):
        Loader(ds, 8, train=False, augment=Augment())


def test_replica_split():
    ds = toy(100)
    aug = Augment(crop_pad=2, flip=True, cutout=3)
    whole = Loader(ds, 32, seed=1, augment=aug)
    split = Loader(ds, 32, seed=1, augment=aug, replicas=4)
    xs, ys = whole.batch(2, 1)
    shards = split.batch(2, 1)
    assert isinstance(shards, list) and len(shards) == 4
    for r, (x, y) in enumerate(shards):  # replica r gets rows [8r, 8r + 8)
        assert x.shape == (8, 6, 6, 3) and y.shape == (8,)
        np.testing.assert_array_equal(x, xs[8 * r:8 * r + 8])
        np.testing.assert_array_equal(y, ys[8 * r:8 * r + 8])
    assert len(Loader(ds, 32, seed=1, replicas=1).batch(0, 0)) == 1
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by replicas=4"):
        Loader(ds, 30, replicas=4)
    # Eval keeps the last partial batch (10 rows here) and splits it as evenly as it can.
    last = Loader(ds, 30, train=False, replicas=3).batch(0, 3)
    assert [len(y) for _, y in last] == [4, 3, 3]
    np.testing.assert_array_equal(np.concatenate([y for _, y in last]), ds.labels[90:])


def test_resume_reproduces_batches():
    ds = toy(100)
    aug = Augment(crop_pad=2, flip=True, cutout=4)
    run = Loader(ds, 16, seed=11, augment=aug)
    full = [list(run.epoch(e)) for e in range(3)]
    resumed = Loader(ds, 16, seed=11, augment=aug)  # a fresh process resuming at (2, 4)
    rest = list(resumed.epoch(2, start_step=4))
    assert len(rest) == run.steps_per_epoch - 4
    for (x1, y1), (x2, y2) in zip(full[2][4:], rest):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x, _ = resumed.batch(1, 3)
    np.testing.assert_array_equal(x, full[1][3][0])
    # Augmentation differs between steps and epochs, and is really applied.
    assert not np.array_equal(full[0][0][0], full[0][1][0])
    plain = Loader(ds, 16, seed=11).batch(0, 0)[0]
    assert not np.array_equal(full[0][0][0], plain)
    assert np.array_equal(np.sort(np.unique(ids(plain))), np.sort(ids(plain)))


def test_bad_arguments():
    ds = toy(10)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Loader(ds, 0)
    with pytest.raises(ValueError, match="fewer than batch_size 16"):
        Loader(ds, 16)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Loader(ds, 4, device="tpu")
    with pytest.raises(ValueError, match="seed must be an int"):
        Loader(ds, 4, seed=-1)
    with pytest.raises(ValueError, match="replicas must be None or a positive int"):
        Loader(ds, 4, replicas=0)
    with pytest.raises(TypeError, match="minisam.data.Dataset"):
        Loader(ds.images, 4)
    with pytest.raises(IndexError, match="an epoch has 2 steps"):
        Loader(ds, 4).batch(0, 2)
    if not gpu_available():
        with pytest.raises(RuntimeError, match="no usable CuPy GPU"):
            Loader(ds, 4, device="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_batches_match_cpu():
    import cupy as cp

    ds = toy(64)
    aug = Augment(crop_pad=2, flip=True, cutout=3)
    cpu = Loader(ds, 16, seed=5, augment=aug, replicas=2)
    gpu = Loader(ds, 16, seed=5, augment=aug, replicas=2, device="gpu")
    for (xc, yc), (xg, yg) in zip(cpu.batch(1, 2), gpu.batch(1, 2)):
        assert isinstance(xg, cp.ndarray) and isinstance(yg, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(xg), xc)
        np.testing.assert_array_equal(cp.asnumpy(yg), yc)


@pytest.mark.parametrize("aug", [Augment(crop_pad=2, flip=True, cutout=3),
                                 Augment(crop_pad=1, flip=False, cutout=4, cutout_per_image=True),
                                 None])
def test_shards_build_only_their_rows_and_equal_the_batch_slices(aug):
    """One process per replica gathers, uploads and augments only its own rows, with the
    augmentation drawn for the whole global batch: bitwise the slice of the whole batch."""
    rng = np.random.default_rng(0)     # textured images, so a misplaced flip or crop shows
    ds = Dataset(rng.standard_normal((100, 6, 6, 3)).astype(np.float32), np.arange(100) % 5,
                 5, "noise")
    loader = Loader(ds, 32, seed=3, augment=aug, replicas=4)
    whole = Loader(ds, 32, seed=3, augment=aug).batch(1, 2)
    for ranks in ([0, 1, 2, 3], [2], [3, 1]):
        shards = loader.shards(1, 2, ranks)
        assert isinstance(shards, list) and len(shards) == len(ranks)
        for r, (x, y) in zip(ranks, shards):
            np.testing.assert_array_equal(x, whole[0][8 * r:8 * r + 8])
            np.testing.assert_array_equal(y, whole[1][8 * r:8 * r + 8])
    assert len(Loader(ds, 32, seed=3, augment=aug).shards(0, 0, [0])) == 1   # same container
    with pytest.raises(IndexError, match="replica 4 out of range"):
        loader.shards(0, 0, [4])
    with pytest.raises(ValueError, match="eval loader"):
        Loader(ds, 32, train=False).shards(0, 0, [0])
    with pytest.raises(TypeError, match="Augment or None"):
        Loader(ds, 32, augment=lambda x, rng: x)

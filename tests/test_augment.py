"""Augmentations: flip, reflect pad + crop, cutout (JAX semantics), label noise."""
import numpy as np
import pytest

from minisam.backend import gpu_available
from minisam.data import (Augment, cutout, default_augment, pad_reflect, random_crop,
                          random_flip, symmetric_label_noise)


def rng(seed=0):
    return np.random.default_rng(seed)


def batch(b=8, h=10, w=12, c=3, seed=0):
    # Strictly positive values: a zero in the output can only come from cutout.
    return np.random.default_rng(seed).uniform(1, 2, (b, h, w, c)).astype(np.float32)


def test_flip():
    x = batch(64)
    out = random_flip(x, rng(1))
    assert out.shape == x.shape and out.dtype == np.float32
    flipped = np.array([np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)])
    kept = np.array([np.array_equal(o, xi) for o, xi in zip(out, x)])
    assert np.all(flipped ^ kept)  # every image is either mirrored left-right or untouched
    assert 16 < flipped.sum() < 48
    np.testing.assert_array_equal(out, random_flip(x, rng(1)))
    assert not np.array_equal(out, random_flip(x, rng(2)))
    one = np.arange(3, dtype=np.float32).reshape(1, 1, 3, 1)
    outs = {tuple(random_flip(one, rng(s)).ravel()) for s in range(20)}
    assert outs == {(0, 1, 2), (2, 1, 0)}


def test_pad_reflect_matches_numpy_and_tf():
    x = batch(2, 5, 6, 3)
    np.testing.assert_array_equal(
        pad_reflect(x, 4), np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect"))
    row = np.array([1, 2, 3, 4], np.float32).reshape(1, 1, 4, 1).repeat(3, axis=1)
    # TF 'REFLECT' does not repeat the edge: [a b c d] -> [c b | a b c d | c b]
    assert pad_reflect(row, 2)[0, 2, :, 0].tolist() == [3, 2, 1, 2, 3, 4, 3, 2]


def test_crop_windows_are_subwindows_of_padded_image():
    x = batch(500, 8, 9, 2)
    pad = 3
    out = random_crop(x, rng(5), pad)
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    seen = set()
    for o, p in zip(out, padded):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if np.array_equal(o, p[i:i + 8, j:j + 9])]
        assert hits, "a crop is not a window of the padded image"
        seen.add(hits[0])
    assert len(seen) == (2 * pad + 1) ** 2  # all 49 offsets occur: uniform on {0..2p}^2
    np.testing.assert_array_equal(out, random_crop(x, rng(5), pad))
    # The same offsets as drawing them by hand from the same generator.
    g = rng(5)
    oy, ox = g.integers(0, 7, 500), g.integers(0, 7, 500)
    np.testing.assert_array_equal(out[17], padded[17, oy[17]:oy[17] + 8, ox[17]:ox[17] + 9])
    np.testing.assert_array_equal(random_crop(x, rng(0), 0), x)
    with pytest.raises(ValueError, match=r"crop padding must be in \[0, 8\)"):
        random_crop(x, rng(), 8)


def jax_cutout_mask(h, w, cy, cx, length):
    """The mask built by google-research/sam augmentation.cutout, transcribed with np.pad."""
    lower = max(0, cy - length // 2)
    upper = max(0, h - cy - length // 2)
    left = max(0, cx - length // 2)
    right = max(0, w - cx - length // 2)
    zeros = np.zeros((h - (lower + upper), w - (left + right)))
    return np.pad(zeros, ((lower, upper), (left, right)), constant_values=1) == 0


@pytest.mark.parametrize("size", [16, 5, 1, 0])
def test_cutout_matches_jax_mask(size):
    h, w = 20, 24
    for seed in range(40):  # many centres, including ones near the border
        x = batch(4, h, w, 3, seed)
        out = cutout(x, rng(seed), size)
        g = rng(seed)
        cy, cx = int(g.integers(0, h, 1)[0]), int(g.integers(0, w, 1)[0])
        mask = jax_cutout_mask(h, w, cy, cx, size)
        zero = out == 0
        assert np.all(zero == mask[None, :, :, None])  # same square in every image, every channel
        np.testing.assert_array_equal(out[~zero], x[~zero])
    assert out.dtype == np.float32


def test_cutout_area_interior_and_clipped():
    x = np.ones((1, 32, 32, 3), np.float32)
    areas = set()
    for s in range(200):
        z = (cutout(x, rng(s), 16)[0, :, :, 0] == 0)
        rows, cols = np.nonzero(z.any(1))[0], np.nonzero(z.any(0))[0]
        assert z.sum() == len(rows) * len(cols)  # a rectangle
        assert len(rows) <= 16 and len(cols) <= 16
        areas.add(int(z.sum()))
    assert 256 in areas and min(areas) < 256  # full 16x16 inside, clipped at the border


def test_cutout_per_image():
    x = batch(16, 32, 32, 1)
    out = cutout(x, rng(3), 8, per_image=True)
    masks = (out == 0)[..., 0]
    assert all(8 <= m.sum() <= 64 for m in masks)
    assert len({m.tobytes() for m in masks}) > 1  # centres differ across the batch
    shared = (cutout(x, rng(3), 8) == 0)[..., 0]
    assert len({m.tobytes() for m in shared}) == 1


def test_label_noise_rate_and_determinism():
    y = np.arange(200_000) % 10
    noisy = symmetric_label_noise(y, 0.4, 10, rng(0))
    assert noisy.dtype == np.int32
    assert abs(np.mean(noisy != y) - 0.4 * 0.9) < 0.005  # the new class may be the old one
    np.testing.assert_array_equal(noisy, symmetric_label_noise(y, 0.4, 10, rng(0)))
    assert not np.array_equal(noisy, symmetric_label_noise(y, 0.4, 10, rng(1)))
    strict = symmetric_label_noise(y, 0.4, 10, rng(0), allow_same=False)
    assert abs(np.mean(strict != y) - 0.4) < 0.005
    changed = strict[strict != y]
    counts = np.bincount(changed, minlength=10) / len(changed)
    assert np.all(np.abs(counts - 0.1) < 0.01)  # uniform over the classes
    np.testing.assert_array_equal(symmetric_label_noise(y, 0.0, 10, rng(0)), y)
    assert np.all(symmetric_label_noise(y[:100], 1.0, 10, rng(0), allow_same=False) != y[:100])
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        symmetric_label_noise(y, 1.5, 10, rng())
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        symmetric_label_noise(y, 0.1, 10, 0)


def test_augment_composite():
    x = batch(32, 16, 16, 3)
    aug = Augment(crop_pad=4, flip=True, cutout=6)
    out = aug(x, rng(9))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, aug(x, rng(9)))
    g = rng(9)  # same order of draws as the JAX pipeline: flip, pad-crop, cutout
    np.testing.assert_array_equal(out, cutout(random_crop(random_flip(x, g), g, 4), g, 6))
    off = Augment(crop_pad=0, flip=False, cutout=0)
    assert not off.enabled
    np.testing.assert_array_equal(off(x, rng()), x)
    assert default_augment("cifar10") == Augment(crop_pad=4, flip=True, cutout=16)
    assert default_augment("digits").flip is False
    with pytest.raises(ValueError, match="no default augmentation"):
        default_augment("mnist")


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        random_flip(np.zeros((4, 4, 3)), rng())
    with pytest.raises(TypeError, match="default_rng"):
        random_crop(batch(), 0)
    with pytest.raises(ValueError, match="cutout size must be >= 0"):
        cutout(batch(), rng(), -1)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_matches_cpu():
    import cupy as cp

    x = batch(16, 32, 32, 3)
    aug = Augment(crop_pad=4, flip=True, cutout=16, cutout_per_image=True)
    np.testing.assert_array_equal(cp.asnumpy(aug(cp.asarray(x), rng(4))), aug(x, rng(4)))
    y = np.arange(1000) % 10
    np.testing.assert_array_equal(
        cp.asnumpy(symmetric_label_noise(cp.asarray(y), 0.3, 10, rng(2))),
        symmetric_label_noise(y, 0.3, 10, rng(2)))

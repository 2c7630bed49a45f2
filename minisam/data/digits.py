"""Handwritten digits shipped inside the package: a real dataset with no download.

Provenance and licence: `digits.npz` holds the 1797 8x8 images (integer pixels
0..16) and labels of scikit-learn's `load_digits()`, which is the test set
(optdigits.tes) of the UCI Machine Learning Repository's "Optical Recognition of
Handwritten Digits" by E. Alpaydin and C. Kaynak (1998),
https://doi.org/10.24432/C50P49, licensed CC BY 4.0. It was extracted once with
`_build_npz()` (scikit-learn is not a dependency of minisam); the npz also carries
this note in its `source` field.

What minisam does with it (10 classes, 1 channel, NHWC):
* split: the first 1440 images are "train", the last 357 "test". The file cycles
  through the classes in order, so this fixed, unshuffled split is close to
  balanced (33 to 37 test images per class) without explicit stratification.
* upscale to `image_size` x `image_size` (default 16, what the small CLI models
  expect) by bilinear interpolation with half-pixel centres
  (`resize_bilinear` below), after scaling pixels to [0, 1] (x / 16).
* normalise with the mean and std of the upscaled *training* images (one scalar
  each, since there is one channel), the analogue of the JAX code's CIFAR
  constants; the same numbers serve the validation split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_TRAIN = 1440
_NPZ = Path(__file__).with_name("digits.npz")


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize [N, h, w, C] float images to [N, size, size, C], bilinear.

    Half-pixel centres and edge clamping, like `tf.image.resize(method='bilinear')`
    without antialiasing (so at 2x each output pixel mixes its two nearest input
    pixels 3:1). Written as two small interpolation matrices, out = Ry @ x @ Rx^T,
    which is exact and needs no loops. Used to upscale the 8x8 digits.
    """

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    ry = matrix(images.shape[1], size)
    rx = matrix(images.shape[2], size)
    out = np.einsum("ij,njkc,lk->nilc", ry, images.astype(np.float64), rx)
    return out.astype(np.float32)


def load_digits_raw():
    """(images uint8 [1797, 8, 8] with values 0..16, labels uint8 [1797]) from the npz."""
    with np.load(_NPZ, allow_pickle=False) as z:
        return z["images"], z["labels"]


def load_digits(image_size: int = 16):
    """((train_x, train_y), (test_x, test_y)): normalised float32 [N, s, s, 1], int32."""
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"digits image_size must be a positive int; got {image_size!r}")
    images, labels = load_digits_raw()
    x = images[..., None].astype(np.float32) / np.float32(16.0)
    if image_size != 8:
        x = resize_bilinear(x, int(image_size))
    x_tr, x_te = x[:NUM_TRAIN], x[NUM_TRAIN:]
    mean, std = x_tr.mean(dtype=np.float64), x_tr.std(dtype=np.float64)
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    y = labels.astype(np.int32)
    return (x_tr, y[:NUM_TRAIN]), (x_te, y[NUM_TRAIN:])


def _build_npz(path=_NPZ):  # pragma: no cover - run once by hand, needs scikit-learn
    """Re-create digits.npz from scikit-learn (its bundled copy; no network)."""
    import sklearn
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    np.savez_compressed(
        path, images=d.images.astype(np.uint8), labels=d.target.astype(np.uint8),
        source=np.array(
            "UCI ML Optical Recognition of Handwritten Digits (optdigits.tes, 1797 "
            "samples), E. Alpaydin and C. Kaynak, 1998, CC BY 4.0, doi:10.24432/C50P49; "
            f"extracted from scikit-learn {sklearn.__version__} "
            "sklearn.datasets.load_digits()"))

"""Batch augmentations on NumPy or CuPy arrays, mirroring google-research/sam.

Every function takes a batch `images` [B, H, W, C] (NumPy or CuPy; the array
module comes from `get_xp(images)`) and a host `numpy.random.Generator` that draws
the random parameters (flip flags, crop offsets, cutout centres). Drawing on the
host makes a batch depend only on the generator's state, so CPU and GPU runs
augment identically and the loader can rebuild any batch from (seed, epoch, step).
The pixel work itself is vectorised xp code: no Python loop over images.

The JAX code (`sam_jax/datasets/augmentation.py`) applies, per training image,
`weak_image_augmentation`: random left-right flip, then 4-pixel REFLECT padding and
a random crop back to the original size; then, after batching and normalisation,
the batch-level `cutout`. `Augment` applies the same steps in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp, to_numpy


def _check(images, rng):
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"augmentations expect a batch [B, H, W, C] (NHWC); "
                         f"got shape {getattr(images, 'shape', None)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"augmentations take a numpy.random.Generator, e.g. "
                        f"numpy.random.default_rng(seed); got {type(rng).__name__}")


def random_flip(images, rng: np.random.Generator):
    """Flip each image left-right with probability 1/2 (`tf.image.random_flip_left_right`)."""
    _check(images, rng)
    return _flip(images, rng.random(images.shape[0]) < 0.5)


def _flip(images, flags):
    xp = get_xp(images)
    flip = xp.asarray(flags)
    return xp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def pad_reflect(images, pad: int):
    """Pad H and W by `pad` on each side, mirroring without repeating the edge.

    numpy's mode='reflect' is TF's mode='REFLECT' (edge pixel not repeated):
    [a b c d] padded by 2 -> [c b | a b c d | c b].
    """
    xp = get_xp(images)
    return xp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def random_crop(images, rng: np.random.Generator, pad: int = 4):
    """Reflect-pad by `pad`, then cut a random H x W window per image.

    Mirrors `weak_image_augmentation(random_crop_pad=4)`: `tf.pad(..., 'REFLECT')`
    then `tf.image.random_crop(image, image_shape)`, whose offsets are uniform on
    {0, ..., 2 * pad} in each axis. Windows are gathered for the whole batch at once
    with index arithmetic: out[b, i, j] = padded[b, oy[b] + i, ox[b] + j].
    """
    _check(images, rng)
    b, h, w, _ = images.shape
    _check_pad(pad, h, w)
    oy = rng.integers(0, 2 * pad + 1, size=b)
    ox = rng.integers(0, 2 * pad + 1, size=b)
    return _crop(images, oy, ox, pad)


def _check_pad(pad, h, w):
    if not 0 <= pad < min(h, w):
        raise ValueError(f"crop padding must be in [0, {min(h, w)}) for {h}x{w} images "
                         f"(reflect padding cannot exceed the image); got {pad}")


def _crop(images, oy, ox, pad):
    if pad == 0:
        return images
    xp = get_xp(images)
    b, h, w, _ = images.shape
    padded = pad_reflect(images, pad)
    rows = xp.asarray(oy)[:, None] + xp.arange(h)  # [B, H]
    cols = xp.asarray(ox)[:, None] + xp.arange(w)  # [B, W]
    return padded[xp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cutout(images, rng: np.random.Generator, size: int = 16, per_image: bool = False):
    """Zero a size x size square (clipped at the border) in normalised images.

    Mirrors `augmentation.cutout` in google-research/sam (length = FLAGS.cutout_length
    = 16, replace = 0.0, applied after normalisation, so the patch takes the
    dataset's mean colour). The centre (cy, cx) is uniform over all pixels, so the
    square may hang over the border; the rows zeroed are
    [max(0, cy - size // 2), min(H, cy + size // 2)) and likewise the columns, so an
    odd size zeroes 2 * (size // 2) pixels per side, exactly like the JAX code.

    The JAX code draws ONE centre per call (`tf.random.uniform(shape=[])`) and its
    mask is shared by the whole batch; that is the default here. per_image=True
    draws a centre per image, as in the Cutout paper (DeVries & Taylor, 2017).
    """
    _check(images, rng)
    if size < 0:
        raise ValueError(f"cutout size must be >= 0; got {size}")
    b, h, w, _ = images.shape
    n = b if per_image else 1
    cy = rng.integers(0, h, size=n)
    cx = rng.integers(0, w, size=n)
    return _cutout(images, cy, cx, size)


def _cutout(images, cy, cx, size):
    xp = get_xp(images)
    _, h, w, _ = images.shape
    half = size // 2
    ys, xs = np.arange(h), np.arange(w)
    in_y = (ys >= (cy - half)[:, None]) & (ys < (cy + half)[:, None])  # [n, H]
    in_x = (xs >= (cx - half)[:, None]) & (xs < (cx + half)[:, None])  # [n, W]
    mask = xp.asarray(in_y[:, :, None, None] & in_x[:, None, :, None])  # [n, H, W, 1]
    return xp.where(mask, images.dtype.type(0), images)


def symmetric_label_noise(labels, rate: float, num_classes: int, rng: np.random.Generator,
                          allow_same: bool = True):
    """Replace each label, with probability `rate`, by a uniformly random class.

    For the label-noise experiments of the SAM paper (Foret et al., 2021, sec. 3.3),
    which take their noisy-CIFAR setting from Jiang et al. (MentorNet / MentorMix);
    that line of work follows Zhang et al. (2017, "corrupted labels"): each label is
    independently replaced, with probability p, by a class drawn uniformly from all
    K classes. The draw may hit the true class (allow_same=True, the default and
    that convention), so about rate * (1 - 1/K) of the labels end up wrong.
    allow_same=False draws among the K - 1 other classes, so that about `rate` of
    the labels are wrong. The public
    google-research/sam code has no label-noise code to copy.

    Draws `rng.random(N)` then `rng.integers(..., N)` for every label, so the noise
    is a function of the generator's seed alone. Returns int32 labels on the same
    device as `labels`.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"symmetric_label_noise takes a numpy.random.Generator, e.g. "
                        f"numpy.random.default_rng(seed); got {type(rng).__name__}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1]; got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs num_classes >= 2; got {num_classes}")
    xp = get_xp(labels)
    y = to_numpy(labels).astype(np.int64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N] class indices; got shape {y.shape}")
    n = y.shape[0]
    corrupt = rng.random(n) < rate
    if allow_same:
        new = rng.integers(0, num_classes, size=n)
    else:
        new = (y + rng.integers(1, num_classes, size=n)) % num_classes
    out = np.where(corrupt, new, y).astype(np.int32)
    return xp.asarray(out)


@dataclass(frozen=True)
class Augment:
    """The training augmentation of the JAX code, configurable, applied per batch.

    crop_pad: reflect padding before the random crop (4 in the JAX code; 0 = off).
    flip:     random left-right flip.
    cutout:   side of the cutout square (16 in the JAX code's CIFAR runs; 0 = off).
    cutout_per_image: one cutout centre per image instead of the JAX code's one
              centre per batch (see `cutout`).

    Order, as in `TFDSDatasetSource.get_train`: flip, pad + crop, then cutout.
    Random draws happen in that order from the one generator.
    """

    crop_pad: int = 4
    flip: bool = True
    cutout: int = 0
    cutout_per_image: bool = False

    def __post_init__(self):
        for name in ("crop_pad", "cutout"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Augment.{name} must be a non-negative integer, got {v!r}")
        for name in ("flip", "cutout_per_image"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"Augment.{name} must be True or False, got "
                                f"{getattr(self, name)!r}")

    def __call__(self, images, rng: np.random.Generator):
        _check(images, rng)
        return self.apply(images, self.draw(rng, images.shape))

    def draw(self, rng: np.random.Generator, shape) -> dict:
        """The random choices for one batch of ``shape`` [B, H, W, C], drawn on the host in
        the order ``random_flip``, ``random_crop`` and ``cutout`` draw them."""
        b, h, w, _ = shape
        p = {}
        if self.flip:
            p["flip"] = rng.random(b) < 0.5
        if self.crop_pad:
            _check_pad(self.crop_pad, h, w)
            p["oy"] = rng.integers(0, 2 * self.crop_pad + 1, size=b)
            p["ox"] = rng.integers(0, 2 * self.crop_pad + 1, size=b)
        if self.cutout:
            if self.cutout < 0:
                raise ValueError(f"cutout size must be >= 0; got {self.cutout}")
            n = b if self.cutout_per_image else 1
            p["cy"], p["cx"] = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
        return p

    def apply(self, images, choices: dict, rows=slice(None)):
        """Augment ``images``, rows ``rows`` of the batch that ``choices`` were drawn for.

        Every operation acts on each image alone, so a data-parallel replica can augment
        only its own shard and get the same bits as its slice of the augmented batch."""
        if self.flip:
            images = _flip(images, choices["flip"][rows])
        if self.crop_pad:
            images = _crop(images, choices["oy"][rows], choices["ox"][rows], self.crop_pad)
        if self.cutout:
            shared = not self.cutout_per_image   # one square for the whole batch (JAX)
            cy, cx = (choices["cy"], choices["cx"]) if shared else \
                (choices["cy"][rows], choices["cx"][rows])
            images = _cutout(images, cy, cx, self.cutout)
        return images

    @property
    def enabled(self) -> bool:
        return bool(self.flip or self.crop_pad or self.cutout)


def default_augment(name: str, cutout_size: int = 16) -> Augment:
    """The usual training augmentation per dataset.

    CIFAR: the JAX code's 'basic' image augmentation (flip, 4-pixel pad-crop) plus
    `cutout_size` cutout (its batch-level 'cutout'; pass 0 for none).
    digits: a 1-pixel pad-crop only; flipping digits would change their meaning.
    synthetic: none (its images have no spatial structure to respect).
    """
    if name in ("cifar10", "cifar100"):
        return Augment(crop_pad=4, flip=True, cutout=cutout_size)
    if name == "digits":
        return Augment(crop_pad=1, flip=False, cutout=0)
    if name == "synthetic":
        return Augment(crop_pad=0, flip=False, cutout=0)
    raise ValueError(f"no default augmentation for {name!r}; expected cifar10, cifar100, "
                     "digits or synthetic")

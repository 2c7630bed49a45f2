"""The in-memory dataset every loader and trainer in minisam works on.

A `Dataset` is a whole split held in host memory, already normalised: float32
NHWC images and int32 labels. CIFAR (50k x 32x32x3 float32, about 600 MB) fits in
memory, so there is no streaming pipeline: batching, shuffling and augmentation
are done by `minisam.data.loader` with plain array indexing, which keeps every
batch reproducible from (seed, epoch, step).

`load_dataset` is the single entry point; it dispatches to `cifar`, `digits` and
`synthetic` and applies the validation split the same way for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

DATASETS = ("cifar10", "cifar100", "digits", "synthetic")
SOURCES = ("auto", "archive", "tfds")


@dataclass
class Dataset:
    """One split: normalised float32 images [N, H, W, C] and int32 labels [N].

    `split` is "train", "test" or "validation" (for logs and error messages).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str = "train"

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4:
            raise ValueError(
                f"Dataset images must be a NumPy array [N, H, W, C] (NHWC); "
                f"got {type(images).__name__} with shape {getattr(images, 'shape', None)}")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1:
            raise ValueError(f"Dataset labels must be a 1-D NumPy array [N]; "
                             f"got shape {getattr(labels, 'shape', None)}")
        if len(images) != len(labels):
            raise ValueError(f"Dataset has {len(images)} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"Dataset labels must be integer class indices, got dtype "
                            f"{labels.dtype}; convert them with labels.astype('int32')")
        self.images = images.astype(np.float32, copy=False)
        self.labels = labels.astype(np.int32, copy=False)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); "
                             f"got range [{self.labels.min()}, {self.labels.max()}]")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of one image: what a model's input layer must accept."""
        return tuple(self.images.shape[1:])

    def with_label_noise(self, rate: float, seed: int = 0, allow_same: bool = True) -> "Dataset":
        """A copy whose labels carry symmetric noise (see `augment.symmetric_label_noise`).

        Noise is drawn once, from `seed` alone, so every epoch and every resumed run
        sees the same corrupted labels, as in the paper's label-noise experiments.
        """
        from .augment import symmetric_label_noise

        labels = symmetric_label_noise(self.labels, rate, self.num_classes,
                                       np.random.default_rng(seed), allow_same=allow_same)
        return replace(self, labels=labels)


# ---------------------------------------------------------------------------
# Normalisation and splits shared by all sources.


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 (x / 255 - mean) / std, per channel.

    Mirrors `TFDSDatasetSource._preprocess_batch` in google-research/sam
    `sam_jax/datasets/dataset_source.py`: `image = tf.cast(image, tf.float32) / 255.0`
    then `(image - self._image_mean) / self._image_std`.

    The JAX code flips and pad-crops the raw uint8 images *before* this step and
    applies cutout *after* it. Flip and crop only move pixels, so they commute with
    this per-channel affine map: normalising once at load time and augmenting the
    float images gives the same batches. Cutout writes zeros into normalised images,
    which our `augment.cutout` does too.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = images_uint8.astype(np.float32) / np.float32(255.0)
    out -= mean
    out /= std
    return out


def validation_split(images: np.ndarray, labels: np.ndarray):
    """Split a training set into (train, validation): the last 10% is validation.

    Mirrors the JAX code's `use_test_set=False`, which loads
    `tfds.load(name, split='train[:45000]')` for training and `'train[45000:]'` for
    evaluation (CIFAR's 50000 training images). We slice in NumPy so that every
    source (tfds, the local archive, digits, synthetic) is split the same way; note
    that tfds and the archive order CIFAR's images differently, so only the tfds
    source gives the JAX code's validation images.
    """
    n_val = len(labels) // 10
    cut = len(labels) - n_val
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


# ---------------------------------------------------------------------------
# Synthetic data.


def synthetic(num: int, image_shape=(32, 32, 3), num_classes: int = 10, seed: int = 0,
              name: str = "synthetic", split: str = "train") -> Dataset:
    """`num` random images of any shape, for benchmarks and smoke tests.

    Each class owns a fixed random template; an image is 0.5 * template + unit
    Gaussian noise, so the data is (weakly) learnable and a loss curve on it means
    something. Everything comes from `numpy.random.default_rng(seed)`.
    """
    if num < 0 or num_classes < 1 or len(image_shape) != 3:
        raise ValueError(f"synthetic expects num >= 0, num_classes >= 1 and "
                         f"image_shape (H, W, C); got num={num}, num_classes={num_classes}, "
                         f"image_shape={image_shape}")
    rng = np.random.default_rng(seed)
    templates = rng.standard_normal((num_classes, *image_shape), dtype=np.float32)
    labels = rng.integers(0, num_classes, size=num).astype(np.int32)
    noise = rng.standard_normal((num, *image_shape), dtype=np.float32)
    images = np.float32(0.5) * templates[labels] + noise
    return Dataset(images, labels, num_classes, name, split)


# ---------------------------------------------------------------------------
# The entry point.


def load_dataset(name: str, data_dir=None, source: str = "auto", image_size=None,
                 validation: bool = False, **kwargs):
    """Load a dataset by name; returns (train, test) `Dataset`s, normalised.

    name:       one of `DATASETS`: "cifar10", "cifar100", "digits", "synthetic".
    data_dir:   CIFAR only. A folder holding `cifar-10-python.tar.gz` /
                `cifar-100-python.tar.gz` or their extracted folders
                `cifar-10-batches-py/` / `cifar-100-python/` (or that folder itself);
                with the tfds source, tensorflow-datasets' data_dir.
    source:     CIFAR only. "archive" (the local files above, NumPy + pickle only),
                "tfds" (tensorflow-datasets, the source the JAX code uses; needs
                `pip install 'minisam[data]'`), or "auto": the archive if one is
                found in `data_dir`, else tfds.
    image_size: digits only: side of the upscaled square image (default 16).
                CIFAR accepts only None or 32 (see below).
    validation: if True, "test" is the last 10% of the training set and "train" the
                rest, like the JAX code's `--use_test_set=False`.
    kwargs:     synthetic only: num_train (default 1024), num_test (256),
                image_shape ((32, 32, 3)), num_classes (10), seed (0).

    The JAX code can also resize CIFAR (`image_size` flag, bicubic, applied per batch
    after augmentation); minisam does not, so asking for another CIFAR size is an
    error rather than a silent difference.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if kwargs and name != "synthetic":
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for dataset {name!r}; "
                        "only 'synthetic' takes extra arguments")

    if name in ("cifar10", "cifar100"):
        from . import cifar

        if image_size not in (None, 32):
            raise ValueError(f"{name} images are 32x32; image_size={image_size} is not "
                             "supported (leave image_size unset)")
        (x_tr, y_tr), (x_te, y_te) = cifar.load_cifar_uint8(name, data_dir, source)
        mean, std = cifar.CIFAR_MEAN_STD[name]
        num_classes = cifar.NUM_CLASSES[name]
        if validation:
            (x_tr, y_tr), (x_te, y_te) = validation_split(x_tr, y_tr)
        x_tr, x_te = normalize(x_tr, mean, std), normalize(x_te, mean, std)
    elif name == "digits":
        from . import digits

        (x_tr, y_tr), (x_te, y_te) = digits.load_digits(16 if image_size is None else image_size)
        num_classes = 10
        if validation:
            (x_tr, y_tr), (x_te, y_te) = validation_split(x_tr, y_tr)
    else:
        if image_size is not None:
            raise ValueError("synthetic takes image_shape=(H, W, C), not image_size")
        unknown = set(kwargs) - {"num_train", "num_test", "image_shape", "num_classes", "seed"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)} for 'synthetic'; "
                            "expected num_train, num_test, image_shape, num_classes, seed")
        num_train = kwargs.get("num_train", 1024)
        num_test = kwargs.get("num_test", 256)
        full = synthetic(num_train + num_test, kwargs.get("image_shape", (32, 32, 3)),
                         kwargs.get("num_classes", 10), kwargs.get("seed", 0))
        x_tr, y_tr = full.images[:num_train], full.labels[:num_train]
        x_te, y_te = full.images[num_train:], full.labels[num_train:]
        num_classes = full.num_classes
        if validation:
            (x_tr, y_tr), (x_te, y_te) = validation_split(x_tr, y_tr)

    test_split = "validation" if validation else "test"
    return (Dataset(x_tr, y_tr, num_classes, name, "train"),
            Dataset(x_te, y_te, num_classes, name, test_split))

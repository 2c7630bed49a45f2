"""Batches from an in-memory `Dataset`, reproducible from (seed, epoch, step).

The JAX code feeds training from `tf.data`: `shuffle(50000)`, per-image
augmentation, `batch(batch_size, drop_remainder=True)`, normalisation, batch-level
cutout; evaluation batches in order and keeps the last partial batch
(`TFDSDatasetSource.get_train` / `get_test` in `sam_jax/datasets/dataset_source.py`).
Its shuffling is not reproducible across restarts. Here every random choice is a
pure function of the seed and the position in training:

* the order of epoch e is `default_rng([seed, 0, e]).permutation(N)`;
* the augmentation of step s of epoch e draws from `default_rng([seed, 1, e, s])`.

So a run resumed at (epoch, step) sees exactly the batches an uninterrupted run
would have seen, and `batch(e, s)` can rebuild any one of them. (The leading 0/1
tags keep the two streams apart: NumPy's SeedSequence pads short seeds with zeros,
so [seed, e] and [seed, e, 0] would otherwise collide.)

For data-parallel training the global batch is cut into `replicas` equal shards,
replica r taking rows [r * b, (r + 1) * b) with b = batch_size / replicas, like
`flax_training.shard_batch` (a reshape to [replicas, b, ...]). `shards(epoch, step,
ranks)` builds only the shards a process computes: it gathers, uploads and augments
those rows alone, with the augmentation drawn for the whole global batch, so every
topology sees the same bits.
"""
from __future__ import annotations

import numpy as np

from ..backend import DEVICES, to_device, xp_for
from .augment import Augment
from .dataset import Dataset


class Loader:
    """Iterate a `Dataset` in batches.

    train=True:  shuffled each epoch, remainder dropped, `augment` applied.
    train=False: dataset order, last partial batch kept, no augmentation (eval).

    augment:  an `augment.Augment` (or None for no augmentation).
    device:   "cpu" or "gpu": batches are moved there (`backend.to_device`) before
              augmentation, so augmentation runs on the device.
    replicas: None -> each batch is a tuple (images, labels); an int R -> each batch
              is a list of R (images, labels) shards of batch_size / R rows (train
              requires batch_size % R == 0; an eval loader's final partial batch is
              cut by numpy.array_split, so its shards may differ by one row or be
              empty).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool = True,
                 augment=None, seed: int = 0, device: str = "cpu", replicas=None):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Loader expects a minisam.data.Dataset; got {type(dataset).__name__}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32); got {seed!r}")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
        xp_for(device)  # fail now, not at the first batch, if the GPU is missing
        if replicas is not None:
            if not isinstance(replicas, (int, np.integer)) or replicas < 1:
                raise ValueError(f"replicas must be None or a positive int; got {replicas!r}")
            if batch_size % replicas:
                raise ValueError(
                    f"batch_size {batch_size} is not divisible by replicas={replicas}; "
                    f"choose a batch size that is a multiple of {replicas} "
                    f"(e.g. {batch_size - batch_size % replicas or replicas})")
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be a minisam.data.Augment or None; got "
                            f"{type(augment).__name__}")
        if augment is not None and not train:
            raise ValueError("augment is only applied when training; an eval loader "
                             "(train=False) takes augment=None")
        if train and len(dataset) < batch_size:
            raise ValueError(f"the {dataset.name} {dataset.split} set has {len(dataset)} "
                             f"examples, fewer than batch_size {batch_size}; a training "
                             "epoch drops the remainder and would be empty")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = augment
        self.seed = int(seed)
        self.device = device
        self.replicas = None if replicas is None else int(replicas)
        self._perm_cache = (None, None)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: floor(N / B) when training, ceil(N / B) for eval."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.train else -(-n // b)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (identity for eval loaders)."""
        if not self.train:
            return np.arange(len(self.dataset))
        cached_epoch, perm = self._perm_cache
        if cached_epoch != epoch:
            perm = np.random.default_rng([self.seed, 0, int(epoch)]).permutation(len(self.dataset))
            self._perm_cache = (epoch, perm)
        return perm

    def batch_rng(self, epoch: int, step: int) -> np.random.Generator:
        """The generator that augments step `step` of epoch `epoch`."""
        return np.random.default_rng([self.seed, 1, int(epoch), int(step)])

    def _check_position(self, epoch: int, step: int):
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range: an epoch has {self.steps_per_epoch} steps")
        if epoch < 0:
            raise IndexError(f"epoch must be >= 0; got {epoch}")

    def batch(self, epoch: int, step: int):
        """Batch `step` of epoch `epoch`, rebuilt from scratch (see module docstring)."""
        self._check_position(epoch, step)
        idx = self.permutation(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        images = to_device(self.dataset.images[idx], self.device)
        labels = to_device(self.dataset.labels[idx], self.device)
        if self.train and self.augment is not None:
            images = self.augment(images, self.batch_rng(epoch, step))
        if self.replicas is None:
            return images, labels
        if len(labels) % self.replicas == 0:
            b = len(labels) // self.replicas
            return [(images[r * b:(r + 1) * b], labels[r * b:(r + 1) * b])
                    for r in range(self.replicas)]
        sizes = [len(a) for a in np.array_split(np.arange(len(labels)), self.replicas)]
        bounds = np.cumsum([0] + sizes)
        return [(images[lo:hi], labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def shards(self, epoch: int, step: int, ranks) -> list:
        """The shards of training batch `step` of epoch `epoch` for the replicas `ranks`
        (a list of (images, labels), one per rank, in that order), building only their rows:
        bitwise the same as slicing `batch(epoch, step)`."""
        if not self.train:
            raise ValueError("shards() cuts training batches; an eval loader has batch()")
        self._check_position(epoch, step)
        n = self.replicas or 1
        b = self.batch_size // n
        idx = self.permutation(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        choices = None
        if self.augment is not None:
            choices = self.augment.draw(self.batch_rng(epoch, step),
                                        (self.batch_size, *self.dataset.image_shape))
        out = []
        for r in ranks:
            if not 0 <= r < n:
                raise IndexError(f"replica {r} out of range: this loader cuts {n} shards")
            rows = slice(r * b, (r + 1) * b)
            images = to_device(self.dataset.images[idx[rows]], self.device)
            if choices is not None:
                images = self.augment.apply(images, choices, rows)
            out.append((images, to_device(self.dataset.labels[idx[rows]], self.device)))
        return out

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield the batches of `epoch`, starting at `start_step` (to resume a run)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise IndexError(f"start_step {start_step} out of range [0, {self.steps_per_epoch}]")
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)

    def __iter__(self):
        """One pass: epoch 0 (the natural use for an eval loader)."""
        return self.epoch(0)

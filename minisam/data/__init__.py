"""Data for minisam: CIFAR-10/100 (tensorflow-datasets or the local archives),
embedded handwritten digits, synthetic data; augmentation; a reproducible loader.

    from minisam.data import load_dataset, Loader, Augment
    train, test = load_dataset("digits")                  # no download needed
    loader = Loader(train, 128, augment=Augment(crop_pad=1, flip=False), seed=0)
    for images, labels in loader.epoch(0): ...
"""
from .augment import (Augment, cutout, default_augment, pad_reflect, random_crop, random_flip,
                      symmetric_label_noise)
from .cifar import CIFAR_MEAN_STD, NUM_CLASSES
from .dataset import (DATASETS, SOURCES, Dataset, load_dataset, normalize, synthetic,
                      validation_split)
from .digits import resize_bilinear
from .loader import Loader

__all__ = [
    "Augment", "CIFAR_MEAN_STD", "DATASETS", "Dataset", "Loader", "NUM_CLASSES", "SOURCES",
    "cutout", "default_augment", "load_dataset", "normalize", "pad_reflect", "random_crop",
    "random_flip", "resize_bilinear", "symmetric_label_noise", "synthetic", "validation_split",
]

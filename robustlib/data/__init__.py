"""Data sets as validated NHWC arrays, and deterministic resumable batch iteration.

Example:
    >>> from robustlib import data
    >>> train = data.load("digits", "train")
    >>> images, labels = next(data.batches(train, 128, seed=0))
"""

from robustlib.data.augment import Augment, make_augment, random_crop, random_flip
from robustlib.data.cifar import read_cifar_archive, read_cifar_batch
from robustlib.data.dataset import Dataset, shuffle
from robustlib.data.errors import DataError
from robustlib.data.files import resolve_cache_dir, resolve_data_dir
from robustlib.data.idx import read_idx
from robustlib.data.info import DatasetInfo, info
from robustlib.data.iterate import batches, epoch_permutation, mixed_batches
from robustlib.data.loaders import load

__all__ = [
    "Augment",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "batches",
    "epoch_permutation",
    "mixed_batches",
    "info",
    "load",
    "make_augment",
    "random_crop",
    "random_flip",
    "read_cifar_archive",
    "read_cifar_batch",
    "read_idx",
    "resolve_cache_dir",
    "resolve_data_dir",
    "shuffle",
]

"""The in-memory data set: validated NHWC float images and int32 labels."""

from __future__ import annotations

import dataclasses

import numpy as np

from robustlib.data.errors import DataError
from robustlib.data.info import DatasetInfo


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Images and labels of one split, checked on construction.

    Attributes:
        images: float32 ``[N, H, W, C]`` with every value finite and in ``[0, 1]``;
            ``(H, W, C)`` equals ``info.input_shape``.
        labels: int32 ``[N]`` with every value in ``[0, info.num_classes)``.
        info: The description of the data set the split belongs to.

    Raises:
        DataError: On construction, if any of the conditions above fails.

    Example:
        >>> from robustlib import data
        >>> ds = data.Dataset(np.zeros((2, 8, 8, 1), np.float32),
        ...                   np.array([0, 9], np.int32), data.info("digits"))
        >>> len(ds)
        2
    """

  images: np.ndarray
  labels: np.ndarray
  info: DatasetInfo

  def __post_init__(self) -> None:
    name = self.info.name
    images, labels = self.images, self.labels
    if not isinstance(images, np.ndarray) or images.ndim != 4:
      raise DataError(f"{name}: images must be a numpy array of rank 4 [N, H, W, C]; got "
                      f"{type(images).__name__} with shape {getattr(images, 'shape', None)}.")
    if images.dtype != np.float32:
      raise DataError(f"{name}: images must be float32; got {images.dtype}.")
    if tuple(images.shape[1:]) != tuple(self.info.input_shape):
      raise DataError(f"{name}: image shape {tuple(images.shape[1:])} differs from "
                      f"info.input_shape {tuple(self.info.input_shape)} (expected NHWC).")
    if not np.isfinite(images).all():
      raise DataError(f"{name}: images contain NaN or infinite values.")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise DataError(f"{name}: pixel values must lie in [0, 1]; got range "
                      f"[{images.min()}, {images.max()}].")
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int32:
      raise DataError(f"{name}: labels must be an int32 numpy array [N]; got "
                      f"{getattr(labels, 'dtype', type(labels).__name__)} with shape "
                      f"{getattr(labels, 'shape', None)}.")
    if labels.shape[0] != images.shape[0]:
      raise DataError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= self.info.num_classes):
      raise DataError(f"{name}: labels must lie in [0, {self.info.num_classes}); got range "
                      f"[{labels.min()}, {labels.max()}].")

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def from_uint8(images: np.ndarray, labels: np.ndarray, data_info: DatasetInfo) -> Dataset:
  """Builds a `Dataset` from raw 8-bit pixels.

    Args:
        images: uint8 ``[N, H, W, C]``, or ``[N, H, W]`` for one channel.
        labels: integer ``[N]``.
        data_info: Description of the data set.

    Returns:
        A `Dataset` with images ``pixel / 255`` as float32 and labels as int32.
    """
  if images.dtype != np.uint8:
    raise DataError(f"{data_info.name}: raw images must be uint8; got {images.dtype}.")
  scaled = images.astype(np.float32)
  scaled /= 255.0
  if scaled.ndim == 3:
    scaled = scaled[..., None]
  return Dataset(scaled, labels.astype(np.int32), data_info)


def shuffle(dataset: Dataset, seed: int) -> Dataset:
  """Returns the examples of ``dataset`` in a random order.

    Args:
        dataset: The data set to reorder; it is not modified.
        seed: The order is ``np.random.default_rng(seed).permutation(len(dataset))``,
            identical on every platform.

    Returns:
        A new `Dataset` with the same `info`, images and labels permuted together.
    """
  order = np.random.default_rng(seed).permutation(len(dataset))
  return Dataset(dataset.images[order], dataset.labels[order], dataset.info)

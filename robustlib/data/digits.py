"""The embedded default data set: scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

import numpy as np

from robustlib.data.errors import DataError

NUM_IMAGES = 1797
CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_PIXEL = 16.0


def split_indices(labels: np.ndarray,
                  *,
                  test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Stratified split: a fixed random ``test_fraction`` of each class goes to test.

    Classes are visited in increasing order with one generator
    ``np.random.default_rng(seed)``; for a class with ``n`` examples the first
    ``floor(test_fraction * n + 0.5)`` entries of ``rng.permutation(class_indices)`` are
    test examples.

    Args:
        labels: int ``[N]``.
        test_fraction: Fraction of each class held out.
        seed: Seed of the generator.

    Returns:
        ``(train_indices, test_indices)``, each int64 and sorted, disjoint, covering
        ``range(N)``.
    """
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.append(members[:int(np.floor(test_fraction * len(members) + 0.5))])
  test_indices = np.sort(np.concatenate(test)).astype(np.int64)
  train_indices = np.setdiff1d(np.arange(len(labels)), test_indices).astype(np.int64)
  return train_indices, test_indices


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns all 1797 digits, checked against their known size and class counts.

    Returns:
        ``(images, labels)``: float32 ``[1797, 8, 8, 1]`` in ``[0, 1]`` (pixels / 16) and
        int32 ``[1797]``.

    Raises:
        DataError: If scikit-learn is missing or ships different data.
    """
  try:
    from sklearn.datasets import load_digits  # Imported lazily: only digits needs it.
  except ImportError as e:
    raise DataError("The 'digits' data set ships with scikit-learn, which is not installed: "
                    "pip install scikit-learn.") from e
  bunch = load_digits()
  images = np.asarray(bunch.images)
  labels = np.asarray(bunch.target)
  counts = tuple(np.bincount(labels.astype(np.int64), minlength=10).tolist())
  if images.shape != (NUM_IMAGES, 8, 8) or labels.shape != (NUM_IMAGES,):
    raise DataError(f"sklearn.datasets.load_digits returned images {images.shape} and labels "
                    f"{labels.shape}; expected ({NUM_IMAGES}, 8, 8) and ({NUM_IMAGES},).")
  if counts != CLASS_COUNTS:
    raise DataError(f"sklearn.datasets.load_digits has class counts {counts}; expected "
                    f"{CLASS_COUNTS}.")
  if images.min() < 0 or images.max() > MAX_PIXEL:
    raise DataError(f"sklearn.datasets.load_digits pixels lie in [{images.min()}, {images.max()}]; "
                    f"expected [0, {MAX_PIXEL:g}].")
  scaled = (images / MAX_PIXEL).astype(np.float32)[..., None]
  return scaled, labels.astype(np.int32)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns one split of the digits: 1438 train or 359 test examples.

    Per class (counts `CLASS_COUNTS`) the test split holds
    (36, 36, 35, 37, 36, 36, 36, 36, 35, 36) examples; see `split_indices`.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: float32 ``[N, 8, 8, 1]`` and int32 ``[N]``, in the order of
        the original data.
    """
  images, labels = load_digits_arrays()
  train, test = split_indices(labels)
  chosen = train if split == "train" else test
  return images[chosen], labels[chosen]

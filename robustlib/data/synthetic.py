"""Deterministic random images for smoke tests and throughput benchmarks."""

from __future__ import annotations

import numpy as np

from robustlib.data.info import DatasetInfo

_SEEDS = {"train": 0, "test": 1}


def synthetic_arrays(data_info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns uniform random images and labels shaped like ``data_info``.

    Args:
        data_info: Description of a ``"synthetic:<name>"`` data set (see `info`).
        split: ``"train"`` (generator seed ``[0, 0]``) or ``"test"`` (seed ``[0, 1]``).

    Returns:
        ``(images, labels)``: float32 ``[N, H, W, C]`` uniform in ``[0, 1)`` and int32
        ``[N]`` uniform in ``[0, num_classes)``, where ``N = data_info.split_size(split)``.
        The same call always returns the same values.
    """
  n = data_info.split_size(split)
  rng = np.random.default_rng([0, _SEEDS[split]])
  images = rng.random((n, *data_info.input_shape), dtype=np.float32)
  labels = rng.integers(0, data_info.num_classes, size=n).astype(np.int32)
  return images, labels

"""Deterministic, resumable iteration over training batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import numpy as np

from robustlib import parallel
from robustlib.data.dataset import Dataset
from robustlib.data.errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """Returns the order in which epoch ``epoch`` visits ``n`` examples.

    Args:
        n: Number of examples.
        seed: Seed of the run.
        epoch: Epoch index, from 0.

    Returns:
        int64 ``[n]``: ``np.random.default_rng([seed, epoch]).permutation(n)``, the same on
        every platform and numpy version that keeps the PCG64 stream.
    """
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def _batch_axis_size(sharding: jax.sharding.Sharding, batch_shape: tuple[int, ...]) -> int:
  """Number of shards the batch (leading) dimension is split into."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    axes = spec[0] if spec else None
    if axes is None:
      return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return 1
  try:
    index_map = sharding.devices_indices_map(batch_shape)
  except Exception as e:
    raise DataError(f"cannot shard a batch of shape {batch_shape} with {sharding}: {e}") from e
  return len({
      index[0].indices(batch_shape[0]) if index else (0, batch_shape[0], 1)
      for index in index_map.values()
  })


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    sharding: jax.sharding.Sharding | None = None,
) -> Iterator[tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]]:
  """Yields training batches forever, in an order fixed by ``seed``.

    With ``steps_per_epoch = len(dataset) // batch_size`` (the last partial batch of each
    epoch is dropped), step ``s`` is batch ``s % steps_per_epoch`` of epoch
    ``e = s // steps_per_epoch``, taken from ``epoch_permutation(len(dataset), seed, e)``.
    The stream from ``start_step=k`` is therefore the stream from 0 with its first ``k``
    batches skipped, which lets a killed run resume exactly.

    Args:
        dataset: The training set.
        batch_size: Global number of examples per batch.
        seed: Seed of the shuffling.
        start_step: Index of the first batch yielded.
        sharding: If given, each batch becomes a global `jax.Array` with this sharding,
            built with `jax.make_array_from_process_local_data` from the rows owned by this
            process's devices (every process computes the same global batch), so it works
            for one or many processes. It is applied to both images and labels, so it
            should partition only the leading (batch) axis, e.g.
            ``NamedSharding(mesh, PartitionSpec("data"))``.

    Yields:
        ``(images, labels)``: float32 ``[batch_size, H, W, C]`` and int32
        ``[batch_size]``; numpy arrays without ``sharding``, `jax.Array` with it.

    Raises:
        DataError: If ``batch_size`` is not positive, exceeds ``len(dataset)``, or is not
            divisible by the number of devices the batch axis is split over; or if
            ``start_step`` is negative. Raised by the call itself, before iterating.

    Example:
        >>> it = batches(load("digits"), 128, seed=0)
        >>> images, labels = next(it)  # [128, 8, 8, 1], [128]
    """
  n = len(dataset)
  if batch_size <= 0 or batch_size > n:
    raise DataError(f"batch_size must be in [1, {n}] for {dataset.info.name} with {n} examples; "
                    f"got {batch_size}.")
  if start_step < 0:
    raise DataError(f"start_step must be >= 0; got {start_step}.")
  _check_shards(sharding, batch_size, dataset.images.shape[1:])
  return _generate(dataset, batch_size, seed, start_step, sharding)


def _check_shards(sharding, batch_size: int, image_shape) -> None:
  if sharding is not None:
    shards = _batch_axis_size(sharding, (batch_size, *image_shape))
    if batch_size % shards:
      raise DataError(f"batch_size {batch_size} is not divisible by the {shards} devices the batch "
                      f"axis is sharded over; use a multiple of {shards}.")


def _placed(images: np.ndarray, labels: np.ndarray, sharding):
  if sharding is None:
    return images, labels
  return (parallel.place_global_batch(images,
                                      sharding), parallel.place_global_batch(labels, sharding))


def _generate(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int,
    sharding: jax.sharding.Sharding | None,
) -> Iterator[tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]]:
  """The generator behind `batches`, whose arguments are already validated."""
  n = len(dataset)
  steps_per_epoch = n // batch_size
  epoch, position = divmod(start_step, steps_per_epoch)
  while True:
    order = epoch_permutation(n, seed, epoch)
    for b in range(position, steps_per_epoch):
      chosen = order[b * batch_size:(b + 1) * batch_size]
      yield _placed(dataset.images[chosen], dataset.labels[chosen], sharding)
    epoch, position = epoch + 1, 0


def mixed_batches(
    first: Dataset,
    second: Dataset,
    batch_size: int,
    second_size: int,
    *,
    seed: int,
    start_step: int = 0,
    sharding: jax.sharding.Sharding | None = None,
) -> Iterator[tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]]:
  """Batches of ``batch_size - second_size`` rows of ``first`` then ``second_size`` rows of
  ``second``, each drawn as `batches` draws (``seed`` and ``seed + 1``; each its own epochs),
  so step ``s`` of a resumed run is step ``s`` of an uninterrupted one.

  Raises:
    DataError: unless both parts have at least one row and fit their data sets, and
      ``batch_size`` splits over ``sharding``'s devices.
  """
  if not 0 < second_size < batch_size:
    raise DataError(f"the second source's share of a batch must be in [1, {batch_size - 1}] "
                    f"rows; got {second_size}.")
  _check_shards(sharding, batch_size, first.images.shape[1:])
  parts = (batches(first, batch_size - second_size, seed=seed, start_step=start_step),
           batches(second, second_size, seed=seed + 1, start_step=start_step))
  return (_placed(np.concatenate([xa, xb]), np.concatenate([ya, yb]), sharding)
          for (xa, ya), (xb, yb) in zip(*parts))

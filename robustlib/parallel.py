"""Data parallelism with `jax.sharding`: one mesh axis over the local devices."""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A one-axis mesh named ``"data"`` over the first ``num_devices`` devices.

  Args:
    num_devices: how many of ``jax.devices()`` to use; 0 means all of them.

  Returns:
    A ``jax.sharding.Mesh``. With several processes (``jax.distributed``) the
    mesh spans every process's devices.
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"num_devices must be in [0, {len(devices)}] (0 = all), got {num_devices}")
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension across the mesh."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Replicates an array on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the mesh."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{name}={batch_size} must be divisible by the number of devices ({n}) "
                     "so that every device gets the same share of the batch")


def place_global_batch(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Places a global batch that every process holds in full on ``sharding``.

  Each process contributes only the rows its own devices hold
  (``jax.make_array_from_process_local_data``), so this works for one process
  and for many (``jax.distributed``).

  Args:
    array: the global batch ``[B, ...]``, identical on every process.
    sharding: where it goes; the leading axis may be split across devices.
  """
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(array.shape).values():
    start, stop, _ = (index[0] if index else slice(None)).indices(array.shape[0])
    starts.append(start)
    stops.append(stop)
  rows = slice(min(starts), max(stops))
  return jax.make_array_from_process_local_data(sharding, array[rows], array.shape)


def to_host(tree: Any) -> Any:
  """``tree``'s arrays as NumPy arrays on every process, whole.

  An array split across devices of other processes (``jax.distributed``) is
  gathered with ``multihost_utils.process_allgather``: a collective, so every
  process calls this at the same point of the same program. Other values are
  fetched with ``jax.device_get``.
  """

  def fetch(v):
    if isinstance(v, jax.Array) and not v.is_fully_addressable and not v.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(v, tiled=True))
    return np.asarray(jax.device_get(v)) if isinstance(v, jax.Array) else v

  return jax.tree.map(fetch, tree)

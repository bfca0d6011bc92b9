"""Per-channel input normalization, the first operation of every model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from robustlib.models.inputs import ModelInputError, check_stats


class Normalize(nn.Module):
  """Computes ``(x - mean) / std`` over the channel axis of an NHWC batch.

  Keeping normalization inside the model means data stays in [0, 1] and an
  attack's epsilon is measured in input units. The module has no variables.

  Attributes:
    mean: one value, or one per channel.
    std: one nonzero value, or one per channel.

  Example:
    >>> Normalize((0.5,), (0.25,)).apply({}, jnp.ones((1, 2, 2, 1)))  # all 2.0
  """

  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes a batch.

    Args:
      x: float ``[N, H, W, C]``.

    Returns:
      ``[N, H, W, C]`` with ``(x - mean) / std`` per channel.

    Raises:
      ModelInputError: if ``x`` does not have rank 4 or the statistics do not
        match its channel count.
    """
    if x.ndim != 4:
      raise ModelInputError(f"models take a batch [N, H, W, C] of rank 4, got shape {x.shape}")
    check_stats(self.mean, self.std, x.shape[-1])
    mean = jnp.asarray(self.mean, x.dtype)
    std = jnp.asarray(self.std, x.dtype)
    return (x - mean) / std

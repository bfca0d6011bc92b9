"""Checks that an input batch, or the statistics that normalize it, fit a model.

The checks read shapes and dtypes only, so they run on concrete arrays and on
tracers alike (at trace time inside ``jax.jit``).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from robustlib.checks import InputError


class ModelInputError(InputError):
  """An input, its normalization statistics or an option does not fit the model."""


def check_input(x, input_shape: Sequence[int], name: str = "x") -> None:
  """Checks that ``x`` is a float batch of images of shape ``input_shape``.

  Args:
    x: array or tracer ``[N, H, W, C]``.
    input_shape: the expected ``(H, W, C)``.
    name: the argument's name, used in error messages.

  Raises:
    ModelInputError: if ``x`` does not have rank 4, its trailing shape is not
      ``input_shape`` or its dtype is not floating.

  Example:
    >>> check_input(jnp.zeros((2, 28, 28, 1)), (28, 28, 1))
  """
  expected = tuple(int(d) for d in input_shape)
  shape = tuple(x.shape)
  if len(shape) != 4:
    raise ModelInputError(f"{name} must be a batch [N, H, W, C] of rank 4 with [H, W, C] = "
                          f"{list(expected)}, got rank {len(shape)} with shape {shape}")
  if shape[1:] != expected:
    raise ModelInputError(f"{name} must have shape [N, {', '.join(map(str, expected))}] "
                          f"(input_shape {expected}), got {shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ModelInputError(f"{name} must have a floating dtype (images in [0, 1]), got {x.dtype}")


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
  """Checks per-channel normalization statistics against a channel count.

  Args:
    mean: one value, or one per channel.
    std: one nonzero value, or one per channel.
    channels: the number of input channels ``C``.

  Raises:
    ModelInputError: if a length is neither 1 nor ``channels`` or ``std``
      holds a zero.
  """
  for label, stat in (("mean", mean), ("std", std)):
    if len(stat) not in (1, channels):
      raise ModelInputError(f"{label} must have 1 or C={channels} values (one per channel), "
                            f"got {len(stat)}: {tuple(stat)}")
  if any(float(s) == 0.0 for s in std):
    raise ModelInputError(f"std must be nonzero, got {tuple(std)}")

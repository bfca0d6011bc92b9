"""Host-side input validation with errors that name the problem.

These checks run on concrete arrays before they enter compiled code, where a NaN
or an out-of-range pixel would otherwise give a silently wrong answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class InputError(ValueError):
  """An input array has the wrong shape, dtype, range or values."""


def check_images(
    x,
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    name: str = "x",
    rank: int | None = None,
) -> None:
  """Checks a batch of inputs before it is used.

  Args:
    x: array ``[N, ...]`` of a floating dtype (a concrete array, not a tracer).
    bounds: the closed box every value must lie in, or None for no range check.
    name: the argument's name, used in error messages.
    rank: the required number of dimensions, if any.

  Raises:
    InputError: naming the shape, dtype, non-finite values or values outside
      ``bounds``, with the index of the first offending example.
  """
  arr = np.asarray(x)
  if rank is not None and arr.ndim != rank:
    raise InputError(f"{name} must have rank {rank}, got shape {arr.shape}")
  if arr.ndim < 1:
    raise InputError(f"{name} must have a leading batch dimension, got a scalar")
  if not np.issubdtype(arr.dtype, np.floating):
    raise InputError(f"{name} must have a floating dtype (float32 images in "
                     f"{list(bounds) if bounds else 'any range'}), got {arr.dtype}; "
                     "scale integer pixels first, e.g. x.astype(np.float32) / 255")
  finite = np.isfinite(arr)
  if not finite.all():
    bad = np.flatnonzero(~finite.reshape(arr.shape[0], -1).all(axis=1))
    raise InputError(f"{name} contains {int((~finite).sum())} NaN or infinite values "
                     f"(in {bad.size} examples, first at index {int(bad[0])})")
  if bounds is not None and arr.size:
    lo, hi = float(arr.min()), float(arr.max())
    if lo < bounds[0] or hi > bounds[1]:
      out = (arr < bounds[0]) | (arr > bounds[1])
      first = int(np.flatnonzero(out.reshape(arr.shape[0], -1).any(axis=1))[0])
      raise InputError(f"{name} must lie in [{bounds[0]}, {bounds[1]}], found values in "
                       f"[{lo:g}, {hi:g}] (first offending example at index {first}); "
                       "models take unnormalized inputs and normalize inside")


def check_labels(y,
                 *,
                 num_examples: int | None = None,
                 num_classes: int | None = None,
                 name: str = "y") -> None:
  """Checks integer class labels ``[N]``.

  Raises:
    InputError: for a wrong rank, a non-integer dtype, a length that differs
      from ``num_examples`` or a label outside ``[0, num_classes)``.
  """
  arr = np.asarray(y)
  if arr.ndim != 1:
    raise InputError(f"{name} must be a vector of labels [N], got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise InputError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
  if num_examples is not None and arr.shape[0] != num_examples:
    raise InputError(f"{name} has {arr.shape[0]} labels but there are {num_examples} examples")
  if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
    raise InputError(f"{name} must lie in [0, {num_classes}), found labels in "
                     f"[{int(arr.min())}, {int(arr.max())}]")


def check_shape(shape: Sequence[int], expected: Sequence[int], name: str) -> None:
  """Raises InputError unless ``shape == expected`` (``-1`` matches any size)."""
  shape, expected = tuple(shape), tuple(expected)
  if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected)):
    want = tuple("N" if e == -1 else e for e in expected)
    raise InputError(f"{name} must have shape {want}, got {shape}")

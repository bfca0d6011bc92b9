"""Host-side input validation with errors that name the problem.

These checks run on concrete arrays before they enter compiled code, where a NaN
or an out-of-range pixel would otherwise give a silently wrong answer. Given a
tracer (inside ``jit``, ``vmap`` or ``grad``) they check what is known at trace
time, shapes and dtypes, and skip the checks of values.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class InputError(ValueError):
  """An input array has the wrong shape, dtype, range or values."""


def is_traced(*values: Any) -> bool:
  """True when any leaf of ``values`` is a tracer (inside jit, vmap or grad)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating value of ``tree`` is finite: a boolean scalar (traceable)."""
  leaves = [v for v in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(v).all() for v in leaves])) if leaves else jnp.array(True)


def _shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
  """``x``'s shape and dtype without reading its values (tracers included)."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), np.dtype(x.dtype)
  arr = np.asarray(x)
  return arr.shape, arr.dtype


def check_images(
    x,
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    name: str = "x",
    rank: int | None = None,
) -> None:
  """Checks a batch of inputs before it is used.

  Args:
    x: array ``[N, ...]`` of a floating dtype. Of a tracer only the shape and
      dtype are checked.
    bounds: the closed box every value must lie in, or None for no range check.
    name: the argument's name, used in error messages.
    rank: the required number of dimensions, if any.

  Raises:
    InputError: naming the shape, dtype, non-finite values or values outside
      ``bounds``, with the index of the first offending example.
  """
  shape, dtype = _shape_dtype(x)
  if rank is not None and len(shape) != rank:
    raise InputError(f"{name} must have rank {rank}, got shape {shape}")
  if len(shape) < 1:
    raise InputError(f"{name} must have a leading batch dimension, got a scalar")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise InputError(f"{name} must have a floating dtype (float32 images in "
                     f"{list(bounds) if bounds else 'any range'}), got {dtype}; "
                     "scale integer pixels first, e.g. x.astype(np.float32) / 255")
  if is_traced(x):
    return
  arr = np.asarray(x)
  if arr.dtype.itemsize < 4:  # float16, bfloat16: NumPy's checks in float32
    arr = arr.astype(np.float32)
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

  Of a tracer only the rank, dtype and length are checked, not the values.

  Raises:
    InputError: for a wrong rank, a non-integer dtype, a length that differs
      from ``num_examples`` or a label outside ``[0, num_classes)``.
  """
  shape, dtype = _shape_dtype(y)
  if len(shape) != 1:
    raise InputError(f"{name} must be a vector of labels [N], got shape {shape}")
  if not np.issubdtype(dtype, np.integer):
    raise InputError(f"{name} must hold integer class labels, got dtype {dtype}")
  if num_examples is not None and shape[0] != num_examples:
    raise InputError(f"{name} has {shape[0]} labels but there are {num_examples} examples")
  if is_traced(y):
    return
  arr = np.asarray(y)
  if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
    raise InputError(f"{name} must lie in [0, {num_classes}), found labels in "
                     f"[{int(arr.min())}, {int(arr.max())}]")


def as_key(key: Any, name: str = "key") -> jax.Array:
  """A PRNG key from what every public function takes as one: a key
  (``jax.random.key(seed)``, or keys ``[N]``, one per example), a raw ``PRNGKey``
  (uint32 ``[2]``) or an int seed.

  Raises:
    InputError: for anything else (None, a float, an array of another dtype or shape).
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim <= 1:
      return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
      return jnp.asarray(key)
  got = f"{key.dtype}{list(key.shape)}" if hasattr(key, "dtype") else repr(key)[:60]
  raise InputError(f"{name} must be a PRNG key (jax.random.key(seed)) or an int seed, got {got}")


def check_eps(eps: Any, *, num_examples: int | None = None, name: str = "eps") -> None:
  """Checks a radius: a scalar or one per example ``[N]``, finite and >= 0.

  The shape is always checked; the values only when ``eps`` is concrete.

  Raises:
    InputError: for a shape other than ``()`` or ``[num_examples]``, or a
      negative, NaN or infinite value.
  """
  shape, _ = _shape_dtype(eps)
  if len(shape) > 1 or (len(shape) == 1 and num_examples is not None and shape[0] != num_examples):
    n = "" if num_examples is None else f" with N={num_examples}"
    raise InputError(f"{name} must be a scalar or a vector [N]{n}, got shape {shape}")
  if is_traced(eps):
    return
  arr = np.asarray(eps, dtype=np.float64)
  bad = ~np.isfinite(arr) | (arr < 0)
  if bad.any():
    if arr.ndim == 0:
      got = f"{float(arr):g}"
    else:
      first = int(np.flatnonzero(bad)[0])
      got = f"{int(bad.sum())} bad values (first {arr[first]:g} at index {first})"
    raise InputError(f"{name} must be >= 0 and finite, got {got}")


def check_logits_shape(logits: Any,
                       num_examples: int,
                       min_classes: int = 2,
                       what: str = "this attack") -> int:
  """Trace-time check of ``logits_fn``'s output (an array or `jax.ShapeDtypeStruct`).

  Args:
    logits: the output, or its shape and dtype from `jax.eval_shape`.
    num_examples: N, the batch size of the input.
    min_classes: the fewest classes allowed.
    what: who needs them, for the error message.

  Returns:
    The number of classes K.

  Raises:
    InputError: unless the logits are floating ``[N, K]`` with ``K >= min_classes``.
  """
  if not (hasattr(logits, "shape") and hasattr(logits, "dtype")):
    got = "None" if logits is None else f"a {type(logits).__name__}"
    raise InputError(f"logits_fn must return one array of logits [N, K], it returned {got}")
  shape = tuple(logits.shape)
  if len(shape) != 2 or shape[0] != num_examples:
    raise InputError(f"logits_fn must map [N, ...] to logits [N, K]; for N={num_examples} "
                     f"it returned shape {shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise InputError(f"logits_fn must return floating logits, got dtype {logits.dtype}")
  num_classes = shape[1]
  if num_classes < min_classes:
    raise InputError(f"{what} needs at least {min_classes} classes, "
                     f"logits_fn returns {num_classes}")
  return num_classes


def check_bounds(bounds: Sequence[float] | None) -> tuple[float, float] | None:
  """Checks a valid input box ``(lower, upper)``, or None for no box; returns floats."""
  if bounds is None:
    return None
  try:
    lo, hi = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise InputError(f"bounds must be (lower, upper) with lower <= upper, got {bounds!r}") from None
  if not lo <= hi:
    raise InputError(f"bounds must be (lower, upper) with lower <= upper, got {(lo, hi)}")
  return lo, hi

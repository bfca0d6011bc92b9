"""Functional pipelines: models become pure ``logits_fn(x) -> logits`` functions.

Every later API (attacks, bounds, evaluation) takes a ``LogitsFn``: any JAX
callable mapping inputs ``[N, ...]`` to logits ``[N, K]``. A Flax model becomes
one with :func:`as_logits_fn`; plain functions compose with :func:`compose`.

Example::

  model = robustlib.models.create("mlp", num_classes=10, input_shape=(8, 8, 1))
  variables = robustlib.models.init(model, jax.random.key(0), (8, 8, 1))
  logits_fn = robustlib.as_logits_fn(model, variables)
  logits = logits_fn(x)                           # [N, 10]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from robustlib.checks import InputError, check_logits_shape
from robustlib.models import check_input

LogitsFn = Callable[[jax.Array], jax.Array]


def as_logits_fn(model, variables: Any, input_shape: Sequence[int] | None = None) -> LogitsFn:
  """Binds a Flax model and its variables into an eval-mode pure function.

  BatchNorm uses its running statistics and nothing is mutated, so the result
  can be jitted, vmapped, differentiated and attacked safely.

  Args:
    model: a ``flax.linen.Module`` whose ``__call__(x, train)`` returns logits.
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    input_shape: ``(H, W, C)``; when given, calls with another trailing shape
      or a non-float dtype raise a clear error at trace time.

  Returns:
    ``logits_fn(x: [N, *input_shape]) -> [N, K]``; a call with variables that do not
    fit the model (another model's, a missing collection) raises InputError.
  """

  def logits_fn(x: jax.Array) -> jax.Array:
    if input_shape is not None:
      check_input(x, tuple(input_shape))
    try:
      return model.apply(variables, x, train=False)
    except flax.errors.FlaxError as e:
      first = str(e).splitlines()[0].split(" (https://")[0]
      raise InputError(f"the variables do not fit the {type(model).__name__} model: "
                       f"{first}") from None

  return logits_fn


def compose(*fns: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """``compose(f, g, h)(x) == f(g(h(x)))``; with no functions, the identity."""
  for i, fn in enumerate(fns):
    if not callable(fn):
      raise InputError(f"compose takes functions; argument {i} is a {type(fn).__name__}")

  def composed(x):
    for fn in reversed(fns):
      x = fn(x)
    return x

  return composed


def normalize(mean: Sequence[float], std: Sequence[float]) -> Callable[[jax.Array], jax.Array]:
  """Per-channel ``(x - mean) / std`` over the last axis, as a pure function.

  Use it to put a model trained on normalized data behind the unnormalized
  input space that attacks and bounds work in:
  ``compose(raw_logits_fn, normalize(mean, std))``.
  """
  try:
    mean_arr = jnp.atleast_1d(jnp.asarray(mean, jnp.float32))
    std_arr = jnp.atleast_1d(jnp.asarray(std, jnp.float32))
  except (TypeError, ValueError):
    raise InputError(f"mean and std must be numbers or vectors of numbers, got {mean!r} and "
                     f"{std!r}") from None
  vectors = np.ndim(mean) == 1 and np.ndim(std) == 1  # a scalar stands for every channel
  if mean_arr.ndim != 1 or std_arr.ndim != 1 or (mean_arr.shape != std_arr.shape and
                                                 (vectors or
                                                  1 not in (mean_arr.size, std_arr.size))):
    raise InputError(f"mean and std must be numbers or vectors of equal length (one per "
                     f"channel), got shapes {np.shape(mean)} and {np.shape(std)}")
  mean_arr, std_arr = jnp.broadcast_arrays(mean_arr, std_arr)
  if not bool(jnp.isfinite(mean_arr).all()) or bool((~(std_arr > 0)).any()):
    raise InputError(f"std must be positive and mean and std finite, got mean {mean!r} and "
                     f"std {std!r}")

  def fn(x: jax.Array) -> jax.Array:
    if x.shape[-1] != mean_arr.shape[0] and mean_arr.shape[0] != 1:
      raise InputError(f"normalize has {mean_arr.shape[0]} channels but the input has "
                       f"{x.shape[-1]} (shape {x.shape})")
    return (x - mean_arr) / std_arr

  return fn


def check_logits_fn(logits_fn: LogitsFn, x_shape: Sequence[int], dtype=jnp.float32) -> int:
  """Checks, without running it, that ``logits_fn`` maps ``[N, ...]`` to ``[N, K]``.

  Returns:
    The number of classes ``K``.

  Raises:
    InputError: if the output is not a rank-2 floating array with the batch size
      of the input.
  """
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(tuple(x_shape), dtype))
  return check_logits_shape(out, x_shape[0], min_classes=1, what="logits_fn")

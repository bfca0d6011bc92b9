"""Batched evaluation that compiles once and runs over a data set in fixed-size batches."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from robustlib import compilation
from robustlib import parallel
from robustlib.checks import check_images, check_labels, check_logits_shape


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the leading axis with copies of the last row to a multiple of ``multiple``."""
  remainder = (-x.shape[0]) % multiple
  if not remainder:
    return x
  return np.concatenate([x, np.repeat(x[-1:], remainder, axis=0)], axis=0)


def batched_apply(
    fn: Callable[..., Any],
    x,
    *,
    batch_size: int = 256,
    params: Any = None,
    sharding: jax.sharding.Sharding | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> Any:
  """Applies ``fn`` to ``x`` in fixed-size batches and concatenates the outputs.

  The last batch is padded to ``batch_size`` so that every call has the same
  shape and ``fn`` compiles once; padded rows are dropped from the result.

  Args:
    fn: ``fn(x_batch) -> pytree of [B, ...]``, or ``fn(params, x_batch)`` when
      ``params`` is given (pass parameters that change, e.g. during training,
      this way so that a new value does not trigger a new compilation). A
      function already made by `robustlib.compilation.jit` is used as it is, so
      one made once compiles once for all calls.
    x: inputs ``[N, ...]`` (host or device array), or a tuple of such arrays with
      the same ``N``, batched alike and passed as ``fn(*batches)``.
    batch_size: rows per call.
    params: optional first argument of ``fn``.
    sharding: optional sharding for each input batch (data parallelism).
    desc: label of the progress bar.
    progress: show a progress bar with rate and ETA.

  Returns:
    The outputs for all ``N`` rows, as NumPy arrays with ``fn``'s structure.
  """
  arrays = tuple(np.asarray(a) for a in (x if isinstance(x, tuple) else (x,)))
  n = arrays[0].shape[0]
  if n == 0:
    raise ValueError("batched_apply needs at least one example")
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"inputs of different lengths: {[a.shape[0] for a in arrays]}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  batch_size = min(batch_size, n) if sharding is None else batch_size
  padded = [pad_to_multiple(a, batch_size) for a in arrays]
  jitted = compilation.jit(fn)
  outputs = []
  num_batches = padded[0].shape[0] // batch_size
  bar = tqdm(total=n,
             desc=desc or "evaluate",
             unit="ex",
             leave=False,
             disable=not progress or num_batches < 2)
  for i in range(num_batches):
    batch = [a[i * batch_size:(i + 1) * batch_size] for a in padded]
    if sharding is not None:
      batch = [parallel.place_global_batch(b, sharding) for b in batch]
    out = jitted(*batch) if params is None else jitted(params, *batch)
    outputs.append(out)
    bar.update(min(batch_size, n - i * batch_size))
  bar.close()
  outputs = parallel.to_host(outputs)
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:n], *outputs)


def accuracy_fn(
    logits_fn: Callable[..., jax.Array],
    *,
    batch_size: int = 256,
    sharding: jax.sharding.Sharding | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0)
) -> Callable[..., float]:
  """``accuracy(x, y, params=None, progress=False) -> float``: `accuracy` of ``logits_fn``,
  compiled once for every call (a training run's evaluation every ``eval_every`` steps)."""

  def predict(*args):
    return jnp.argmax(logits_fn(*args), axis=-1)

  predict = compilation.jit(predict)

  def accuracy_of(x, y, params: Any = None, progress: bool = False) -> float:
    check_images(x, bounds=bounds)
    check_labels(y, num_examples=np.shape(x)[0])
    first = jax.ShapeDtypeStruct((1,) + np.shape(x)[1:], jnp.result_type(x))
    out = jax.eval_shape(logits_fn, *((first,) if params is None else (params, first)))
    check_labels(y, num_classes=check_logits_shape(out, 1, min_classes=1, what="accuracy"))
    pred = batched_apply(predict,
                         x,
                         batch_size=batch_size,
                         params=params,
                         sharding=sharding,
                         desc="accuracy",
                         progress=progress)
    return float(np.mean(pred == np.asarray(y)))

  return accuracy_of


def accuracy(
    logits_fn: Callable[..., jax.Array],
    x,
    y,
    *,
    batch_size: int = 256,
    params: Any = None,
    sharding: jax.sharding.Sharding | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    progress: bool = True,
) -> float:
  """Top-1 accuracy of ``logits_fn`` on ``(x, y)`` (for repeated calls, `accuracy_fn`).

  Args:
    logits_fn: ``logits_fn(x) -> [B, K]`` or ``logits_fn(params, x)``.
    x: inputs ``[N, ...]`` inside ``bounds``; checked for NaNs and range.
    y: integer labels ``[N]``.
    batch_size, params, sharding, progress: as in :func:`batched_apply`.
    bounds: the input box ``x`` must lie in (None to skip the range check).

  Returns:
    The fraction of examples whose arg-max logit equals the label.
  """
  return accuracy_fn(logits_fn, batch_size=batch_size, sharding=sharding,
                     bounds=bounds)(x, y, params, progress)

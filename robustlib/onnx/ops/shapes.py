"""Shapes, indexing and reductions: reshapes, transposes, slices, gathers, pads, reduces."""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib.onnx.nodes import _depends, _xp
from robustlib.onnx.ops.helpers import _attr_or_input, _axis, _reshape_to


def _flatten(ctx, x):
  shape = ctx.shape(x)
  axis = _axis(ctx, int(ctx.attr("axis", 1)), len(shape), inclusive=True)
  return _reshape_to(ctx, x, (math.prod(shape[:axis]), math.prod(shape[axis:])))


def _reshape(ctx, x, shape):
  target = ctx.ints(shape, "the target shape")
  in_shape = ctx.shape(x)
  allowzero = ctx.opset >= 14 and ctx.attr("allowzero", 0)
  out = list(target)
  for i, d in enumerate(out):
    if d == 0 and not allowzero:
      if i >= len(in_shape):
        raise ctx.error(f"target {target} copies dimension {i} of shape {in_shape}")
      out[i] = in_shape[i]
  size = math.prod(in_shape)
  if out.count(-1) > 1 or any(d < -1 for d in out):
    raise ctx.error(f"invalid target shape {target}")
  if -1 in out:
    known = math.prod(d for d in out if d != -1)
    if known == 0 or size % known:
      raise ctx.error(f"cannot reshape {in_shape} ({size} elements) to {target}")
    out[out.index(-1)] = size // known
  if math.prod(out) != size:
    raise ctx.error(f"cannot reshape {in_shape} ({size} elements) to {target}")
  return _reshape_to(ctx, x, out)


def _squeeze(ctx, x, axes=None):
  shape = ctx.shape(x)
  axes = _attr_or_input(ctx, "axes", axes, 13)
  if axes is None:
    axes = [i for i, d in enumerate(shape) if d == 1]
  axes = {_axis(ctx, a, len(shape)) for a in axes}
  if any(shape[a] != 1 for a in axes):
    raise ctx.error(f"cannot squeeze axes {sorted(axes)} of shape {shape}")
  return _reshape_to(ctx, x, [d for i, d in enumerate(shape) if i not in axes])


def _unsqueeze(ctx, x, axes=None):
  axes = _attr_or_input(ctx, "axes", axes, 13)
  if axes is None:
    raise ctx.error("axes are required")
  shape = list(ctx.shape(x))
  rank = len(shape) + len(axes)
  axes = sorted(_axis(ctx, a, rank) for a in axes)
  if len(set(axes)) != len(axes):
    raise ctx.error(f"repeated axes {axes}")
  for a in axes:
    shape.insert(a, 1)
  return _reshape_to(ctx, x, shape)


def _transpose(ctx, x):
  perm = [int(p) for p in ctx.attr("perm", range(np.ndim(x) - 1, -1, -1))]
  if sorted(perm) != list(range(np.ndim(x))):
    raise ctx.error(f"perm {perm} is not a permutation of the axes of shape {np.shape(x)}")
  if ctx.lifted(x) and perm[0] != 0:
    ctx.not_batchable(f"perm {perm} moves the batch axis")
  return _xp(x).transpose(x, perm)


def _concat(ctx, *xs):
  xs = [x for x in xs if x is not None]
  if ctx.attr("axis") is None:
    raise ctx.error("axis is required")
  axis = _axis(ctx, int(ctx.attr("axis")), np.ndim(xs[0]))
  if ctx.batch is not None and any(_depends(x) for x in xs):
    if axis == 0:
      ctx.not_batchable("concatenates along the batch axis")
    # Constants hold one example's leading 1: repeat them over the batch.
    xs = [x if _depends(x) else np.broadcast_to(x, (ctx.batch,) + x.shape[1:]) for x in xs]
  return _xp(*xs).concatenate(xs, axis)


def _slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
  """ONNX's clamping of ``start`` and ``end`` for one axis."""
  start = start + dim if start < 0 else start
  end = end + dim if end < 0 else end
  if step > 0:
    start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    return start, max(end, start)
  return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def _slice(ctx, x, starts=None, ends=None, axes=None, steps=None):
  if ctx.opset < 10:
    starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
    steps = None
  else:
    starts, ends = ctx.ints(starts, "starts"), ctx.ints(ends, "ends")
    axes, steps = ctx.ints(axes, "axes"), ctx.ints(steps, "steps")
  if starts is None or ends is None or len(starts) != len(ends):
    raise ctx.error(f"starts {starts} and ends {ends} must have equal lengths")
  shape = ctx.shape(x)
  axes = [_axis(ctx, int(a), len(shape)) for a in (axes or range(len(starts)))]
  steps = [int(s) for s in (steps or [1] * len(starts))]
  if len(axes) != len(starts) or len(steps) != len(starts) or 0 in steps:
    raise ctx.error(f"axes {axes} and steps {steps} must match starts {starts}; steps nonzero")
  limits = [(0, d, 1) for d in np.shape(x)]
  gathers = []
  for a, start, end, step in zip(axes, starts, ends, steps):
    start, end = _slice_bounds(shape[a], int(start), int(end), step)
    if ctx.lifted(x) and a == 0:
      if list(range(start, end, step)) != [0]:
        ctx.not_batchable("slices the batch axis")
    elif step > 0:
      limits[a] = (start, end, step)
    else:
      gathers.append((a, np.arange(start, end, step)))
  if _depends(x):
    y = lax.slice(x, [s for s, _, _ in limits], [e for _, e, _ in limits],
                  [st for _, _, st in limits])
  else:
    y = x[tuple(slice(*t) for t in limits)]
  for a, idx in gathers:
    y = _xp(y).take(y, idx.astype(np.int32), axis=a)
  return y


def _gather(ctx, x, indices):
  idx = ctx.static(indices, "the indices").astype(np.int64)
  axis = _axis(ctx, int(ctx.attr("axis", 0)), np.ndim(x))
  dim = ctx.shape(x)[axis]
  if np.any((idx < -dim) | (idx >= dim)):
    raise ctx.error(f"indices {idx.tolist()} are out of range for dimension {dim}")
  if ctx.lifted(x) and axis == 0:
    ctx.not_batchable("gathers along the batch axis")
  idx = np.where(idx < 0, idx + dim, idx)
  return jnp.take(x, idx.astype(np.int32), axis=axis) if _depends(x) else np.take(x, idx, axis)


def _pad(ctx, x, pads=None, value=None, axes=None):
  mode = ctx.attr("mode", "constant")
  if ctx.opset < 11:
    pads, value, axes = [int(p) for p in ctx.attr("pads", ())], ctx.attr("value", 0.0), None
  else:
    pads = ctx.ints(pads, "pads")
    value = 0.0 if value is None else ctx.static(value, "constant_value").reshape(())
    axes = ctx.ints(axes, "axes") if ctx.opset >= 18 else None
  rank = np.ndim(x)
  axes = [_axis(ctx, a, rank) for a in (axes if axes is not None else range(rank))]
  if pads is None or len(pads) != 2 * len(axes):
    raise ctx.error(f"pads {pads} must hold a begin and an end for each of the axes {axes}")
  widths = [(0, 0)] * rank
  for i, a in enumerate(axes):
    widths[a] = (pads[i], pads[i + len(axes)])
  if ctx.lifted(x) and widths[0] != (0, 0):
    ctx.not_batchable("pads the batch axis")
  if mode not in ("constant", "reflect", "edge"):
    raise ctx.error(f"mode {mode!r} is not supported (constant, reflect, edge)")
  xp = _xp(x)
  grow = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
  if mode == "constant":
    y = xp.pad(x, grow, mode="constant", constant_values=np.asarray(value, x.dtype))
  else:
    y = xp.pad(x, grow, mode=mode)
  if any(lo < 0 or hi < 0 for lo, hi in widths):
    starts = [-min(lo, 0) for lo, _ in widths]
    ends = [d + min(hi, 0) for d, (_, hi) in zip(y.shape, widths)]
    y = lax.slice(y, starts, ends) if _depends(y) else y[tuple(map(slice, starts, ends))]
  return y


def _expand(ctx, x, shape):
  target = tuple(ctx.ints(shape, "the target shape"))
  try:
    out = tuple(np.broadcast_shapes(ctx.shape(x), target))
  except ValueError as e:
    raise ctx.error(f"cannot expand {ctx.shape(x)} to {target}") from e
  if ctx.lifted(x):
    if len(out) != x.ndim or out[0] != 1:
      ctx.not_batchable(f"expanding {ctx.shape(x)} to {out} moves the batch axis")
    out = (x.shape[0],) + out[1:]
  return _xp(x).broadcast_to(x, out)


def _reduce(name: str, first_input_opset: int) -> Callable:
  """``Reduce*``: axes are an attribute before ``first_input_opset``, an input after."""

  def op(ctx, x, axes=None):
    axes = _attr_or_input(ctx, "axes", axes, first_input_opset)
    keep = bool(ctx.attr("keepdims", 1))
    if not axes:
      if ctx.opset >= first_input_opset and ctx.attr("noop_with_empty_axes", 0):
        return x
      axes = range(np.ndim(x))
    axes = tuple(sorted({_axis(ctx, a, np.ndim(x)) for a in axes}))
    if ctx.lifted(x) and 0 in axes:
      if not keep:
        ctx.not_batchable("reduces the batch axis away")
      axes = axes[1:]  # one example's leading axis has length 1
      if not axes:
        return x
    return getattr(_xp(x), name)(x, axis=axes, keepdims=keep)

  op.__name__ = f"_reduce_{name}"
  return op

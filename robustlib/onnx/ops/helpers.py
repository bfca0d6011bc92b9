"""Shared helpers of the operators: axes, broadcasting, reshapes, padding and attributes."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from robustlib.onnx.nodes import _Ctx, _depends


def _axis(ctx: _Ctx, axis: int, rank: int, inclusive: bool = False) -> int:
  """``axis`` in ``[-rank, rank)`` (``[-rank, rank]`` when inclusive) made non-negative."""
  size = rank + 1 if inclusive else rank
  if not -size <= axis < size:
    raise ctx.error(f"axis {axis} is out of range for rank {rank}")
  return axis + size if axis < 0 else axis


def _check_broadcast(ctx: _Ctx, *values) -> None:
  """Elementwise operands keep the batch axis first: input-dependent ones have the result's
  rank, and constants of that rank have a leading 1."""
  values = [v for v in values if v is not None]
  if ctx.batch is None or not any(_depends(v) for v in values):
    return
  rank = max(np.ndim(v) for v in values)
  for v in values:
    if (_depends(v) and v.ndim != rank) or (not _depends(v) and v.ndim == rank and v.shape[0] != 1):
      ctx.not_batchable(f"broadcasting {[np.shape(v) for v in values]} moves the batch axis")


def _reshape_to(ctx: _Ctx, x, shape: Sequence[int]):
  """``x`` reshaped to the per-example ``shape`` (a leading 1 becomes the batch)."""
  shape = tuple(int(d) for d in shape)
  if ctx.lifted(x):
    if not shape or shape[0] != 1:
      ctx.not_batchable(f"per-example shape {ctx.shape(x)} becomes {shape}")
    shape = (x.shape[0],) + shape[1:]
  return x.reshape(shape)


def _scaled(v, s: float):
  """``v * s`` keeping a constant's dtype."""
  return v * s if _depends(v) else (v * s).astype(v.dtype)


def _attr_or_input(ctx: _Ctx, name: str, value: Any, first_input_opset: int) -> list[int] | None:
  """An int list that is an attribute before ``first_input_opset`` and a constant input after."""
  if ctx.opset < first_input_opset:
    attr = ctx.attr(name)
    return None if attr is None else [int(a) for a in attr]
  return ctx.ints(value, name)


def _spatial_ints(ctx: _Ctx, name: str, n: int, default: int) -> tuple[int, ...]:
  value = tuple(int(v) for v in ctx.attr(name, (default,) * n))
  if len(value) != n:
    raise ctx.error(f"{name} has {len(value)} entries for {n} spatial dimensions")
  return value


def _padding(ctx: _Ctx, in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
             dilations: Sequence[int]) -> list[tuple[int, int]]:
  """``(low, high)`` padding of each spatial dimension from ``pads`` or ``auto_pad``."""
  n = len(kernel)
  auto = ctx.attr("auto_pad", "NOTSET")
  if auto == "NOTSET":
    pads = [int(p) for p in ctx.attr("pads", (0,) * (2 * n))]
    if len(pads) != 2 * n:
      raise ctx.error(f"pads has {len(pads)} entries for {n} spatial dimensions")
    return [(pads[i], pads[i + n]) for i in range(n)]
  if auto == "VALID":
    return [(0, 0)] * n
  if auto not in ("SAME_UPPER", "SAME_LOWER"):
    raise ctx.error(f"unknown auto_pad {auto!r}")
  result = []
  for size, k, s, d in zip(in_shape, kernel, strides, dilations):
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small, big = total // 2, total - total // 2
    result.append((small, big) if auto == "SAME_UPPER" else (big, small))
  return result


def _dimension_numbers(ctx: _Ctx, n: int) -> tuple[str, str, str]:
  if n not in (1, 2, 3):
    raise ctx.error(f"{n} spatial dimensions are not supported (1, 2 or 3)")
  spatial = "DHW"[3 - n:]
  return ("NC" + spatial, "OI" + spatial, "NC" + spatial)


def _check_rank(ctx: _Ctx, x, rank: int, what: str) -> None:
  if np.ndim(x) != rank:
    raise ctx.error(f"expects {what} of rank {rank}, got shape {tuple(np.shape(x))}")

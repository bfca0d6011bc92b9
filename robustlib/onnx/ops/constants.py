"""Constants and shapes: Constant, Shape and ConstantOfShape (always numpy constants)."""

from __future__ import annotations

import numpy as np


def _constant(ctx):
  attrs = ctx.node.attrs
  if "value" in attrs:
    return np.asarray(attrs["value"])
  for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                     ("value_int", np.int64), ("value_ints", np.int64)):
    if key in attrs:
      return np.asarray(attrs[key], dtype)
  raise ctx.error(f"only tensor, float and int values are supported, got {sorted(attrs)}")


def _shape(ctx, x):
  shape = ctx.shape(x)
  return np.array(shape[ctx.attr("start", 0):ctx.attr("end")], np.int64)


def _constant_of_shape(ctx, shape):
  shape = ctx.ints(shape, "the shape")
  value = np.asarray(ctx.attr("value", np.zeros(1, np.float32)))
  return np.full(tuple(shape), value.reshape(-1)[0], value.dtype)

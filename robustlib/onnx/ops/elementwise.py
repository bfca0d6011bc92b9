"""Elementwise operators (arithmetic, activations, casts) and the softmaxes."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib.onnx.nodes import _Ctx, _depends, _DTYPES, _xp
from robustlib.onnx.ops.helpers import _axis, _check_broadcast


def _binary(name: str) -> Callable:
  """An elementwise operator of two broadcast operands (``add``, ``subtract``...)."""

  def op(ctx, a, b):
    _check_broadcast(ctx, a, b)
    return getattr(_xp(a, b), name)(a, b)

  op.__name__ = f"_{name}"
  return op


def _unary(f: Callable) -> Callable:
  """An elementwise operator of one operand (constants fold through it eagerly)."""
  return lambda ctx, x: f(x)


def _div(ctx, a, b):
  _check_broadcast(ctx, a, b)
  xp = _xp(a, b)
  if jnp.issubdtype(a.dtype, jnp.integer):
    q = xp.abs(a) // xp.abs(b)  # ONNX integer division truncates toward zero
    return xp.where((a < 0) != (b < 0), -q, q)
  return xp.divide(a, b)


def _pow(ctx, x, y):
  y = ctx.static(y, "the exponent")
  _check_broadcast(ctx, x, y)
  if y.size == 1 and y.ndim <= np.ndim(x) and float(y.reshape(())) == round(float(y.reshape(()))):
    n = int(round(float(y.reshape(()))))
    return lax.integer_pow(x, n) if _depends(x) else np.power(x, n).astype(x.dtype)
  return _xp(x).power(x, y.astype(x.dtype))


def _variadic(name: str) -> Callable:

  def op(ctx, *xs):
    xs = [x for x in xs if x is not None]
    _check_broadcast(ctx, *xs)
    return functools.reduce(getattr(_xp(*xs), name), xs)

  op.__name__ = f"_{name}"
  return op


def _neg(ctx, x):
  return _xp(x).negative(x)


def _relu(ctx, x):
  return jnp.maximum(x, 0)


def _leaky_relu(ctx, x):
  alpha = float(ctx.attr("alpha", 0.01))
  # Exact as one max (alpha <= 1) or min (alpha > 1) of two linear functions of x.
  return jnp.maximum(x, alpha * x) if alpha <= 1 else jnp.minimum(x, alpha * x)


def _clip(ctx, x, lo=None, hi=None):
  if ctx.opset < 11:
    lo, hi = ctx.attr("min"), ctx.attr("max")
  else:
    lo, hi = ctx.static(lo, "min"), ctx.static(hi, "max")
  if lo is None and hi is None:
    return x
  lo = None if lo is None else np.asarray(lo, x.dtype).reshape(())
  hi = None if hi is None else np.asarray(hi, x.dtype).reshape(())
  return _xp(x).clip(x, lo, hi)


def _cast(ctx, x):
  to = int(ctx.attr("to", 0))
  if to not in _DTYPES:
    raise ctx.error(f"casting to element type {to} is not supported")
  dtype = _DTYPES[to]
  return x.astype(jax.dtypes.canonicalize_dtype(dtype)) if _depends(x) else x.astype(dtype)


def _dropout(ctx, x, ratio=None, training_mode=None):
  if training_mode is not None and (_depends(training_mode) or bool(np.asarray(training_mode))):
    raise ctx.error("training_mode must be a constant false (inference)")
  if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
    return x, np.ones(ctx.shape(x), np.bool_)
  return x


# ----------------------------------------------------------------------------------------------
# Softmax.


def _softmax_axes(ctx: _Ctx, x) -> tuple[int, ...]:
  """Opset < 13 normalizes over the flattened axes from ``axis`` on; opset >= 13 over ``axis``."""
  axis = _axis(ctx, int(ctx.attr("axis", 1 if ctx.opset < 13 else -1)), x.ndim)
  axes = tuple(range(axis, x.ndim)) if ctx.opset < 13 else (axis,)
  if ctx.lifted(x) and 0 in axes:
    ctx.not_batchable("normalizes over the batch axis")
  return axes


def _softmax(ctx, x):
  axes = _softmax_axes(ctx, x)
  e = jnp.exp(x - lax.stop_gradient(jnp.max(x, axes, keepdims=True)))
  return e / jnp.sum(e, axes, keepdims=True)


def _log_softmax(ctx, x):
  axes = _softmax_axes(ctx, x)
  z = x - lax.stop_gradient(jnp.max(x, axes, keepdims=True))
  return z - jnp.log(jnp.sum(jnp.exp(z), axes, keepdims=True))

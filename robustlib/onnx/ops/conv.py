"""Convolutions, pooling and batch normalization (NCHW, as the file has it)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib.onnx.ops.helpers import _check_rank, _dimension_numbers, _padding, _spatial_ints


def _conv_attrs(ctx, x, w):
  """``(weights, spatial rank, dimension numbers, kernel, strides, dilations, group)``."""
  w = ctx.static(w, "the weights")
  n = w.ndim - 2
  dims = _dimension_numbers(ctx, n)
  _check_rank(ctx, x, n + 2, "an input")
  strides = _spatial_ints(ctx, "strides", n, 1)
  dilations = _spatial_ints(ctx, "dilations", n, 1)
  return w, n, dims, tuple(w.shape[2:]), strides, dilations, int(ctx.attr("group", 1))


def _add_bias(ctx, y, b, n):
  if b is None:
    return y
  return y + ctx.static(b, "the bias").astype(y.dtype).reshape((1, -1) + (1,) * n)


def _conv(ctx, x, w, b=None):
  w, n, dims, kernel, strides, dilations, group = _conv_attrs(ctx, x, w)
  if tuple(ctx.attr("kernel_shape", kernel)) != kernel:
    raise ctx.error(f"kernel_shape {ctx.attr('kernel_shape')} differs from the weights' {kernel}")
  if x.shape[1] != w.shape[1] * group or w.shape[0] % group:
    raise ctx.error(f"input channels {x.shape[1]} do not match weights {w.shape} with "
                    f"group={group}")
  pads = _padding(ctx, x.shape[2:], kernel, strides, dilations)
  y = lax.conv_general_dilated(x,
                               w.astype(x.dtype),
                               strides,
                               pads,
                               rhs_dilation=dilations,
                               dimension_numbers=dims,
                               feature_group_count=group)
  return _add_bias(ctx, y, b, n)


def _conv_transpose_pads(ctx, in_shape, kernel, strides, dilations, output_padding):
  n = len(kernel)
  auto = ctx.attr("auto_pad", "NOTSET")
  out_shape = ctx.attr("output_shape")
  if out_shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
    out_shape = [size * s for size, s in zip(in_shape, strides)]
  if out_shape is None:
    return _padding(ctx, in_shape, kernel, strides, dilations)
  out_shape = [int(o) for o in out_shape][-n:]
  pads = []
  for size, k, s, d, op, out in zip(in_shape, kernel, strides, dilations, output_padding,
                                    out_shape):
    total = s * (size - 1) + op + (k - 1) * d + 1 - out
    half = total // 2
    pads.append((half, total - half) if auto == "SAME_UPPER" else (total - half, half))
  return pads


def _conv_transpose(ctx, x, w, b=None):
  """The gradient of a convolution: the input dilated by the strides, the kernel flipped."""
  w, n, dims, kernel, strides, dilations, group = _conv_attrs(ctx, x, w)
  output_padding = _spatial_ints(ctx, "output_padding", n, 0)
  c_in, c_out = w.shape[0], w.shape[1] * group
  if x.shape[1] != c_in or c_in % group:
    raise ctx.error(f"input channels {x.shape[1]} do not match weights {w.shape} with "
                    f"group={group}")
  pads = _conv_transpose_pads(ctx, x.shape[2:], kernel, strides, dilations, output_padding)
  # [C_in, C_out/g, *k] -> [C_out, C_in/g, *k], spatially flipped.
  wt = w.reshape((group, c_in // group, c_out // group) + kernel).swapaxes(1, 2)
  wt = np.flip(wt.reshape((c_out, c_in // group) + kernel), axis=tuple(range(2, n + 2)))
  padding = [(d * (k - 1) - lo, d * (k - 1) - hi + op)
             for k, d, (lo, hi), op in zip(kernel, dilations, pads, output_padding)]
  y = lax.conv_general_dilated(x,
                               wt.astype(x.dtype), (1,) * n,
                               padding,
                               lhs_dilation=strides,
                               rhs_dilation=dilations,
                               dimension_numbers=dims,
                               feature_group_count=group)
  return _add_bias(ctx, y, b, n)


def _pool_window(ctx, x):
  """``reduce_window`` geometry ``(window, strides, padding, dilation)`` over all axes."""
  kernel = ctx.attr("kernel_shape")
  if kernel is None:
    raise ctx.error("kernel_shape is required")
  kernel = tuple(int(k) for k in kernel)
  n = len(kernel)
  _check_rank(ctx, x, n + 2, "an input")
  if ctx.attr("ceil_mode", 0):
    raise ctx.error("ceil_mode=1 is not supported; re-export the model with ceil_mode=0 "
                    "(or explicit padding)")
  strides = _spatial_ints(ctx, "strides", n, 1)
  dilations = _spatial_ints(ctx, "dilations", n, 1)
  pads = _padding(ctx, x.shape[2:], kernel, strides, dilations)
  return (1, 1) + kernel, (1, 1) + strides, ((0, 0), (0, 0)) + tuple(pads), (1, 1) + dilations


def _max_pool(ctx, x):
  if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
    raise ctx.error("the Indices output is not supported")
  window, strides, padding, dilation = _pool_window(ctx, x)
  low = -np.inf if jnp.issubdtype(x.dtype, jnp.floating) else np.iinfo(x.dtype).min
  return lax.reduce_window(x,
                           np.array(low, x.dtype),
                           lax.max,
                           window,
                           strides,
                           padding,
                           window_dilation=dilation)


def _average_pool(ctx, x):
  window, strides, padding, dilation = _pool_window(ctx, x)
  zero = np.array(0, x.dtype)
  total = lax.reduce_window(x, zero, lax.add, window, strides, padding, window_dilation=dilation)
  if ctx.attr("count_include_pad", 0):
    return total / np.array(math.prod(window), x.dtype)
  with jax.ensure_compile_time_eval():
    ones = jnp.ones((1, 1) + tuple(x.shape[2:]), x.dtype)
    count = lax.reduce_window(ones,
                              zero,
                              lax.add,
                              window,
                              strides,
                              padding,
                              window_dilation=dilation)
  return total / np.asarray(count)


def _global_average_pool(ctx, x):
  return jnp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


def _global_max_pool(ctx, x):
  return jnp.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


def _batch_norm(ctx, x, scale, bias, mean, var):
  """Inference: ``x * s + t`` with ``s = scale / sqrt(var + eps)``, ``t = bias - mean * s``."""
  if ctx.attr("training_mode", 0) or any(ctx.node.outputs[1:]):
    raise ctx.error("training mode (running statistics outputs) is not supported")
  if np.ndim(x) < 2:
    raise ctx.error(f"expects an input [N, C, ...], got shape {np.shape(x)}")
  scale, bias = ctx.static(scale, "scale").astype(np.float64), ctx.static(bias, "B")
  mean, var = ctx.static(mean, "mean"), ctx.static(var, "var").astype(np.float64)
  s = scale / np.sqrt(var + float(ctx.attr("epsilon", 1e-5)))
  t = bias - mean * s
  shape = (1, -1) + (1,) * (x.ndim - 2)
  return x * s.astype(x.dtype).reshape(shape) + t.astype(x.dtype).reshape(shape)

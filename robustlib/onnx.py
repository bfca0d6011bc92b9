"""ONNX models as pure JAX functions.

`load` reads an ONNX model (a file, its bytes or an ``onnx.ModelProto``) into an
`OnnxModel` whose ``fn(x: [N, *input_shape]) -> [N, *output_shape]`` is an ordinary
``logits_fn``: pure, jittable, vmappable and differentiable, so attacks and bound
propagation take it like any other model. The layout is the file's (NCHW stays NCHW).
``onnx`` is an optional dependency (``pip install robustlib[onnx]``), imported by
`load` only.

How a graph runs:

* Values that do not depend on the input stay numpy arrays: initializers,
  ``Constant`` nodes, the ``Shape`` of any value (shapes are static under ``jit``)
  and the result of every node whose inputs are all such constants. Parameters an
  operator needs statically (a ``Reshape``'s shape, ``Slice`` bounds, ``Pad``
  pads, ``Gather`` indices...) must be constants; an input-dependent one is an
  `OnnxError` naming the node.
* The graph describes one example. A declared leading input dimension that is
  symbolic or 1 is the batch axis, and the graph is read as if it were 1 (a
  ``Shape`` reports 1 there). A batch of N examples runs natively when every
  input-dependent value keeps the batch axis first (a constant ``Reshape`` to
  ``[1, -1]`` becomes ``[N, -1]``), which keeps the batch axis first on every
  nonlinearity as `verify.crown` needs; this is decided once, at load time, by
  tracing shapes. A graph that moves or merges that axis runs through `jax.vmap`
  over single examples instead.
* Operators become the primitives bound propagation follows: ReLU is
  ``max(x, 0)``, LeakyReLU ``max(x, alpha * x)``, pooling ``reduce_window``,
  convolutions ``conv_general_dilated`` in NCHW, BatchNormalization a scale and a
  shift folded with numpy.

Every node is checked at load time: an operator without a translation raises
`UnsupportedOperatorError`, and the graph is traced once (shapes only), so a
malformed model fails in `load` rather than at its first call.

Example::

  model = robustlib.onnx.load("mnist_cnn.onnx")   # input [N, 1, 28, 28] float32
  logits = jax.jit(model.fn)(x)                     # [N, 10]
  bounds = verify.crown(model.fn, verify.linf_ball(x, 0.1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib import compilation
from robustlib.checks import InputError

_INSTALL_HINT = "pip install robustlib[onnx]"
_MIN_OPSET = 6  # older operator versions differ in attributes (Reshape, BatchNormalization...)


class OnnxError(InputError):
  """A malformed ONNX model, a shape it cannot run on, or an input of the wrong shape."""


class UnsupportedOperatorError(OnnxError):
  """The model uses an operator (or an operator domain) that has no JAX translation here."""


class _NotBatchable(Exception):
  """A node cannot keep the batch axis first natively; the graph then runs per example."""


# TensorProto element types -> numpy dtypes.
_DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
    16: jnp.bfloat16,
}

# ----------------------------------------------------------------------------------------------
# The parsed graph and the interpreter.


@dataclasses.dataclass(frozen=True)
class _Node:
  """One ONNX node: ``inputs`` holds ``""`` for an omitted optional input."""
  op_type: str
  name: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: dict[str, Any]
  opset: int

  def describe(self) -> str:
    return f"node '{self.name}' ({self.op_type}, opset {self.opset})"


@dataclasses.dataclass(frozen=True)
class _Graph:
  nodes: tuple[_Node, ...]
  constants: dict[str, np.ndarray]
  input_name: str
  output_name: str


def _depends(v: Any) -> bool:
  """Whether a value depends on the input (a JAX array or tracer, not a numpy constant)."""
  return v is not None and not isinstance(v, np.ndarray)


def _xp(*values):
  """numpy when every value is a constant, else jax.numpy."""
  return jnp if any(_depends(v) for v in values) else np


@dataclasses.dataclass(frozen=True)
class _Ctx:
  """What an operator sees besides its inputs.

  Attributes:
    node: the node being run.
    batch: N when the batch runs natively (every input-dependent value then has
      the batch axis first and is read per example with a leading 1), else None.
  """
  node: _Node
  batch: int | None

  @property
  def opset(self) -> int:
    return self.node.opset

  def attr(self, name: str, default: Any = None) -> Any:
    return self.node.attrs.get(name, default)

  def error(self, message: str) -> OnnxError:
    return OnnxError(f"{self.node.describe()}: {message}")

  def lifted(self, v: Any) -> bool:
    """Whether ``v`` carries the native batch axis first."""
    return self.batch is not None and _depends(v)

  def shape(self, v: Any) -> tuple[int, ...]:
    """The shape of ``v`` for one example (the batch axis read as 1)."""
    shape = tuple(int(d) for d in np.shape(v))
    return (1,) + shape[1:] if self.lifted(v) else shape

  def not_batchable(self, why: str):
    raise _NotBatchable(f"{self.node.describe()}: {why}")

  def static(self, v: Any, what: str) -> np.ndarray | None:
    """``v`` as a numpy constant (None stays None); an input-dependent value is an error."""
    if v is None:
      return None
    if _depends(v):
      raise self.error(f"{what} must be a constant, but it depends on the model's input")
    return np.asarray(v)

  def ints(self, v: Any, what: str) -> list[int] | None:
    v = self.static(v, what)
    return None if v is None else [int(i) for i in v.reshape(-1)]


def _run(graph: _Graph, x: jax.Array, batch: int | None) -> Any:
  """Evaluates the graph on ``x``; ``batch`` as in `_Ctx`."""
  env: dict[str, Any] = dict(graph.constants)
  env[graph.input_name] = x
  for node in graph.nodes:
    ctx = _Ctx(node, batch)
    args = [env[name] if name else None for name in node.inputs]
    const = not any(_depends(a) for a in args)
    try:
      with jax.ensure_compile_time_eval() if const else contextlib.nullcontext():
        outs = _OPS[node.op_type](ctx, *args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if const:
          outs = tuple(np.asarray(o) for o in outs)
    except (OnnxError, _NotBatchable):
      raise
    except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError) as e:
      raise ctx.error(str(e)) from e
    for i, name in enumerate(node.outputs):
      if not name:
        continue
      if i >= len(outs):
        raise ctx.error(f"output {i} ('{name}') is not supported")
      out = outs[i]
      if batch is not None and _depends(out) and (out.ndim == 0 or out.shape[0] != batch):
        ctx.not_batchable(f"output shape {out.shape} does not start with the batch")
      env[name] = out
  return env[graph.output_name]


# ----------------------------------------------------------------------------------------------
# Shared helpers of the operators.


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


# ----------------------------------------------------------------------------------------------
# Elementwise operators.


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


# ----------------------------------------------------------------------------------------------
# Matrix products.


def _gemm(ctx, a, b, c=None):
  """``alpha * A' B' + beta * C`` with ``A' = A^T`` if transA, ``B' = B^T`` if transB."""
  _check_rank(ctx, a, 2, "A")
  _check_rank(ctx, b, 2, "B")
  if ctx.lifted(b) or (ctx.lifted(a) and ctx.attr("transA", 0)):
    ctx.not_batchable("the batch axis of A is contracted or B depends on the input")
  if ctx.attr("transA", 0):
    a = a.T
  if ctx.attr("transB", 0):
    b = b.T
  alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
  if alpha != 1.0:
    if _depends(b) and not _depends(a):
      a = _scaled(a, alpha)
    else:
      b = _scaled(b, alpha)
  y = _xp(a, b).matmul(a, b)
  if c is None or beta == 0.0:
    return y
  c = _scaled(c, beta) if beta != 1.0 else c
  _check_broadcast(ctx, y, c)
  return _xp(y, c).add(y, c)


def _matmul(ctx, a, b):
  if ctx.batch is not None and (_depends(a) or _depends(b)):
    da, db = _depends(a), _depends(b)
    ok = (not da or (a.ndim >= 2 and b.ndim <= a.ndim)) and (not db or
                                                             (b.ndim >= 3 and a.ndim <= b.ndim))
    if ok and a.ndim == b.ndim >= 3:
      ok = (da or a.shape[0] == 1) and (db or b.shape[0] == 1)
    if not ok:
      ctx.not_batchable(f"a product of shapes {np.shape(a)} and {np.shape(b)} moves the batch axis")
  return _xp(a, b).matmul(a, b)


# ----------------------------------------------------------------------------------------------
# Convolutions, pooling, normalization.


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


# ----------------------------------------------------------------------------------------------
# Shapes and indexing.


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


# ----------------------------------------------------------------------------------------------
# Constants and shapes.


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


_OPS: dict[str, Callable] = {
    "Add": _binary("add"),
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Clip": _clip,
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Div": _div,
    "Dropout": _dropout,
    "Exp": _unary(jnp.exp),
    "Expand": _expand,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "Identity": _unary(lambda x: x),
    "LeakyRelu": _leaky_relu,
    "Log": _unary(jnp.log),
    "LogSoftmax": _log_softmax,
    "MatMul": _matmul,
    "Max": _variadic("maximum"),
    "MaxPool": _max_pool,
    "Min": _variadic("minimum"),
    "Mul": _binary("multiply"),
    "Neg": _neg,
    "Pad": _pad,
    "Pow": _pow,
    "ReduceMax": _reduce("max", 18),
    "ReduceMean": _reduce("mean", 18),
    "ReduceMin": _reduce("min", 18),
    "ReduceSum": _reduce("sum", 13),
    "Relu": _relu,
    "Reshape": _reshape,
    "Shape": _shape,
    "Sigmoid": _unary(jax.nn.sigmoid),
    "Slice": _slice,
    "Softmax": _softmax,
    "Sqrt": _unary(jnp.sqrt),
    "Squeeze": _squeeze,
    "Sub": _binary("subtract"),
    "Tanh": _unary(jnp.tanh),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
}

SUPPORTED_OPERATORS: tuple[str, ...] = tuple(sorted(_OPS))

# ----------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class OnnxModel:
  """An ONNX model as a pure JAX function.

  Attributes:
    fn: ``fn(x: [N, *input_shape]) -> [N, *output_shape]`` for any N >= 1; pure,
      jittable, vmappable and differentiable (it checks ``x`` and calls the graph
      under `jax.jit`, so each input shape compiles once). A call with another
      per-example shape or a non-floating dtype raises `OnnxError`.
    input_name: the graph input's name.
    input_shape: the shape of one example (the declared shape without its batch axis).
    output_name: the graph output's name.
    output_shape: the shape of one example's output.
  """
  fn: Callable[[jax.Array], jax.Array]
  input_name: str
  input_shape: tuple[int, ...]
  output_name: str
  output_shape: tuple[int, ...]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How ``fn`` runs the graph.

  Attributes:
    input_name: the graph input's name (for error messages).
    input_shape: one example's input shape.
    dtype: the declared input dtype.
    input_batch: whether the declared input has a batch axis (then one example
      is fed as ``[1, *input_shape]``).
    output_batch: whether the graph's output has one (removed per example).
    native: whether N examples run as one batch rather than through `jax.vmap`.
  """
  input_name: str
  input_shape: tuple[int, ...]
  dtype: Any
  input_batch: bool
  output_batch: bool
  native: bool


def _import_onnx():
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading ONNX models needs the onnx package: "
                      f"{_INSTALL_HINT}") from e
  return onnx


def _read_model(onnx, model):
  if isinstance(model, onnx.ModelProto):
    return model
  if isinstance(model, (bytes, bytearray, memoryview)):
    try:
      return onnx.load_model_from_string(bytes(model))
    except Exception as e:  # pylint: disable=broad-except
      raise OnnxError(f"the bytes are not an ONNX model: {e}") from e
  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    if not os.path.isfile(path):
      raise OnnxError(f"no ONNX file at {path}")
    try:
      return onnx.load(path)
    except Exception as e:  # pylint: disable=broad-except
      raise OnnxError(f"cannot read the ONNX model {path}: {e}") from e
  raise TypeError(f"expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")


def _attribute(onnx, attr) -> Any:
  value = onnx.helper.get_attribute_value(attr)
  kind = onnx.AttributeProto
  if attr.type == kind.TENSOR:
    return onnx.numpy_helper.to_array(value)
  if attr.type == kind.TENSORS:
    return tuple(onnx.numpy_helper.to_array(t) for t in value)
  if attr.type == kind.STRING:
    return value.decode()
  if attr.type == kind.STRINGS:
    return tuple(v.decode() for v in value)
  if attr.type in (kind.INTS, kind.FLOATS):
    return tuple(value)
  return value


def _check_operators(graph_proto, opsets: dict[str, int]) -> None:
  """Raises `UnsupportedOperatorError` for the first node without a translation."""
  bad = []
  for i, node in enumerate(graph_proto.node):
    domain = node.domain or ""
    if domain in ("", "ai.onnx") and node.op_type in _OPS:
      continue
    op = node.op_type if domain in ("", "ai.onnx") else f"{domain}.{node.op_type}"
    bad.append((op, node.name or f"#{i}", opsets.get(domain, opsets[""])))
  if bad:
    op, name, opset = bad[0]
    others = sorted({b[0] for b in bad} - {op})
    also = f" (also unsupported: {', '.join(others)})" if others else ""
    raise UnsupportedOperatorError(f"operator '{op}' (node '{name}', opset {opset}) is not "
                                   f"supported{also}; supported: {', '.join(SUPPORTED_OPERATORS)}")


def _tensor_info(value_info, what: str) -> tuple[tuple[int | None, ...] | None, Any]:
  """``(dims, dtype)`` of a graph input or output; dims None when undeclared, an entry None
  when symbolic."""
  kind = value_info.type.WhichOneof("value")
  if kind != "tensor_type":
    raise OnnxError(f"{what} '{value_info.name}' must be a tensor, got {kind}")
  tensor = value_info.type.tensor_type
  dtype = _DTYPES.get(tensor.elem_type)
  if not tensor.HasField("shape"):
    return None, dtype
  dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
  return dims, dtype


def _parse(onnx, proto) -> tuple[_Graph, tuple, Any, tuple | None]:
  """The graph, the declared input dims and dtype, and the declared output dims."""
  opsets = {(imp.domain or ""): imp.version for imp in proto.opset_import}
  opsets[""] = opsets.get("", opsets.get("ai.onnx"))
  if opsets[""] is None:
    raise OnnxError("the model imports no version of the default ONNX operator set")
  opsets["ai.onnx"] = opsets[""]
  if opsets[""] < _MIN_OPSET:
    raise OnnxError(f"the model uses opset {opsets['']}; opsets {_MIN_OPSET} and newer are "
                    "supported")
  g = proto.graph
  _check_operators(g, opsets)
  if len(g.sparse_initializer):
    raise OnnxError("sparse initializers are not supported")
  constants = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
  inputs = [v for v in g.input if v.name not in constants]
  if len(inputs) != 1:
    raise OnnxError(f"the graph must have exactly one input that is not an initializer, got "
                    f"{len(inputs)}: {[v.name for v in inputs]}")
  if len(g.output) != 1:
    raise OnnxError(f"the graph must have exactly one output, got {len(g.output)}: "
                    f"{[v.name for v in g.output]}")
  in_dims, in_dtype = _tensor_info(inputs[0], "input")
  out_dims, _ = _tensor_info(g.output[0], "output")
  nodes = []
  known = set(constants) | {inputs[0].name}
  for i, n in enumerate(g.node):
    node = _Node(n.op_type, n.name or f"#{i}", tuple(n.input), tuple(n.output),
                 {a.name: _attribute(onnx, a) for a in n.attribute}, opsets[""])
    for name in node.inputs:
      if name and name not in known:
        raise OnnxError(f"{node.describe()} reads '{name}', which no initializer, graph input "
                        "or earlier node defines")
    known.update(o for o in node.outputs if o)
    nodes.append(node)
  if g.output[0].name not in known:
    raise OnnxError(f"no node computes the graph output '{g.output[0].name}'")
  graph = _Graph(tuple(nodes), constants, inputs[0].name, g.output[0].name)
  if in_dims is None:
    raise OnnxError(f"input '{graph.input_name}' must declare its shape")
  if in_dtype is None or not jnp.issubdtype(in_dtype, jnp.floating):
    raise OnnxError(f"input '{graph.input_name}' must have a floating element type, got "
                    f"{in_dtype or inputs[0].type.tensor_type.elem_type}")
  return graph, in_dims, in_dtype, out_dims


def _plan(graph: _Graph, in_dims: tuple, dtype, out_dims: tuple | None) -> tuple[_Plan, tuple]:
  """Decides the batch axes and whether N examples run natively; returns the output shape."""
  input_batch = len(in_dims) > 0 and in_dims[0] in (None, 1)
  input_shape = in_dims[1:] if input_batch else in_dims
  if None in input_shape:
    raise OnnxError(f"input '{graph.input_name}' has symbolic dimensions {in_dims} beyond the "
                    "first (batch) one; only the batch may be symbolic")
  example = ((1,) if input_batch else ()) + input_shape
  out = jax.eval_shape(functools.partial(_run, graph, batch=None),
                       jax.ShapeDtypeStruct(example, dtype))
  shape = tuple(out.shape)
  if out_dims is not None and (len(out_dims) != len(shape) or
                               any(d is not None and d != s for d, s in zip(out_dims, shape))):
    raise OnnxError(f"output '{graph.output_name}' is declared with shape {list(out_dims)} but "
                    f"the graph computes {list(shape)} for input {list(example)}")
  declared_batch = input_batch if out_dims is None else (len(out_dims) > 0 and
                                                         out_dims[0] in (None, 1))
  output_batch = declared_batch and len(shape) > 0 and shape[0] == 1
  output_shape = shape[1:] if output_batch else shape
  native = False
  if input_batch and output_batch:
    n = 2  # any N > 1: the checks compare per-example shapes, which do not depend on it
    try:
      got = jax.eval_shape(functools.partial(_run, graph, batch=n),
                           jax.ShapeDtypeStruct((n,) + input_shape, dtype))
      native = tuple(got.shape) == (n,) + output_shape
    except (_NotBatchable, OnnxError):
      native = False
  plan = _Plan(graph.input_name, input_shape, dtype, input_batch, output_batch, native)
  return plan, output_shape


def _check_input(plan: _Plan, x) -> None:
  shape = tuple(np.shape(x))
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise OnnxError(f"input '{plan.input_name}' must have a floating dtype "
                    f"({np.dtype(plan.dtype).name}), got {dtype}")
  if len(shape) != len(plan.input_shape) + 1 or shape[1:] != plan.input_shape:
    expected = ", ".join(["N"] + [str(d) for d in plan.input_shape])
    raise OnnxError(f"input '{plan.input_name}' must have shape [{expected}] (N examples of "
                    f"shape {plan.input_shape}), got {shape}")


def _one_example(graph: _Graph, plan: _Plan, x: jax.Array) -> jax.Array:
  out = _run(graph, x[None] if plan.input_batch else x, None)
  return jnp.asarray(out[0] if plan.output_batch else out)


def _apply(graph: _Graph, plan: _Plan, x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jax.dtypes.canonicalize_dtype(plan.dtype))
  if plan.native:
    return jnp.asarray(_run(graph, x, x.shape[0]))
  return jax.vmap(functools.partial(_one_example, graph, plan))(x)


def _checked(plan: _Plan, compiled: Callable, x: jax.Array) -> jax.Array:
  """Checks ``x`` (concrete or traced) and runs the compiled graph on it."""
  _check_input(plan, x)
  return compiled(x if hasattr(x, "shape") else np.asarray(x))


def load(model: str | os.PathLike | bytes | Any, dtype: Any = None) -> OnnxModel:
  """Loads an ONNX model as a JAX function.

  Args:
    model: a path to a ``.onnx`` file, its bytes, or an ``onnx.ModelProto``. The
      graph has one input that is not an initializer and one output.
    dtype: the floating dtype the graph computes in (its input is cast to it, and
      weights are promoted to it); None: the input's declared dtype. ``float64``
      (with JAX's 64-bit mode) evaluates float32 weights exactly as stored.

  Returns:
    An `OnnxModel` whose ``fn`` maps ``[N, *input_shape]`` to ``[N, *output_shape]``.
    A declared leading dimension that is symbolic or 1 is the batch axis (removed
    from ``input_shape`` / ``output_shape``); otherwise the declared shape is one
    example's and ``fn`` maps each example separately.

  Raises:
    ImportError: when onnx is not installed (``pip install robustlib[onnx]``).
    UnsupportedOperatorError: naming the first operator without a translation,
      its node and opset, and the supported operators.
    OnnxError: for a malformed graph (several inputs or outputs, an undefined
      tensor, a shape error, a static parameter that depends on the input).

  Example:
    >>> model = load("model.onnx")
    >>> logits = model(x)      # x: float32 [N, *model.input_shape]
  """
  onnx = _import_onnx()
  graph, in_dims, declared, out_dims = _parse(onnx, _read_model(onnx, model))
  if dtype is None:
    dtype = declared
  elif not jnp.issubdtype(dtype, jnp.floating):
    raise OnnxError(f"dtype must be a floating dtype, got {dtype}")
  elif jax.dtypes.canonicalize_dtype(dtype) != np.dtype(dtype):
    raise OnnxError(f"dtype {np.dtype(dtype).name} needs JAX's 64-bit mode (JAX_ENABLE_X64=1)")
  plan, output_shape = _plan(graph, in_dims, dtype, out_dims)
  compiled = compilation.jit(functools.partial(_apply, graph, plan))
  return OnnxModel(fn=functools.partial(_checked, plan, compiled),
                   input_name=graph.input_name,
                   input_shape=plan.input_shape,
                   output_name=graph.output_name,
                   output_shape=output_shape)

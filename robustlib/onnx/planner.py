"""The plan of how N examples run (natively or through `jax.vmap`), and running by it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib.onnx.errors import _NotBatchable, OnnxError
from robustlib.onnx.nodes import _Graph
from robustlib.onnx.interpreter import _run


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

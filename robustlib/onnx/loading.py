"""`load`: an ONNX model as an `OnnxModel`, a pure JAX function."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib.onnx.errors import OnnxError
from robustlib.onnx.planner import _apply, _checked, _plan
from robustlib.onnx.reader import _import_onnx, _parse, _read_model


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

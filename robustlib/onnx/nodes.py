"""The parsed graph: its nodes, the context an operator runs in, and the element types.

Values that do not depend on the model's input are numpy constants; the rest are JAX
arrays or tracers (`_depends`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from robustlib.onnx.errors import _NotBatchable, OnnxError

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

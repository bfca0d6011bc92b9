"""Reading an ONNX model: the proto from a file, bytes or a ModelProto, parsed into a `_Graph`."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from robustlib.onnx.errors import _INSTALL_HINT, OnnxError, UnsupportedOperatorError
from robustlib.onnx.nodes import _DTYPES, _Graph, _Node
from robustlib.onnx.ops import _OPS, SUPPORTED_OPERATORS

_MIN_OPSET = 6  # older operator versions differ in attributes (Reshape, BatchNormalization...)


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

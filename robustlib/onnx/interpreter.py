"""The interpreter: runs a parsed graph node by node through the operator registry."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np

from robustlib.onnx.errors import _NotBatchable, OnnxError
from robustlib.onnx.nodes import _Ctx, _depends, _Graph
from robustlib.onnx.ops import _OPS


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

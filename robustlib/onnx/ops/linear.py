"""Matrix products: Gemm and MatMul."""

from __future__ import annotations

import numpy as np

from robustlib.onnx.nodes import _depends, _xp
from robustlib.onnx.ops.helpers import _check_broadcast, _check_rank, _scaled


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

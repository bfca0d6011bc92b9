"""Branch and bound on the input box: complete verification by splitting inputs.

A box is safe when a lower bound of the safety (see `verify.unsafe`) over it is
positive. Boxes that no bound proves safe are split in two, halving one input
dimension, until every piece is proven, a counterexample turns up, or time runs
out. Boxes are bounded ``batch_size`` at a time by one jitted program (the
batch axis is the boxes'), which also returns for each box:

- the dimension to split: the one with the largest ``r_j * |d bound / d r_j|``,
  the estimated loss of the bound to the box's half-width ``r_j`` in that
  direction (for a linear bound ``a.c - |a|.r`` it is exactly ``|a_j| r_j``);
  the widest dimension when the gradient vanishes;
- the safety of the network's output at the box's centre, so that a
  counterexample is found as soon as a box shrinks around one.

Bounds per box: the tighter of IBP and ``method`` per row (CROWN by default).
Pieces are processed last-in first-out, which keeps the number of open boxes
proportional to the depth of the search.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib.checks import InputError
from verify import error_rules as er
from verify import relu_bab
from verify import rounding
from verify.alpha_crown import alpha_crown
from verify.crown import lower_bounds
from verify.interval import Interval
from verify.interval import precision_dtype
from verify.interval import round_outward
from verify.unsafe import UnsafeSet

METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")
SPLITS = ("input", "relu")
INPUT_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class BabResult:
  """The outcome of `branch_and_bound`.

  Attributes:
    status: ``"verified"`` (every box proven safe), ``"falsified"`` (a
      confirmed counterexample), ``"timeout"`` or ``"unknown"`` (the search gave
      up: too many open boxes, or a box too small on every side to split in
      the bounds' dtype).
    counterexample: ``[...]`` input when falsified, else None.
    boxes: boxes (or ReLU subdomains) bounded.
    seconds: wall time.
  """
  status: str
  counterexample: np.ndarray | None
  boxes: int
  seconds: float


def bound_safety(fn: Callable, lower: jax.Array, upper: jax.Array, unsafe: UnsafeSet,
                 method: str) -> jax.Array:
  """Lower bounds ``[B]`` on the safety over each box ``[lower[b], upper[b]]`` (jittable).

  Args:
    fn: ``[B, ...] -> [B, K]``.
    lower: ``[B, ...]`` boxes' lower ends.
    upper: ``[B, ...]`` upper ends.
    unsafe: the unsafe set.
    method: one of `METHODS`; linear methods keep the tighter of theirs and IBP's.

  Returns:
    ``[B]``: positive where the whole box is proven safe (the bounds less their
    rounding allowance, `verify.rounding`).
  """
  if method not in METHODS:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  if unsafe.C.shape[0] == 0:  # polytopes without rows: every output is unsafe
    return jnp.full(lower.shape[:1], -jnp.inf, lower.dtype)
  box = Interval(lower, upper)
  spec = jnp.broadcast_to(unsafe.C, (lower.shape[0],) + unsafe.C.shape)
  # Each pass's bounds less its rounding allowance (`verify.rounding`); the offsets' rounding
  # to their dtype is allowed for too.
  u = er.unit_roundoff(unsafe.d.dtype)
  offsets = 2 * u * jnp.abs(unsafe.d)
  magnitudes = "ibp" if method == "ibp" else "crown"
  rows = lower_bounds(fn, box, spec, "ibp") - rounding.allowance(fn, box, spec, magnitudes)
  if method != "ibp":
    linear = (alpha_crown(fn, box, spec, lower_only=True)
              if method == "alpha_crown" else lower_bounds(fn, box, spec, method))
    errors = "backward" if method in rounding.BACKWARD_PASSES else "forward"
    rows = jnp.maximum(rows, linear - rounding.allowance(fn, box, spec, magnitudes, errors))
  return unsafe.proven(rows - offsets)


@compilation.jit(static_argnames=("fn", "method"))
def _bound_and_choose(fn, lower, upper, unsafe, method):
  """Safety bounds ``[B]``, split dimensions ``[B]`` and centre safety ``[B]``."""

  def total(widen):  # the derivative in widen is that in the half-width
    proven = bound_safety(fn, lower - widen, upper + widen, unsafe, method)
    return jnp.sum(proven), proven

  grad, proven = jax.grad(total, has_aux=True)(jnp.zeros_like(lower))
  b = lower.shape[0]
  flat_r = (upper - lower).reshape(b, -1)
  score = jnp.abs(grad.reshape(b, -1)) * flat_r
  widest = jnp.argmax(flat_r, axis=1)
  dim = jnp.where(jnp.max(score, axis=1) > 0, jnp.argmax(score, axis=1), widest)
  return proven, dim, unsafe.safety(fn((lower + upper) / 2))


def branch_and_bound(fn: Callable[[jax.Array], jax.Array],
                     lower: np.ndarray,
                     upper: np.ndarray,
                     unsafe: UnsafeSet,
                     *,
                     deadline: float,
                     confirm: Callable[[np.ndarray], bool],
                     method: str = "crown",
                     batch_size: int | None = None,
                     max_boxes: int = 1_000_000,
                     log_every: float = 10.0,
                     split: str = "input",
                     branching: str = "babsr",
                     precision: str = "float32") -> BabResult:
  """Proves that no input of ``[lower, upper]`` maps into ``unsafe``, or finds one that does.

  With ``split="relu"`` the search splits unstable ReLUs instead of the box, bounding
  subdomains by β-CROWN (`verify.relu_bab`); ``method`` is then not used.

  Args:
    fn: ``fn(x [B, ...]) -> [B, K]``, made of primitives `verify` supports.
    lower: ``[...]`` one input's lower bounds.
    upper: ``[...]`` its upper bounds.
    unsafe: the unsafe set of outputs.
    deadline: ``time.monotonic()`` value at which to stop with ``"timeout"``.
    confirm: ``confirm(x [...]) -> bool``, whether a candidate counterexample
      (a box centre whose output is unsafe) really is one; only confirmed
      points end the search.
    method: bound method per box (see `bound_safety`).
    batch_size: boxes bounded per call (padded, so one compilation serves all); None:
      `INPUT_BATCH_SIZE` boxes, or for ``split="relu"`` `verify.relu_bab.default_batch_size`.
    max_boxes: open boxes beyond which the search gives up (``"unknown"``); for
      ``split="relu"`` the pool's capacity (at most 65536).
    log_every: seconds between progress lines.
    split: ``"input"`` or ``"relu"``.
    branching: for ``split="relu"``, ``"babsr"`` or ``"fsb"`` (`verify.relu_bab`).
    precision: the bound passes' dtype, ``"float32"`` or ``"float64"``
      (`verify.interval.precision_dtype`: what a proof is of); the box is taken in it.

  Returns:
    A `BabResult`.
  """
  dtype = precision_dtype(precision)
  if batch_size is not None and batch_size < 1:
    raise InputError(f"batch_size must be >= 1, got {batch_size}")
  if split not in SPLITS:
    raise InputError(f"split must be one of {SPLITS}, got {split!r}")
  start = time.monotonic()
  if split == "relu":
    status, x, count = relu_bab.search(fn,
                                       lower,
                                       upper,
                                       unsafe,
                                       deadline=deadline,
                                       confirm=confirm,
                                       batch_size=batch_size,
                                       capacity=max(min(max_boxes, 65536), 2 * (batch_size or 1)),
                                       branching=branching,
                                       log_every=log_every,
                                       dtype=dtype)
    return BabResult(status, x, count, time.monotonic() - start)
  batch_size = batch_size or INPUT_BATCH_SIZE
  if np.shape(lower) != np.shape(upper) or np.any(np.asarray(lower) > np.asarray(upper)):
    raise InputError(f"the box must have lower <= upper of equal shapes, got {np.shape(lower)} "
                     f"and {np.shape(upper)}")
  box = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  lower, upper = round_outward(lower, upper, dtype)
  # Open boxes as their ends in the bounds' dtype: the two halves of a box share the very
  # value they are split at, so they cover it exactly, whatever the rounding of that value.
  stack_lo, stack_hi = lower[None], upper[None]
  tiny = 1e-7 * max(float(np.max(upper - lower)), 1e-30)
  boxes, last_log = 0, start
  result = lambda status, x=None: BabResult(status, x, boxes, time.monotonic() - start)
  while len(stack_lo):
    if time.monotonic() > deadline:
      return result("timeout")
    if len(stack_lo) > max_boxes:
      return result("unknown")
    take = min(batch_size, len(stack_lo))
    lo, hi = stack_lo[-take:], stack_hi[-take:]
    stack_lo, stack_hi = stack_lo[:-take], stack_hi[:-take]
    pad = batch_size - take
    lo_in = np.concatenate([lo, np.repeat(lo[:1], pad, 0)]) if pad else lo
    hi_in = np.concatenate([hi, np.repeat(hi[:1], pad, 0)]) if pad else hi
    proven, dim, center_safety = jax.device_get(
        _bound_and_choose(fn, jnp.asarray(lo_in), jnp.asarray(hi_in), unsafe, method))
    proven, dim, center_safety = proven[:take], dim[:take], center_safety[:take]
    boxes += take
    for i in np.flatnonzero(center_safety <= 0):
      x = np.clip((lo[i] + hi[i]) / 2, *box)  # the caller's box, not the rounded one
      if confirm(x):
        return result("falsified", x)
    open_ = np.flatnonzero(~(proven > 0))
    if open_.size:
      lo, hi = lo[open_], hi[open_]
      width = (hi - lo).reshape(open_.size, -1)
      rows = np.arange(open_.size)
      d = dim[open_]
      for choice in ("bound", "widest"):
        idx = (rows,) + np.unravel_index(d, lo.shape[1:])
        mid = lo[idx] + (hi[idx] - lo[idx]) / 2
        unsplittable = (width[rows, d] / 2 < tiny) | ~((mid > lo[idx]) & (mid < hi[idx]))
        if not np.any(unsplittable):
          break
        if choice == "widest":  # every side is as small as the dtype resolves
          return result("unknown")
        d = np.where(unsplittable, np.argmax(width, axis=1), d)  # split elsewhere
      lo_half, hi_half = hi.copy(), lo.copy()
      lo_half[idx], hi_half[idx] = mid, mid
      stack_lo = np.concatenate([stack_lo, lo, hi_half])
      stack_hi = np.concatenate([stack_hi, lo_half, hi])
    now = time.monotonic()
    if now - last_log > log_every:
      last_log = now
      logging.info("branch and bound: %d boxes bounded (%.0f/s), %d open, worst bound %.4g", boxes,
                   boxes / (now - start), len(stack_lo),
                   float(np.min(proven)) if take else float("nan"))
  return result("verified")

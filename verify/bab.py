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
      float32).
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
  # to float32 is allowed for too.
  u = er.unit_roundoff(jnp.float32)
  offsets = 2 * u * jnp.abs(unsafe.d)
  magnitudes = "ibp" if method == "ibp" else "crown"
  rows = lower_bounds(fn, box, spec, "ibp") - rounding.allowance(fn, box, spec, magnitudes)
  if method != "ibp":
    linear = (alpha_crown(fn, box, spec, lower_only=True)
              if method == "alpha_crown" else lower_bounds(fn, box, spec, method))
    errors = "backward" if method in rounding.BACKWARD_PASSES else "forward"
    rows = jnp.maximum(rows, linear - rounding.allowance(fn, box, spec, magnitudes, errors))
  return unsafe.proven(rows - offsets)


def round_outward(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The smallest float32 box containing the (float64) box ``[lower, upper]``."""
  lo, hi = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
  lo = np.where(lo > lower, np.nextafter(lo, np.float32(-np.inf)), lo)
  hi = np.where(hi < upper, np.nextafter(hi, np.float32(np.inf)), hi)
  return lo, hi


def round_inward(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The largest float32 box inside the (float64) box ``[lower, upper]``: where points may lie."""
  lo, hi = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
  lo = np.where(lo < lower, np.nextafter(lo, np.float32(np.inf)), lo)
  hi = np.where(hi > upper, np.nextafter(hi, np.float32(-np.inf)), hi)
  return lo, np.maximum(hi, lo)


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
                     branching: str = "babsr") -> BabResult:
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

  Returns:
    A `BabResult`.
  """
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
                                       log_every=log_every)
    return BabResult(status, x, count, time.monotonic() - start)
  batch_size = batch_size or INPUT_BATCH_SIZE
  lower, upper = np.asarray(lower, np.float32), np.asarray(upper, np.float32)
  if lower.shape != upper.shape or np.any(lower > upper):
    raise InputError(f"the box must have lower <= upper of equal shapes, got {lower.shape} and "
                     f"{upper.shape}")
  # Open boxes as (centre, radius) in float64: float32 centres would drift off the grid of
  # halvings, and soundness needs the float32 box handed to the bounds to cover each piece.
  stack_c = ((lower.astype(np.float64) + upper) / 2)[None]
  stack_r = ((upper.astype(np.float64) - lower) / 2)[None]
  tiny = 1e-7 * max(float(np.max(stack_r)), 1e-30)
  boxes, last_log = 0, start
  result = lambda status, x=None: BabResult(status, x, boxes, time.monotonic() - start)
  while len(stack_c):
    if time.monotonic() > deadline:
      return result("timeout")
    if len(stack_c) > max_boxes:
      return result("unknown")
    take = min(batch_size, len(stack_c))
    c, r = stack_c[-take:], stack_r[-take:]
    stack_c, stack_r = stack_c[:-take], stack_r[:-take]
    pad = batch_size - take
    c_in = np.concatenate([c, np.repeat(c[:1], pad, 0)]) if pad else c
    r_in = np.concatenate([r, np.repeat(r[:1], pad, 0)]) if pad else r
    lo32, hi32 = round_outward(c_in - r_in, c_in + r_in)
    center32 = (lo32 + hi32) / 2
    proven, dim, center_safety = jax.device_get(
        _bound_and_choose(fn, jnp.asarray(lo32), jnp.asarray(hi32), unsafe, method))
    proven, dim, center_safety = proven[:take], dim[:take], center_safety[:take]
    boxes += take
    for i in np.flatnonzero(center_safety <= 0):
      x = np.clip(center32[i], lower, upper)
      if confirm(x):
        return result("falsified", x)
    open_ = np.flatnonzero(~(proven > 0))
    if open_.size:
      c, r = c[open_], r[open_]
      flat_r = r.reshape(open_.size, -1)
      rows = np.arange(open_.size)
      d = dim[open_]
      d = np.where(flat_r[rows, d] / 2 < tiny, np.argmax(flat_r, axis=1), d)  # split elsewhere
      if np.any(flat_r[rows, d] / 2 < tiny):  # every side is as small as float32 resolves
        return result("unknown")
      idx = np.unravel_index(d, c.shape[1:])
      half = r[(rows,) + idx] / 2
      r = r.copy()
      r[(rows,) + idx] = half
      lo_c, hi_c = c.copy(), c.copy()
      lo_c[(rows,) + idx] -= half
      hi_c[(rows,) + idx] += half
      stack_c = np.concatenate([stack_c, lo_c, hi_c])
      stack_r = np.concatenate([stack_r, r, r])
    now = time.monotonic()
    if now - last_log > log_every:
      last_log = now
      logging.info("branch and bound: %d boxes bounded (%.0f/s), %d open, worst bound %.4g", boxes,
                   boxes / (now - start), len(stack_c),
                   float(np.min(proven)) if take else float("nan"))
  return result("verified")

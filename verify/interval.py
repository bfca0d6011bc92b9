"""Boxes of inputs: the `Interval` pytree and L-inf balls.

An `Interval` holds elementwise lower and upper bounds of an array. It is an
immutable pytree, so it crosses `jax.jit`, `jax.vmap` and `jax.grad` like any
other tree of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from robustlib.checks import InputError


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Interval:
  """Elementwise bounds ``lower <= x <= upper`` of an array.

  Attributes:
    lower: array ``[...]``.
    upper: array of the same shape.

  When both arrays are concrete (not traced), construction checks that their
  shapes agree and that ``lower <= upper`` everywhere (raising `InputError`).

  Example:
    >>> box = Interval(jnp.zeros(3), jnp.ones(3))
    >>> box.center, box.radius
  """
  lower: Any
  upper: Any

  def __post_init__(self):
    lower, upper = self.lower, self.upper
    # Pytree unflattening may build intervals out of placeholders; only check arrays.
    if not (hasattr(lower, "shape") and hasattr(upper, "shape")):
      return
    if tuple(lower.shape) != tuple(upper.shape):
      raise InputError(f"Interval lower and upper must have equal shapes, got "
                       f"{tuple(lower.shape)} and {tuple(upper.shape)}")
    if _is_concrete(lower) and _is_concrete(upper):
      try:
        lo, hi = np.asarray(lower), np.asarray(upper)
      except Exception:  # pylint: disable=broad-except
        return
      if lo.dtype == object or hi.dtype == object:
        return
      bad = ~(lo <= hi)
      if bad.any():
        idx = np.unravel_index(int(np.flatnonzero(bad)[0]), lo.shape) if lo.ndim else ()
        raise InputError(f"Interval needs lower <= upper everywhere: {int(bad.sum())} of "
                         f"{lo.size} entries violate it (first at index {tuple(map(int, idx))}: "
                         f"lower={lo[idx]!r}, upper={hi[idx]!r})")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.lower.shape)

  @property
  def dtype(self):
    return self.lower.dtype

  @property
  def center(self) -> jax.Array:
    """The midpoint ``(lower + upper) / 2``."""
    return (self.lower + self.upper) / 2

  @property
  def radius(self) -> jax.Array:
    """The half-width ``(upper - lower) / 2``, never negative.

    Inside one compiled function XLA may compute a bound twice, in fusions that round
    differently: a box zero or a few ulps wide (``tanh`` of a degenerate box, seen) can then
    give ``upper - lower`` below 0, and a centre-radius rule a lower bound above its upper one.
    """
    width = self.upper - self.lower
    return jnp.where(width < 0, jnp.zeros_like(width), width) / 2

  def contains(self, x: jax.typing.ArrayLike, tol: float = 0.0) -> jax.Array:
    """Whether ``x`` lies inside the box (elementwise), with tolerance ``tol``."""
    return (x >= self.lower - tol) & (x <= self.upper + tol)


def ordered(lower: jax.Array, upper: jax.Array) -> Interval:
  """The interval between two bounds computed apart, in order: where rounding crossed them
  (a box a few ulps wide) the value lies between them either way.

  Both pass one ``lax.optimization_barrier`` first: XLA may otherwise compute a bound twice,
  in two fusions that round differently, and return a copy the comparison never saw (seen:
  an output lower bound one ulp above the upper one).
  """
  lower, upper = lax.optimization_barrier((lower, upper))
  return Interval(jnp.minimum(lower, upper), jnp.maximum(lower, upper))


def linf_ball(
    x: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    bounds: tuple[float, float] | None = (0.0, 1.0)) -> Interval:
  """The L-inf ball of radius ``eps`` around ``x``, intersected with the box ``bounds``.

  Args:
    x: array ``[N, ...]``.
    eps: a scalar or one radius per example ``[N]``; must be >= 0.
    bounds: ``(low, high)`` of the valid input box, or None for no clipping.

  Returns:
    ``Interval(max(x - eps, low), min(x + eps, high))`` of the shape of ``x``.

  Raises:
    InputError: for a negative ``eps`` or an ``eps`` of the wrong shape.
  """
  x = jnp.asarray(x)
  eps_arr = jnp.asarray(eps, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else None)
  if eps_arr.ndim not in (0, 1) or (eps_arr.ndim == 1 and
                                    (x.ndim == 0 or eps_arr.shape[0] != x.shape[0])):
    raise InputError(f"eps must be a scalar or one value per example [N={x.shape[:1]}], got "
                     f"shape {eps_arr.shape}")
  if _is_concrete(eps_arr):
    if np.any(np.isnan(np.asarray(eps_arr))):
      raise InputError("eps contains NaN")
    if np.any(np.asarray(eps_arr) < 0):
      raise InputError(f"eps must be >= 0, got min {float(np.min(np.asarray(eps_arr))):g}")
  if eps_arr.ndim == 1:
    eps_arr = eps_arr.reshape((-1,) + (1,) * (x.ndim - 1))
  lower, upper = x - eps_arr, x + eps_arr
  if bounds is not None:
    lo, hi = bounds
    if lo > hi:
      raise InputError(f"bounds must satisfy low <= high, got {bounds}")
    lower = jnp.clip(lower, lo, hi)
    upper = jnp.clip(upper, lo, hi)
    # A point outside the box still gets a valid (possibly degenerate) interval.
    upper = jnp.maximum(upper, lower)
  return Interval(lower, upper)


# Dtypes of the bound passes of a complete search (`verify.decide`'s ``precision``).
PRECISIONS = ("float32", "float64")


def precision_dtype(precision: str) -> np.dtype:
  """The dtype of bound passes in ``precision`` (one of `PRECISIONS`).

  ``"float32"`` proves properties of the network as a user runs it in float32;
  ``"float64"`` proves them of the float64 evaluation of the same weights
  (float32 weights are exact in float64), whose rounding allowance is some
  1e-9 of float32's: the real-valued network, up to that, as VNN-COMP and an
  exact MILP decide it. It needs JAX's 64-bit mode.
  """
  if precision not in PRECISIONS:
    raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if precision == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != np.float64:
    raise InputError("precision='float64' needs JAX's 64-bit mode: set JAX_ENABLE_X64=1, or "
                     "call jax.config.update('jax_enable_x64', True) (or run inside "
                     "jax.enable_x64(True)) before any computation")
  return np.dtype(precision)


def round_outward(lower: np.ndarray,
                  upper: np.ndarray,
                  dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
  """The smallest ``dtype`` box containing the (float64) box ``[lower, upper]``."""
  dtype = np.dtype(dtype)
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  lo, hi = np.asarray(lower, dtype), np.asarray(upper, dtype)
  lo = np.where(lo > lower, np.nextafter(lo, dtype.type(-np.inf)), lo)
  hi = np.where(hi < upper, np.nextafter(hi, dtype.type(np.inf)), hi)
  return lo, hi


def round_up(value: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
  """Each (float64) value rounded up to ``dtype``."""
  return round_outward(value, value, dtype)[1]


def round_down(value: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
  """Each (float64) value rounded down to ``dtype``."""
  return round_outward(value, value, dtype)[0]


def round_inward(lower: np.ndarray,
                 upper: np.ndarray,
                 dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
  """The largest ``dtype`` box inside the (float64) box ``[lower, upper]``: where points may
  lie."""
  dtype = np.dtype(dtype)
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  lo, hi = np.asarray(lower, dtype), np.asarray(upper, dtype)
  lo = np.where(lo < lower, np.nextafter(lo, dtype.type(np.inf)), lo)
  hi = np.where(hi > upper, np.nextafter(hi, dtype.type(-np.inf)), hi)
  return lo, np.maximum(hi, lo)

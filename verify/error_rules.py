"""Floating-point error rules of single primitives, for `verify.rounding`.

Two rules per primitive, both on arrays of the node's shape:

- ``error(node, errs, boxes) -> err``: how far the operation's result computed on
  perturbed operands (each within ``errs[i]`` of its real value, real values in
  ``boxes[i]``) can be from its result on the real operands: a Lipschitz-type
  bound of the operation, with no rounding of its own.
- ``reach(node, mags, mag) -> r``: the rounding of the operation itself: how far
  its float result is from its exact result on the same (float) operands, given
  bounds ``mags[i]`` on the operands' magnitudes and ``mag`` on the result's.

The standard model of floating-point arithmetic: every operation is exact and
then rounded, ``fl(a op b) = (a op b)(1 + d)`` with ``|d| <= u`` (``u = 2^-24``
for float32), and a sum of ``n`` terms in any order, with or without fused
multiply-adds, is within ``gamma_n = n u / (1 - n u)`` times the sum of the
terms' magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms",
2002, §3.1). Library functions (tanh, exp, log, ...) are taken to be accurate to
`TRANSCENDENTAL_ULPS` units in the last place. A few units of the smallest normal
number are added to every rounded operation for underflow (flushed subnormals).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from verify.interval import Interval

# Units of roundoff a library function (tanh, exp, log, ...) may be off by.
TRANSCENDENTAL_ULPS = 8


def unit_roundoff(dtype) -> float:
  """``u``: half the distance from 1 to the next float of ``dtype``."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return 0.0
  return float(jnp.finfo(dtype).eps) / 2


def gamma(n: int, dtype) -> float:
  """``gamma_n = n u / (1 - n u)``: the relative error bound of an ``n``-term sum."""
  nu = n * unit_roundoff(dtype)
  return math.inf if nu >= 1 else nu / (1 - nu)


def _tiny(dtype) -> float:
  dtype = jnp.dtype(dtype)
  return float(jnp.finfo(dtype).tiny) if jnp.issubdtype(dtype, jnp.floating) else 0.0


def _is_iv(x) -> bool:
  return isinstance(x, Interval)


def _magnitude(box) -> jax.Array:
  if _is_iv(box):
    return jnp.maximum(jnp.abs(box.lower), jnp.abs(box.upper))
  return jnp.abs(jnp.asarray(box))


def widen(box, err):
  """The interval ``box`` widened by ``err`` (constants stay constants; a bool or integer
  value that may be off takes every value it may have)."""
  if not _is_iv(box):
    return box
  dtype = jnp.dtype(box.dtype)
  if dtype == jnp.bool_:
    off = err > 0
    return Interval(box.lower & ~off, box.upper | off)
  if jnp.issubdtype(dtype, jnp.integer):
    step = jnp.ceil(err).astype(dtype)
    return Interval(box.lower - step, box.upper + step)
  return Interval(box.lower - err, box.upper + err)


# ----------------------------------------------------------------------------------------------
# Error propagation rules.


def variation(node, errs, boxes) -> jax.Array:
  """Any primitive: both results lie in the IBP bounds over the widened operands.

  Sound for every primitive with a sound IBP rule (so for step functions,
  comparisons and selections too); loose where a tighter rule exists.
  """
  from verify import primitives  # pylint: disable=g-import-not-at-top

  wide = [widen(b, e) for b, e in zip(boxes, errs)]
  out = primitives.record(node).ibp(node, *wide)
  width = jnp.asarray(out.upper, jnp.float32) - jnp.asarray(out.lower, jnp.float32)
  return jnp.where(jnp.isnan(width), jnp.inf, width)


def absolute_map(node, zero_constants: bool) -> Callable[..., jax.Array]:
  """``|L|``, for a linear map ``L`` of the node's bounded operands: ``(*e) -> |L| e`` for
  ``e >= 0``, its IBP rule on ``[-e, e]`` (constant values zeroed for an affine map, whose
  constant term cancels in a difference). Linear in ``e >= 0``, so its VJP at any
  positive ``e`` is ``|L|``'s transpose."""
  from verify import primitives  # pylint: disable=g-import-not-at-top

  def apply(*es):
    args = list(node.inputs)
    for pos, e in zip(node.bounded_inputs, es):
      args[pos] = Interval(-e, e)
    if zero_constants:
      for pos, a in enumerate(node.inputs):
        if pos not in node.bounded_inputs and jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
          args[pos] = jnp.zeros_like(jnp.asarray(a))
    return primitives.record(node).ibp(node, *args).upper

  return apply


def _symmetric(node, errs, boxes, zero_constants: bool) -> jax.Array:
  """A linear map's bound ``|L| e``."""
  out = absolute_map(node, zero_constants)(*[errs[p] for p in node.bounded_inputs])
  return jnp.abs(out)


def linear(node, errs, boxes) -> jax.Array:
  return _symmetric(node, errs, boxes, zero_constants=False)


def affine(node, errs, boxes) -> jax.Array:
  return _symmetric(node, errs, boxes, zero_constants=True)


def identity(node, errs, boxes) -> jax.Array:
  return errs[node.bounded_inputs[0]]


def relu(node, errs, boxes) -> jax.Array:
  """``max(x, c)`` is 1-Lipschitz, and constant where both values are on the flat side."""
  from verify import primitives  # pylint: disable=g-import-not-at-top

  pos = node.bounded_inputs[0]
  e, box = errs[pos], boxes[pos]
  is_max, c = primitives.relu_threshold(node, box.lower.dtype)
  flat = (box.upper + e <= c) if is_max else (box.lower - e >= c)
  return jnp.where(flat, 0.0, e)


def pool(node, errs, boxes) -> jax.Array:
  """A max over windows moves by at most the largest move of its window."""
  return _symmetric(node, errs, boxes, zero_constants=False)


def slope(bound) -> Any:
  """An elementwise function with ``|f'| <= bound(lo, hi)`` on ``[lo, hi]``."""

  def rule(node, errs, boxes) -> jax.Array:
    pos = node.bounded_inputs[0]
    e, box = errs[pos], boxes[pos]
    s = bound(box.lower - e, box.upper + e)
    out = jnp.where(e > 0, s * e, 0.0)
    return jnp.where(jnp.isnan(out), jnp.inf, out)

  rule.slope_bound = bound
  return rule


def _closest_to_zero(lo, hi):
  return jnp.clip(jnp.zeros_like(lo), lo, hi)


def _farthest_from_zero(lo, hi):
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _positive_lower(lo, f):
  """``f(lo)`` where the interval stays positive, infinity elsewhere."""
  return jnp.where(lo > 0, f(jnp.where(lo > 0, lo, 1.0)), jnp.inf)


def tanh_slope(lo, hi):
  return 1 - jnp.tanh(_closest_to_zero(lo, hi))**2


def logistic_slope(lo, hi):
  return 0.25 * (1 - jnp.tanh(_closest_to_zero(lo, hi) / 2)**2)


def exp_slope(lo, hi):
  return jnp.exp(hi)


def exp2_slope(lo, hi):
  return math.log(2) * jnp.exp2(hi)


def log_slope(lo, hi):
  return _positive_lower(lo, lambda v: 1 / v)


def log1p_slope(lo, hi):
  return _positive_lower(lo + 1, lambda v: 1 / v)


def rsqrt_slope(lo, hi):
  return _positive_lower(lo, lambda v: 0.5 * v**-1.5)


def unit_slope(lo, hi):
  return jnp.ones_like(lo)


def square_slope(lo, hi):
  return 2 * _farthest_from_zero(lo, hi)


def erf_slope(lo, hi):
  return 2 / math.sqrt(math.pi) * jnp.exp(-_closest_to_zero(lo, hi)**2)


def atan_slope(lo, hi):
  return 1 / (1 + _closest_to_zero(lo, hi)**2)


def asinh_slope(lo, hi):
  return 1 / jnp.sqrt(1 + _closest_to_zero(lo, hi)**2)


def sinh_slope(lo, hi):
  return jnp.cosh(_farthest_from_zero(lo, hi))


def sqrt(node, errs, boxes) -> jax.Array:
  """``sqrt`` is ``1/(2 sqrt(lo))``-Lipschitz away from 0 and 1/2-Hoelder everywhere."""
  pos = node.bounded_inputs[0]
  e, box = errs[pos], boxes[pos]
  lo = jnp.maximum(box.lower - e, 0.0)
  lipschitz = jnp.where(lo > 0, e / (2 * jnp.sqrt(jnp.where(lo > 0, lo, 1.0))), jnp.inf)
  return jnp.minimum(lipschitz, jnp.sqrt(e))


def integer_pow(node, errs, boxes) -> jax.Array:
  n = node.params["y"]
  pos = node.bounded_inputs[0]
  e, box = errs[pos], boxes[pos]
  if n == 0:
    return jnp.zeros_like(e)
  m = _magnitude(box) + e
  return n * m**(n - 1) * e


def rounding_step(node, errs, boxes) -> jax.Array:
  """Rounding to a narrower format: 1-Lipschitz up to twice the rounding reach."""
  from verify import relaxations as rx  # pylint: disable=g-import-not-at-top

  pos = node.bounded_inputs[0]
  e, box = errs[pos], boxes[pos]
  p = node.params
  r = rx.rounding_reach(box.lower - e, box.upper + e, p["exponent_bits"], p["mantissa_bits"])
  return jnp.where(e > 0, e + 2 * r, 0.0)


def select(node, errs, boxes) -> jax.Array:
  """A selection by a constant predicate moves as the case it picks."""
  if 0 in node.bounded_inputs:
    return variation(node, errs, boxes)
  return node.apply(node.inputs[0], *[jnp.broadcast_to(e, node.shape) for e in errs[1:]])


def products(node, errs, boxes) -> jax.Array:
  """A product of two bounded values: ``|a'b' - ab| <= (|a| + e_a) e_b + e_a |b|``."""
  if len(node.bounded_inputs) < 2:
    return linear(node, errs, boxes)
  (ea, eb), (ba, bb) = errs, boxes
  return node.apply(_magnitude(ba) + ea, eb) + node.apply(ea, _magnitude(bb))


def quotient(node, errs, boxes) -> jax.Array:
  """``a / b``: ``|a'/b' - a/b| <= (e_a + |a/b| e_b) / |b'|`` for ``b'`` of constant sign."""
  from verify import primitives  # pylint: disable=g-import-not-at-top

  if node.bounded_inputs == [0]:
    return linear(node, errs, boxes)
  (ea, eb), (ba, bb) = errs, boxes
  wide = widen(bb, eb)
  least = jnp.where(wide.lower > 0, wide.lower, jnp.where(wide.upper < 0, -wide.upper, 0.0))
  q = _magnitude(primitives.record(node).ibp(node, ba, bb))
  out = (ea + q * eb) / jnp.where(least > 0, least, 1.0)
  return jnp.where((least > 0) & ~jnp.isnan(out), out, jnp.inf)


# ----------------------------------------------------------------------------------------------
# Rounding reach rules.


def exact(node, mags, mag) -> jax.Array:
  return jnp.zeros_like(mag)


def once(node, mags, mag) -> jax.Array:
  """One correctly rounded operation: ``u |result|``."""
  return unit_roundoff(node.dtype) * mag + _tiny(node.dtype)


def transcendental(node, mags, mag) -> jax.Array:
  return TRANSCENDENTAL_ULPS * unit_roundoff(node.dtype) * mag + _tiny(node.dtype)


def _sum_of(node, n: int, terms: jax.Array) -> jax.Array:
  return gamma(max(n, 1), node.dtype) * terms + n * _tiny(node.dtype)


def contraction(node, mags, mag) -> jax.Array:
  """A matrix product or convolution: ``gamma_n |A| |B|``, ``n`` the contraction length."""
  a, b = node.inputs
  if node.params.get("dimension_numbers") is not None and hasattr(node.params["dimension_numbers"],
                                                                  "rhs_spec"):
    spec = node.params["dimension_numbers"].rhs_spec
    shape = b.shape
    n = int(np.prod(shape)) // int(shape[spec[0]])
  else:
    (lc, _), _ = node.params["dimension_numbers"]
    n = int(np.prod([a.shape[d] for d in lc]))
  terms = node.apply(*[jnp.asarray(m, jnp.float32) for m in mags])
  return _sum_of(node, n, terms)


def reduction(node, mags, mag) -> jax.Array:
  """A sum over axes, windows or prefixes: ``gamma_n`` times the sum of magnitudes."""
  p = node.params
  x = node.inputs[0]
  if "axes" in p:
    n = int(np.prod([x.shape[d] for d in p["axes"]]))
  elif "window_dimensions" in p:
    n = int(np.prod(p["window_dimensions"]))
  else:
    n = int(x.shape[p["axis"]])
  return _sum_of(node, n, node.apply(mags[0]))


def power(node, mags, mag) -> jax.Array:
  n = abs(int(node.params["y"]))
  return _sum_of(node, max(1, 2 * max(1, n).bit_length()), mag)


def cast(node, mags, mag) -> jax.Array:
  """A cast between floats rounds where it narrows (to int and bool: exact steps)."""
  src = node.inputs[0].dtype
  new = jnp.dtype(node.params["new_dtype"])
  if (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(src, jnp.floating) and
      unit_roundoff(new) > unit_roundoff(src)):
    return once(node, mags, mag)
  return exact(node, mags, mag)

"""Linear relaxations of nonlinear primitives, for backward bound propagation.

For an elementwise primitive ``y = f(x)`` with ``l <= x <= u`` a relaxation is a
pair of lines ``lw * x + lb <= f(x) <= uw * x + ub`` valid on ``[l, u]``. The
table follows CROWN (Zhang et al., "Efficient Neural Network Robustness
Certification with General Activation Functions", NeurIPS 2018) and auto_LiRPA
(Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness
and Beyond", NeurIPS 2020):

- ReLU / ``max(x, c)``: upper line is the chord; lower line ``c + a (x - c)``
  with the adaptive slope ``a = 1`` where ``u - c >= c - l`` else ``0`` (or a
  slope ``a`` in [0, 1] optimised by alpha-CROWN). ``min(x, c) = -max(-x, -c)``.
- convex functions (exp, even powers, expm1): chord above, tangent at the
  midpoint below; concave ones (log, log1p, sqrt): the other way round.
- S-shaped functions (tanh, logistic): on one side of the inflection point as
  convex/concave; across it, the tangent line through the far end point found
  by bisection (taking the end of the bracket on the sound side), or the chord.
- abs: identity or negation where the sign is fixed; otherwise chord above and
  ``+-x`` below.
- products of two bounded values ``a b``: McCormick's planes (as auto_LiRPA),
  ``b_l a + a_l b - a_l b_l`` below and ``b_u a + a_l b - a_l b_u`` above.
- rounding to a narrower float format (``reduce_precision``, and every
  bfloat16/float16 operation): the identity plus or minus the format's rounding
  reach over the interval.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Relaxation(NamedTuple):
  """``lw * x + lb <= f(x) <= uw * x + ub`` on the input interval (arrays of its shape)."""
  lw: jax.Array
  lb: jax.Array
  uw: jax.Array
  ub: jax.Array


_TINY = 1e-12


def _deriv(f: Callable, x: jax.Array) -> jax.Array:
  return jax.jvp(f, (x,), (jnp.ones_like(x),))[1]


def _chord(f: Callable, l, u):
  """Slope and intercept of the chord of ``f`` between ``l`` and ``u``."""
  width = u - l
  narrow = width <= _TINY
  fl, fu = f(l), f(u)
  slope = jnp.where(narrow, _deriv(f, l), (fu - fl) / jnp.where(narrow, 1.0, width))
  return slope, fl - slope * l


def _tangent(f: Callable, d):
  slope = _deriv(f, d)
  return slope, f(d) - slope * d


def convex(f: Callable) -> Callable[..., Relaxation]:
  """Relaxation of a convex function: tangent at the midpoint below, chord above."""

  def relax(l, u):
    uw, ub = _chord(f, l, u)
    lw, lb = _tangent(f, (l + u) / 2)
    return Relaxation(lw, lb, uw, ub)

  return relax


def concave(f: Callable) -> Callable[..., Relaxation]:
  """Relaxation of an increasing concave function: chord below, tangent at the midpoint
  above; where a slope is infinite (sqrt at 0), the constant ``f(l)`` below and ``f(u)``
  above."""

  def relax(l, u):
    lw, lb = _chord(f, l, u)
    uw, ub = _tangent(f, (l + u) / 2)
    low_ok, up_ok = jnp.isfinite(lw) & jnp.isfinite(lb), jnp.isfinite(uw) & jnp.isfinite(ub)
    zero = jnp.zeros_like(l)
    return Relaxation(jnp.where(low_ok, lw, zero), jnp.where(low_ok, lb, f(l)),
                      jnp.where(up_ok, uw, zero), jnp.where(up_ok, ub, f(u)))

  return relax


def _s_shaped_upper(f: Callable, l, u, iters: int = 24):
  """Upper line of an S-shaped ``f`` (convex below 0, concave above 0) on [l, u]."""
  # Concave side: tangent at the midpoint. Convex side: chord.
  t_w, t_b = _tangent(f, (l + u) / 2)
  c_w, c_b = _chord(f, l, u)

  # Across 0: the tangent at d in [0, u] through (l, f(l)) is above f on [l, u] for any d
  # with g(d) = f(d) + f'(d) (l - d) - f(l) >= 0; g(0) <= 0. If g(u) < 0, the chord is.
  def g(d):
    return f(d) + _deriv(f, d) * (l - d) - f(l)

  hi0 = jnp.maximum(u, 0.0)
  lo0 = jnp.zeros_like(u)

  def body(_, bracket):
    lo, hi = bracket
    mid = (lo + hi) / 2
    ok = g(mid) >= 0
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, d = lax.fori_loop(0, iters, body, (lo0, hi0))
  # Bisection has no derivative: keep the value of the root d of g and give it the one of the
  # implicit function theorem, dd = -(dg/dl) dl / g'(d) with g'(d) = f''(d) (l - d).
  d = lax.stop_gradient(d)
  g_d = lax.stop_gradient(_deriv(lambda t: _deriv(f, t), d) * (l - d))
  ok = jnp.abs(g_d) > _TINY
  g_l = g(d)
  d = d - jnp.where(ok, (g_l - lax.stop_gradient(g_l)) / jnp.where(ok, g_d, 1.0), 0.0)
  d_w, d_b = _tangent(f, d)
  use_chord = g(hi0) < 0
  m_w = jnp.where(use_chord, c_w, d_w)
  m_b = jnp.where(use_chord, c_b, d_b)
  w = jnp.where(l >= 0, t_w, jnp.where(u <= 0, c_w, m_w))
  b = jnp.where(l >= 0, t_b, jnp.where(u <= 0, c_b, m_b))
  return w, b


def s_shaped(f: Callable, symmetry: float) -> Callable[..., Relaxation]:
  """Relaxation of an S-shaped function with ``f(-x) = symmetry - f(x)``."""

  def relax(l, u):
    uw, ub = _s_shaped_upper(f, l, u)
    # f(x) = s - f(-x) >= s - (w (-x) + b) = w x + s - b, with (w, b) the upper line on [-u, -l].
    w, b = _s_shaped_upper(f, -u, -l)
    return Relaxation(w, symmetry - b, uw, ub)

  return relax


def line_terms(A: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """``A * low`` where ``A > 0``, ``A * high`` where ``A < 0``, and 0 where ``A`` is 0, also
  for infinite lines (log at 0, a value that may overflow a narrow format): the term a
  lower bound takes from a relaxation's intercepts, never NaN."""
  return jnp.where(A > 0, A * low, jnp.where(A < 0, A * high, 0.0))


def relu_like(l, u, c, alpha=None) -> Relaxation:
  """Relaxation of ``max(x, c)`` (ReLU for ``c = 0``); ``alpha`` the lower slope if given."""
  c = jnp.broadcast_to(c, l.shape).astype(l.dtype)
  active = l >= c
  inactive = u <= c
  width = jnp.where(active | inactive, 1.0, u - l)
  up_w = jnp.where(active, 1.0, jnp.where(inactive, 0.0, (u - c) / width))
  up_b = jnp.where(active, 0.0, jnp.where(inactive, c, c - up_w * l))
  if alpha is None:
    alpha = (u - c >= c - l).astype(l.dtype)
  lo_w = jnp.where(active, 1.0, jnp.where(inactive, 0.0, alpha))
  lo_b = c * (1.0 - lo_w)
  return Relaxation(lo_w, lo_b, up_w, up_b)


def relu_default_alpha(l, u, c) -> jax.Array:
  """The adaptive lower slope of ``max(x, c)``: 1 where ``u - c >= c - l``, else 0."""
  c = jnp.broadcast_to(c, l.shape).astype(l.dtype)
  return (u - c >= c - l).astype(l.dtype)


def negate_input(relax: Relaxation) -> Relaxation:
  """From a relaxation of ``g(z)`` at ``z = -x``, one of ``-g(-x)`` in ``x``."""
  # -g(-x) >= -(uw (-x) + ub) = uw x - ub; -g(-x) <= lw x - lb.
  return Relaxation(relax.uw, -relax.ub, relax.lw, -relax.lb)


def abs_relax(l, u) -> Relaxation:
  pos, neg = l >= 0, u <= 0
  width = jnp.where(pos | neg, 1.0, u - l)
  cw = (u + l) / width  # chord from (l, -l) to (u, u)
  cb = -l - cw * l
  uw = jnp.where(pos, 1.0, jnp.where(neg, -1.0, cw))
  ub = jnp.where(pos | neg, 0.0, cb)
  lw = jnp.where(pos, 1.0, jnp.where(neg, -1.0, jnp.where(u >= -l, 1.0, -1.0)))
  return Relaxation(lw, jnp.zeros_like(l), uw, ub)


def power_relax(n: int) -> Callable[..., Relaxation]:
  """Relaxation of ``x ** n`` for an integer ``n >= 1``."""
  f = lambda x: x**n

  def relax(l, u):
    if n == 1:
      one, zero = jnp.ones_like(l), jnp.zeros_like(l)
      return Relaxation(one, zero, one, zero)
    if n % 2 == 0:
      return convex(f)(l, u)
    cv, cc = convex(f)(l, u), concave(f)(l, u)
    zero = jnp.zeros_like(l)
    # Across zero: constant bounds l**n <= x**n <= u**n (x**n is increasing).
    const = Relaxation(zero, f(l), zero, f(u))
    pick = lambda a, b, c: jnp.where(l >= 0, a, jnp.where(u <= 0, b, c))
    return Relaxation(*(pick(a, b, c) for a, b, c in zip(cv, cc, const)))

  return relax


class Planes(NamedTuple):
  """``wa_l a + wb_l b + c_l <= a b <= wa_u a + wb_u b + c_u`` on the operands' box."""
  wa_l: jax.Array
  wb_l: jax.Array
  c_l: jax.Array
  wa_u: jax.Array
  wb_u: jax.Array
  c_u: jax.Array


def mccormick(la, ua, lb, ub) -> Planes:
  """McCormick's planes of ``a b`` for ``a`` in ``[la, ua]`` and ``b`` in ``[lb, ub]``.

  ``(a - la)(b - lb) >= 0`` gives the lower plane and ``(a - la)(ub - b) >= 0`` the
  upper one (McCormick, "Computability of global solutions to factorable nonconvex
  programs", 1976).
  """
  return Planes(lb, la, -la * lb, ub, la, -la * ub)


def rounding_reach(l, u, exponent_bits: int, mantissa_bits: int) -> jax.Array:
  """``max |round(x) - x|`` over ``[l, u]`` for rounding to nearest in the given format.

  Half a unit in the last place of the largest magnitude (relative ``2^-(m+1)``),
  plus the smallest normal number (below it a value may be kept as a subnormal, as a
  cast does, or flushed to zero, as XLA's ``reduce_precision`` does); infinite where
  the interval reaches past the format's largest finite value (the value may round to
  infinity).
  """
  big = jnp.maximum(jnp.abs(l), jnp.abs(u))
  emax = 2**(exponent_bits - 1) - 1
  largest = (2.0 - 2.0**-mantissa_bits) * 2.0**emax
  normal = 2.0**(1 - emax)  # the smallest normal number
  reach = big * 2.0**-(mantissa_bits + 1) + normal
  return jnp.where(big <= largest, reach, jnp.inf).astype(l.dtype)


def rounding(exponent_bits: int, mantissa_bits: int) -> Callable[..., Relaxation]:
  """Relaxation of rounding to a float format: ``x - r <= round(x) <= x + r``."""

  def relax(l, u):
    r = rounding_reach(l, u, exponent_bits, mantissa_bits)
    one = jnp.ones_like(l)
    return Relaxation(one, -r, one, r)

  return relax


# The relaxations of the elementwise functions, named by function.
TANH = s_shaped(jnp.tanh, 0.0)
LOGISTIC = s_shaped(jax.nn.sigmoid, 1.0)
EXP = convex(jnp.exp)
EXPM1 = convex(jnp.expm1)
LOG = concave(jnp.log)
LOG1P = concave(jnp.log1p)
SQRT = concave(jnp.sqrt)
SQUARE = power_relax(2)

"""The Lagrangian dual of a ReLU network's specification, with duals a network predicts.

Dvijotham et al. 2018 ("A Dual Approach to Scalable Verification of Deep Networks"; and
"Training verified learners with learned verifiers", the predictor-verifier training of
`training.methods`). The network is read as in `verify.sdp_fo`: ``z_k = A_k(x_k)``,
``x_{k+1} = max(z_k, c_k)``, the output ``A_m(x_m)``; the pre-activations get interval
boxes ``[l_k, u_k]`` layer by layer (as the paper) and the activations ``B_k``. For any
multipliers ``nu_k`` (of ``z_k = A_k(x_k)``) and ``lam_k`` (of ``x_{k+1} = max(z_k, c_k)``),
weak duality gives, with ``nu_m = s`` the specification row and ``A^T`` the linear part's
transpose,

    min_box s . A_m(x_m)  >=  sum_{k <= m} nu_k . A_k(0)
        + min_{x_0 in B_0} (A_0^T nu_0) . x_0 + sum_{k < m} min_{x_{k+1} in B_{k+1}} (A_{k+1}^T nu_{k+1} - lam_k) . x_{k+1}
        + sum_{k < m} sum_i min_{z in [l, u]} (lam_k max(z, c_k) - nu_k z)_i,

every term a closed-form minimum (a box's linear minimum; a piecewise-linear function's at
``l``, ``u`` and ``c``). The multipliers come backward, layer by layer: with ``g_k =
A_{k+1}^T nu_{k+1}``, ``lam_k = g_k + delta_k`` and ``nu_k = s_k lam_k``, where a
*verifier* (any function of per-neuron features, e.g. `robustlib.models.DualVerifier`)
predicts two numbers ``(o_1, o_2)`` for each unstable neuron from `FEATURES` of it:
``s = s_CROWN + o_1`` and ``delta = o_2 |g|``, ``s_CROWN`` CROWN's slope (``(u - c) / (u - l)``
where ``g < 0``, the adaptive 0 or 1 where ``g >= 0``); a stable one takes the exact
``s = 1`` (active) or ``0`` (inactive), ``delta = 0``. A verifier that outputs zeros
gives CROWN-IBP's bound.

Whatever the verifier predicts the bound is valid. `certified_lower_bounds` evaluates it
soundly: boxes, multipliers and every term in float64 (each pre-activation box widened by
1e-9 of the absolute sums its affine map adds up, every intermediate one included, times
its number of operations), less 1e-9 of the absolute sum of every product the bound adds
up (float64 sums of fewer than 1e6 terms err by less than 1.2e-10 of it; larger layers are
refused), rounded down to float32: a bound of the real-valued network; `certify`
subtracts the rounding allowance of the float32 evaluation (`verify.rounding`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import checks
from robustlib.checks import InputError
from robustlib.models.verifier import NUM_FEATURES
from verify.certification import margin_bounds
from verify.ibp import ibp
from verify.interval import Interval, linf_ball, round_down, round_up
from verify import rounding
from verify.sdp_fo import layered_network, map_reach
from verify.specs import margin_spec

# Per-neuron features a verifier reads, the last axis of its input: the pre-activation's
# lower and upper bound and clean value (each less the ReLU's threshold, over the layer's
# mean radius), the backward coefficient g over its root mean square, and the layer's depth
# (k + 1) / m.
FEATURES = NUM_FEATURES

# verifier(features [..., FEATURES]) -> [..., 2]: the slope and offset of each neuron's duals.
Verifier = Callable[[jax.Array], jax.Array]

_METHOD = "lagrangian_dual"
_SLACK = 1e-9
# The float64 margin assumes sums of fewer terms than this (n eps64 <= 1.1e-10 of _SLACK).
_MAX_TERMS = 10**6


def zero_verifier(features: jax.Array) -> jax.Array:
  """The verifier predicting zeros: CROWN's slopes, no offsets (CROWN-IBP's bound)."""
  return jnp.zeros(features.shape[:-1] + (2,), features.dtype)


def _big(box: Interval) -> jax.Array:
  return jnp.maximum(jnp.abs(box.lower), jnp.abs(box.upper))


def _sum(v: jax.Array, start: int = 1) -> jax.Array:
  return jnp.sum(v, axis=tuple(range(start, v.ndim)))


def interval_boxes(net, box: Interval, dtype, widen: bool = False):
  """Pre-activation boxes ``[l_k, u_k]`` and activation boxes ``B_0 .. B_m`` by interval
  arithmetic layer by layer, in ``dtype``; ``widen`` pads each pre-activation box by
  ``1e-9`` of its layer's `verify.sdp_fo.map_reach` (float64's rounding, for the sound evaluation)."""
  acts = [Interval(box.lower.astype(dtype), box.upper.astype(dtype))]
  pres = []
  for k, c in enumerate(net.thresholds):
    z = ibp(lambda v, k=k: net.maps[k](v, dtype), acts[-1])
    if widen:
      pad = _SLACK * map_reach(net.maps[k], acts[-1]) + np.finfo(np.float64).tiny
      z = Interval(z.lower - pad, z.upper + pad)
    c = c.astype(dtype)
    pres.append(z)
    acts.append(Interval(jnp.maximum(z.lower, c), jnp.maximum(z.upper, c)))
  return pres, acts


def _transpose(f: Callable, like: jax.Array, nu: jax.Array) -> jax.Array:
  """``A^T nu`` ``[N, S, *x]`` of the affine ``f`` on ``like [N, *x]``, ``nu [N, S, *out]``."""
  _, back = jax.vjp(f, jnp.zeros_like(like))
  return jax.vmap(lambda v: back(v)[0], in_axes=1, out_axes=1)(nu)


def _features(pre: Interval, c, clean, g, depth: float) -> jax.Array:
  """`FEATURES` ``[N, S, *z, 5]`` of a layer's neurons."""
  axes = tuple(range(1, pre.lower.ndim))
  rho = jnp.mean(pre.upper - pre.lower, axis=axes, keepdims=True) / 2 + 1e-6
  per_neuron = [(pre.lower - c) / rho, (pre.upper - c) / rho, (clean - c) / rho]
  per_neuron = [jnp.broadcast_to(v[:, None], g.shape) for v in per_neuron]
  rms = jnp.sqrt(jnp.mean(g * g, axis=tuple(range(2, g.ndim)), keepdims=True)) + 1e-12
  f = jnp.stack(per_neuron + [g / rms, jnp.full_like(g, depth)], axis=-1)
  return jax.lax.stop_gradient(jnp.clip(f, -30.0, 30.0))


def _duals(pre: Interval, c, g, out):
  """``(s, delta)`` of a layer from the verifier's ``out [..., 2]``."""
  l, u = pre.lower[:, None], pre.upper[:, None]
  c = c[:, None]
  unstable = (l < c) & (u > c)
  upper_slope = (u - c) / jnp.where(unstable, u - l, 1.0)
  adaptive = (u - c >= c - l).astype(g.dtype)
  ref = jnp.where(g >= 0, adaptive, upper_slope)
  # Any slope is valid; an unbounded offset from CROWN's keeps the gradient alive at 0.
  s = jnp.where(unstable, ref + out[..., 0].astype(g.dtype), (l >= c).astype(g.dtype))
  delta = jnp.where(unstable, out[..., 1].astype(g.dtype) * jnp.abs(g), 0.0)
  return s, delta


def _relu_term(lam, nu, pre: Interval, c):
  """``sum_i min_{z in [l, u]} lam max(z, c) - nu z`` ``[N, S]``, and its terms' magnitude."""
  l, u, c = pre.lower[:, None], pre.upper[:, None], c[:, None]
  f = lambda z: lam * jnp.maximum(z, c) - nu * z
  inside = (l < c) & (c < u)
  low = jnp.minimum(jnp.minimum(f(l), f(u)), jnp.where(inside, f(c), jnp.inf))
  size = jnp.maximum(jnp.maximum(jnp.abs(l), jnp.abs(u)), jnp.abs(c))
  return _sum(low, 2), _sum((jnp.abs(lam) + jnp.abs(nu)) * size, 2)


def _box_minimum(q, box: Interval):
  """``min_{x in box} q . x`` ``[N, S]`` for ``q [N, S, *x]``, and its magnitude."""
  lo, hi = box.lower[:, None], box.upper[:, None]
  value = q * (lo + hi) / 2 - jnp.abs(q) * (hi - lo) / 2
  return _sum(value, 2), _sum(jnp.abs(q) * jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 2)


def dual_bound(net,
               x: jax.Array,
               rows: jax.Array,
               verifier: Verifier,
               dtype=jnp.float32,
               sound: bool = False) -> tuple[jax.Array, jax.Array]:
  """The dual's value ``[N, S]`` for ``rows [N, S, K]`` with the verifier's multipliers, and
  the absolute sum of the products it adds up ``[N, S]`` (its rounding's scale).

  Args:
    net: `verify.sdp_fo.layered_network`'s layers.
    x: the clean input ``[N, ...]`` (the features' clean pre-activations).
    rows: specification rows; the bound is of ``rows . fn(x)``.
    verifier: see `Verifier`.
    dtype: of the evaluation.
    sound: pad the interval boxes for float64's rounding (`interval_boxes`) and add up
      the magnitude (else 0).
  """
  m = len(net.thresholds)
  box = net.boxes[0]
  pres, acts = interval_boxes(net, box, dtype, sound)
  xs = [x.astype(dtype)]
  for k in range(m):
    xs.append(jnp.maximum(net.maps[k](xs[-1], dtype), net.thresholds[k].astype(dtype)))
  maps = [lambda v, k=k: net.maps[k](v, dtype) for k in range(m + 1)]
  out = jax.eval_shape(maps[m], xs[m])
  nu = rows.astype(dtype).reshape(rows.shape[:2] + out.shape[1:])
  value = magnitude = 0.0
  for k in range(m, -1, -1):
    bias = maps[k](jnp.zeros_like(xs[k]))
    value += _sum(nu * bias[:, None], 2)
    if sound:
      magnitude += _sum(jnp.abs(nu) * map_reach(net.maps[k], acts[k])[:, None], 2)
    g = _transpose(maps[k], xs[k], nu)
    if k == 0:
      term, size = _box_minimum(g, acts[0])
      return value + term, magnitude + size
    pre, c = pres[k - 1], net.thresholds[k - 1].astype(dtype)
    clean = maps[k - 1](xs[k - 1])
    predicted = verifier(_features(pre, c, clean, g, k / m))
    s, delta = _duals(pre, c, g, predicted)
    lam = g + delta
    nu = s * lam
    term, size = _box_minimum(-delta, acts[k])
    relu, relu_size = _relu_term(lam, nu, pre, c)
    value += term + relu
    magnitude += size + relu_size + _sum(jnp.abs(g) * _big(acts[k])[:, None], 2)
  raise AssertionError("unreachable")


def _layers(fn, interval: Interval, spec):
  if not isinstance(interval, Interval):
    raise InputError(f"expected an Interval of inputs [N, ...], got {type(interval).__name__}")
  net, spec = layered_network(fn, interval, spec, method=_METHOD, crown_boxes=False)
  if spec is None:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(interval.lower.shape, interval.lower.dtype))
    if len(out.shape) != 2:
      raise InputError(f"{_METHOD} without a spec needs fn's output [N, K], got {out.shape}")
    spec = jnp.broadcast_to(jnp.eye(out.shape[1], dtype=interval.dtype),
                            (out.shape[0],) + (out.shape[1],) * 2)
  return net, spec


def lagrangian_dual(fn: Callable,
                    interval: Interval,
                    spec: jax.typing.ArrayLike | None = None,
                    verifier: Verifier = zero_verifier,
                    x: jax.Array | None = None) -> jax.Array:
  """Lower bounds ``[N, S]`` of ``spec @ fn(x)`` over the box with the verifier's duals
  (jittable and differentiable, in float32: what training minimises; `certified_lower_bounds`
  gives the sound value).

  Args:
    fn: ``fn(x [N, ...]) -> [N, K]`` of affine maps and ReLUs.
    interval: the input box ``[N, ...]``.
    spec: ``C [N, S, K]``; None: the outputs themselves.
    verifier: see `Verifier`; `zero_verifier` gives CROWN-IBP's bound.
    x: the clean inputs ``[N, ...]`` the features read (default the box's centre).

  Raises:
    InputError: for a network that is not affine maps and ReLUs (naming the operation) or
      a spec that does not fit its output.
  """
  net, rows = _layers(fn, interval, spec)
  x = interval.center if x is None else x
  return dual_bound(net, x, rows, verifier)[0]


def certified_lower_bounds(fn: Callable,
                           interval: Interval,
                           spec: jax.typing.ArrayLike | None = None,
                           verifier: Verifier = zero_verifier,
                           x: jax.Array | None = None) -> jax.Array:
  """`lagrangian_dual`'s bound evaluated soundly (module docstring): float64 boxes and
  terms, less their rounding's margin, rounded down to float32. A valid lower bound of
  the real-valued network whatever the verifier predicts. Not jitted end to end."""
  net, rows = _layers(fn, interval, spec)
  sizes = [math.prod(interval.lower.shape[1:])] + [math.prod(c.shape[1:]) for c in net.thresholds]
  if max(sizes) >= _MAX_TERMS:
    raise InputError(f"{_METHOD}'s sound evaluation covers sums of fewer than {_MAX_TERMS} "
                     f"terms; a layer here has {max(sizes)} values per example")
  x = interval.center if x is None else jnp.asarray(x)
  # The rows as given (a float64 spec is not rounded to the box's dtype).
  rows = np.broadcast_to(np.asarray(rows if spec is None else spec, np.float64), rows.shape)
  with jax.enable_x64(True):
    f64 = jnp.float64
    net = net.__class__(net.maps, net.thresholds,
                        (Interval(net.boxes[0].lower.astype(f64), net.boxes[0].upper.astype(f64)),),
                        ())

    def predict(features):  # the verifier sees what it was trained on: float32 features
      return verifier(features.astype(jnp.float32)).astype(f64)

    value, magnitude = dual_bound(net,
                                  x.astype(f64),
                                  jnp.asarray(rows, f64),
                                  predict,
                                  f64,
                                  sound=True)
    value = np.asarray(value) - _SLACK * (1 + np.asarray(magnitude))
  value = np.where(np.isfinite(value), value, -np.inf)
  return jnp.asarray(round_down(value))


def certify(
    logits_fn: Callable,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    verifier: Verifier = zero_verifier,
    bounds: tuple[float, float] | None = (0.0, 1.0)) -> jax.Array:
  """Which examples the verifier's duals prove robust: bool ``[N]``.

  As `verify.certify`: every margin's lower bound (the sound dual's, or IBP's where
  larger) exceeds the rounding allowance of the float32 evaluation, so the label's logit
  provably wins at every float32 point of the ball, for the real-valued network and its
  float32 evaluation.

  Raises:
    InputError: as `verify.certify` for bad inputs, and for networks other than affine
      maps and ReLUs.
  """
  bounds = checks.check_bounds(bounds)
  checks.check_images(x, bounds=bounds, name="x")
  x = jnp.asarray(x)
  checks.check_eps(eps, num_examples=x.shape[0])
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  num_classes = checks.check_logits_shape(out, x.shape[0], what="a margin specification")
  checks.check_labels(y, num_examples=x.shape[0], num_classes=num_classes, name="y")
  y, eps = jnp.asarray(y), jnp.asarray(round_up(eps))
  box = linf_ball(x, eps, bounds)
  spec = margin_spec(y, num_classes)
  lower = certified_lower_bounds(logits_fn, box, spec, verifier, x)
  ibp_lower = margin_bounds(logits_fn, x, y, eps, "ibp", bounds)
  allow = rounding.allowance(logits_fn, box, spec)
  return jnp.all(jnp.maximum(lower, ibp_lower) - allow > 0, axis=1)

"""Probabilistic specifications by the functional Lagrangian (Berrada et al. 2021).

The specification is an expectation: an upper bound, for every input ``x`` in a
box, on the expected softmax probability ``E[softmax(z)_c]`` of every class ``c``
under a distribution with closed-form moments over

  * the last layer's weights (`GaussianLinear`: a Bayesian last layer, ``z = h W +
    b`` with independent Gaussian ``W`` and ``b``, ``h = fn(x)`` the features); or
  * the input (`GaussianNoise`: ``z = fn(x + delta)``, ``delta`` Gaussian).

On inputs far from the data such bounds certify that a model stays uncertain: the
predictive distribution's entropy is at least ``-log max_c E[softmax_c]``
(`entropy_lower_bound`).

The network, read from its graph as affine maps between ReLUs (`layered_network`),
is ``z_k = A_k(x_k)``, ``x_{k+1} = max(z_k, c_k)``, ``h = A_m(x_m)``, each value
in the box CROWN gives it. For a class ``i`` and any distribution ``pi`` over the
other classes, ``log sum_{j != i} exp(z_j) >= pi . z + H(pi)`` (Gibbs), so
``softmax_i(z) <= sigmoid(z_i - pi . z - H(pi))``; given ``h`` that argument is
Gaussian with mean ``T(h) = h d + d_0`` and variance ``S(h) = h^2 w + w_0``
(from the layer's means and variances and ``pi``), and with ``sigmoid(t) <=
Phi(kappa t) + eps`` (``eps`` computed, not assumed)

    E[softmax_i | h] <= G(T, S) = Phi(kappa T / sqrt(1 + kappa^2 S)) + eps.

With functional multipliers ``lambda_k`` on every value (linear ``mu_k . z_k`` on
pre-activations, linear and diagonal quadratic ``nu_k . x_k + q_k . x_k^2`` on
activations, ``eta . h`` on the features, and ``alpha T + beta S`` on the
moments), the expectation telescopes into a sum of independent maximisations,
each over one value's box:

    sup_x E[softmax_i] <= sup_{x_0} mu_0 . A_0(x_0)
        + sum_k sup_{z_k} [nu_{k+1} . max(z_k, c_k) + q_{k+1} . max(z_k, c_k)^2 - mu_k . z_k]
        + sum_k sup_{x_k} [mu_k . A_k(x_k) - nu_k . x_k - q_k . x_k^2]
        + sup_h [alpha T(h) + beta S(h) - eta . h] + sup_{T, S} [G(T, S) - alpha T - beta S].

Every term but the last is separable into one-dimensional quadratics and has its
exact maximum in closed form; the last is two-dimensional and bounded on a grid
of cells, exactly per cell (``G`` is monotone in ``T`` and, for either sign of
``T``, in ``S``). The sum is a valid bound for any multipliers, which Adam
minimises (per example and class, from zero multipliers and a uniform ``pi``:
the interval bound) together with ``pi``; the returned bound is the best iterate
evaluated again in float64, over CROWN's boxes computed again in float64, plus
1e-9 of the absolute sum of its terms (its rounding is below n eps64 of that),
rounded up to float32.

Under input noise the logits are deterministic given the input (``G =
sigmoid(T)``, no ``eps``), the boxes are those of the input box widened by
``truncation`` standard deviations, and, on the event ``A`` that every noise
coordinate lies within them (``delta`` truncated symmetrically keeps mean zero,
so the first term is unchanged), ``E[p] <= P(A) U + P(not A) <= U + P(not A) (1 -
U)`` with ``P(not A) <= n erfc(t / sqrt 2)`` for ``n`` noise coordinates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robustlib import compilation
from robustlib.checks import InputError
from verify.crown import lower_bounds
from verify.interval import Interval, round_down, round_up
from verify.sdp_fo import layered_network, map_reach

# The scale of the probit bound sigmoid(t) <= Phi(kappa t) + eps that makes eps smallest
# (about 0.0095; sqrt(pi / 8), the usual approximation, gives 0.018).
_KAPPA = 0.588


@dataclasses.dataclass(frozen=True)
class GaussianLinear:
  """A Bayesian last layer ``z = h W + b`` with independent Gaussian weights.

  Attributes:
    mean_w: ``[H, C]`` means of ``W``.
    std_w: ``[H, C]`` standard deviations of ``W`` (>= 0).
    mean_b: ``[C]`` means of ``b``.
    std_b: ``[C]`` standard deviations of ``b`` (>= 0).
  """
  mean_w: jax.typing.ArrayLike
  std_w: jax.typing.ArrayLike
  mean_b: jax.typing.ArrayLike
  std_b: jax.typing.ArrayLike

  def check(self, features: int) -> None:
    mw, sw = np.shape(self.mean_w), np.shape(self.std_w)
    mb, sb = np.shape(self.mean_b), np.shape(self.std_b)
    if len(mw) != 2 or sw != mw or mb != (mw[1],) or sb != mb:
      raise InputError(f"GaussianLinear needs mean_w and std_w [H, C] and mean_b and std_b [C]; "
                       f"got {mw}, {sw}, {mb}, {sb}")
    if mw[0] != features:
      raise InputError(f"GaussianLinear has {mw[0]} inputs but the features have {features}")
    if mw[1] < 2:
      raise InputError(f"GaussianLinear needs at least 2 classes, got {mw[1]}")
    for name in ("mean_w", "std_w", "mean_b", "std_b"):
      if not np.all(np.isfinite(getattr(self, name))):
        raise InputError(f"GaussianLinear.{name} has non-finite entries")
    if np.any(np.asarray(self.std_w) < 0) or np.any(np.asarray(self.std_b) < 0):
      raise InputError("GaussianLinear's standard deviations must be >= 0")

  def sample(self, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """``num`` draws ``(W [num, H, C], b [num, C])``."""
    kw, kb = jax.random.split(key)
    mw = jnp.asarray(self.mean_w, jnp.float32)
    mb = jnp.asarray(self.mean_b, jnp.float32)
    w = mw + jnp.asarray(self.std_w, jnp.float32) * jax.random.normal(kw, (num,) + mw.shape)
    b = mb + jnp.asarray(self.std_b, jnp.float32) * jax.random.normal(kb, (num,) + mb.shape)
    return w, b


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
  """Additive input noise ``delta ~ N(0, std^2 I)``.

  Attributes:
    std: the noise's standard deviation (> 0).
    truncation: the boxes of the network's values are those of the input box widened
      by ``truncation * std``; the rest of the noise's mass enters the bound as
      ``P(not A)`` (at most ``n erfc(truncation / sqrt 2)``).
  """
  std: float
  truncation: float = 6.0

  def check(self) -> None:
    if not (math.isfinite(self.std) and self.std > 0):
      raise InputError(f"GaussianNoise.std must be finite and > 0, got {self.std}")
    if not (math.isfinite(self.truncation) and self.truncation > 0):
      raise InputError(f"GaussianNoise.truncation must be finite and > 0, got {self.truncation}")


@functools.lru_cache(maxsize=None)
def probit_gap(kappa: float = _KAPPA) -> float:
  """An upper bound of ``sup_t sigmoid(t) - Phi(kappa t)``, computed soundly.

  The difference is odd in ``t``; on ``[0, 40]`` it is evaluated on a grid in float64 and
  its Lipschitz constant (``1/4 + kappa / sqrt(2 pi)``) covers the gaps between
  points; beyond 40 both tails are below ``max(1 - sigmoid(40), 1 - Phi(40 kappa))``.
  """
  step = 1e-4
  t = np.arange(0.0, 40.0 + step, step)
  d = 1.0 / (1.0 + np.exp(-t)) - 0.5 * np.vectorize(math.erfc)(-kappa * t / math.sqrt(2))
  lipschitz = 0.25 + kappa / math.sqrt(2 * math.pi)
  tail = max(1.0 / (1.0 + math.exp(40.0)), 0.5 * math.erfc(40 * kappa / math.sqrt(2)))
  return float(max(np.abs(d).max() + lipschitz * step / 2, tail) + 1e-12)


# ----------------------------------------------------------------------------------------------
# Exact maxima of the separable terms (elementwise over boxes).


def max_quadratic(a: jax.Array, b: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
  """``max_{x in [lower, upper]} a x^2 + b x``, elementwise and exact."""
  f = lambda x: (a * x + b) * x
  vertex = jnp.clip(-b / jnp.where(a < 0, 2 * a, -1.0), lower, upper)
  return jnp.maximum(jnp.maximum(f(lower), f(upper)), jnp.where(a < 0, f(vertex), f(lower)))


def max_relu_term(nu, q, mu, lower, upper, c) -> jax.Array:
  """``max_{z in [lower, upper]} nu y + q y^2 - mu z`` with ``y = max(z, c)``, exact."""

  def f(z):
    y = jnp.maximum(z, c)
    return (nu + q * y) * y - mu * z

  lo = jnp.maximum(lower, jnp.minimum(c, upper))
  vertex = jnp.clip((mu - nu) / jnp.where(q < 0, 2 * q, -1.0), lo, upper)
  best = jnp.maximum(jnp.maximum(f(lower), f(upper)), f(jnp.clip(c, lower, upper)))
  return jnp.maximum(best, jnp.where(q < 0, f(vertex), f(lower)))


def _sum(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# The dual bound for one class pair, a batch of examples.


@dataclasses.dataclass(frozen=True)
class _Layer:
  """The last layer's moments: ``z = h W + b``, independent entries."""
  mean_w: jax.Array  # [H, C]
  var_w: jax.Array  # [H, C]
  mean_b: jax.Array  # [C]
  var_b: jax.Array  # [C]

  @classmethod
  def of(cls, layer: GaussianLinear | None, classes: int, dtype) -> "_Layer":
    if layer is None:  # the features are the logits themselves
      eye = np.eye(classes)
      parts = eye, np.zeros_like(eye), np.zeros(classes), np.zeros(classes)
    else:
      parts = (np.asarray(layer.mean_w, np.float64), np.asarray(layer.std_w, np.float64)**2,
               np.asarray(layer.mean_b, np.float64), np.asarray(layer.std_b, np.float64)**2)
    return cls(*(jnp.asarray(v, dtype) for v in parts))


jax.tree_util.register_dataclass(_Layer,
                                 data_fields=["mean_w", "var_w", "mean_b", "var_b"],
                                 meta_fields=[])


def _moments(layer: _Layer, i: jax.Array, theta: jax.Array):
  """Mean ``T = h d + d0`` and variance ``S = h^2 w + w0`` of ``z_i - pi . z - H(pi)``,
  ``pi = softmax(theta)`` over the classes other than ``i``: ``d, w [N, H]``, ``d0, w0 [N]``.

  ``log sum_{j != i} exp(z_j) >= pi . z + H(pi)`` for every distribution ``pi`` (Gibbs), so
  ``softmax_i(z) <= sigmoid(z_i - pi . z - H(pi))``.
  """
  other = jnp.arange(theta.shape[-1]) != i
  pi = jax.nn.softmax(jnp.where(other, theta, -jnp.inf), axis=-1)  # [N, C]
  entropy = -jnp.sum(pi * jnp.log(jnp.where(pi > 0, pi, 1.0)), axis=-1)
  d = layer.mean_w[:, i] - pi @ layer.mean_w.T
  w = layer.var_w[:, i] + (pi**2) @ layer.var_w.T
  return d, layer.mean_b[i] - pi @ layer.mean_b - entropy, w, layer.var_b[i] + (pi**2) @ layer.var_b


def _moment_boxes(d, d0, w, w0, h: Interval):
  """Boxes ``[N]`` of ``T(h)`` and ``S(h)`` over ``h``'s box."""
  lo_t = d0 + jnp.sum(jnp.minimum(d * h.lower, d * h.upper), axis=1)
  hi_t = d0 + jnp.sum(jnp.maximum(d * h.lower, d * h.upper), axis=1)
  sq_hi = jnp.maximum(h.lower**2, h.upper**2)
  sq_lo = jnp.where((h.lower <= 0) & (h.upper >= 0), 0.0, jnp.minimum(h.lower**2, h.upper**2))
  return (lo_t, hi_t), (w0 + jnp.sum(sq_lo * w, axis=1), w0 + jnp.sum(sq_hi * w, axis=1))


def _cell_maximum(alpha, beta, t_box, s_box, grid: int, gaussian: bool, eps: float):
  """``max_{T, S} G(T, S) - alpha T - beta S`` over the boxes, bounded cell by cell."""
  frac = jnp.linspace(0.0, 1.0, grid + 1, dtype=alpha.dtype)
  t = t_box[0][:, None] + (t_box[1] - t_box[0])[:, None] * frac  # [N, grid + 1]
  t = t.at[:, -1].set(t_box[1])
  t0, t1 = t[:, :-1, None], t[:, 1:, None]
  lin_t = jnp.maximum(-alpha[:, None, None] * t0, -alpha[:, None, None] * t1)
  if not gaussian:
    g = jax.nn.sigmoid(t1)
    return jnp.max(g + lin_t, axis=(1, 2))
  s = s_box[0][:, None] + (s_box[1] - s_box[0])[:, None] * frac
  s = s.at[:, -1].set(s_box[1])
  s0, s1 = s[:, None, :-1], s[:, None, 1:]
  lin_s = jnp.maximum(-beta[:, None, None] * s0, -beta[:, None, None] * s1)
  s_at = jnp.where(t1 >= 0, s0, s1)
  g = jax.scipy.special.ndtr(_KAPPA * t1 / jnp.sqrt(1 + _KAPPA**2 * s_at)) + eps
  return jnp.max(g + lin_t + lin_s, axis=(1, 2))


def _bound(net, h_box: Interval, layer: _Layer, i, duals, grid: int, gaussian: bool, eps: float,
           dtype):
  """The functional Lagrangian's value ``[N]`` for class ``i`` at ``duals`` (any values
  give a valid bound)."""
  m = len(net.maps) - 1
  outer = list(duals["mu"]) + [duals["eta"]]  # the multiplier of each map's output
  total = 0.0
  for k in range(m + 1):
    box = net.boxes[k]
    lo, hi = box.lower.astype(dtype), box.upper.astype(dtype)
    const, vjp = jax.vjp(lambda v, k=k: net.maps[k](v, dtype), jnp.zeros_like(lo))
    (grad,) = vjp(outer[k])
    total += _sum(outer[k] * const)
    if k == 0:
      total += _sum(jnp.maximum(grad * lo, grad * hi))
    else:
      total += _sum(max_quadratic(-duals["q"][k - 1], grad - duals["nu"][k - 1], lo, hi))
  for k in range(m):
    pre = net.inputs[k]
    total += _sum(
        max_relu_term(duals["nu"][k], duals["q"][k], duals["mu"][k], pre.lower.astype(dtype),
                      pre.upper.astype(dtype), net.thresholds[k].astype(dtype)))
  alpha, beta = duals["alpha"], duals["beta"]
  h = Interval(h_box.lower.astype(dtype), h_box.upper.astype(dtype))
  d, d0, w, w0 = _moments(layer, i, duals["theta"])
  total += alpha * d0 + beta * w0 + _sum(
      max_quadratic(beta[:, None] * w, alpha[:, None] * d - duals["eta"], h.lower, h.upper))
  t_box, s_box = _moment_boxes(d, d0, w, w0, h)
  return total + _cell_maximum(alpha, beta, t_box, s_box, grid, gaussian, eps)


def _zero_duals(net, h_box: Interval, classes: int):
  z = lambda b: jnp.zeros_like(b.lower)
  n, dtype = h_box.lower.shape[0], h_box.lower.dtype
  return {
      "mu": [z(b) for b in net.inputs],
      "nu": [z(b) for b in net.boxes[1:]],
      "q": [z(b) for b in net.boxes[1:]],
      "eta": z(h_box),
      "alpha": jnp.zeros((n,), dtype),
      "beta": jnp.zeros((n,), dtype),
      "theta": jnp.zeros((n, classes), dtype),  # pi uniform over the other classes
  }


def _optimise(net, h_box, layer: _Layer, grid, gaussian, eps, steps, lr):
  """Adam on every class's multipliers; the best iterate of each (class, example)."""
  classes = layer.mean_b.shape[0]
  ids = jnp.arange(classes)
  bound = lambda i, duals: _bound(net, h_box, layer, i, duals, grid, gaussian, eps, jnp.float32)
  duals = jax.vmap(lambda _: _zero_duals(net, h_box, classes))(ids)
  opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
  state = opt.init(duals)
  values = jax.vmap(bound)(ids, duals)

  def step(carry, _):
    duals, state, best, best_value = carry
    grads = jax.grad(lambda d: jnp.sum(jax.vmap(bound)(ids, d)))(duals)
    updates, state = opt.update(grads, state, duals)
    duals = optax.apply_updates(duals, updates)
    value = jax.vmap(bound)(ids, duals)
    better = value < best_value

    def keep(new, old):
      return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - 2)), new, old)

    best = jax.tree_util.tree_map(keep, duals, best)
    return (duals, state, best, jnp.minimum(value, best_value)), None

  (_, _, best, _), _ = jax.lax.scan(step, (duals, state, duals, values), None, length=steps)
  return best


def _problem(fn, box: Interval, clean: Interval, chunk_size):
  """The layers and CROWN's boxes over ``box``, with the caller's ``clean`` input box as the
  first (the first term is the mean over the noise of an affine function of the noisy
  input: its value at the clean input), and the features' box."""
  net, _ = layered_network(fn, box, None, chunk_size, method="functional_lagrangian")
  net = dataclasses.replace(net, boxes=(clean,) + net.boxes[1:])
  n = box.lower.shape[0]
  out = jax.eval_shape(fn, jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype)).shape[1]
  eye = jnp.eye(out, dtype=box.dtype)
  rows = jnp.broadcast_to(jnp.concatenate([eye, -eye]), (n, 2 * out, out))
  both = lower_bounds(fn, box, rows, "crown", chunk_size)
  return net, Interval(both[:, :out], -both[:, out:])


@compilation.jit(static_argnames=("fn", "grid", "gaussian", "eps", "steps", "lr", "chunk_size"))
def _optimised_multipliers(fn, lower, upper, clean_lower, clean_upper, layer, grid, gaussian, eps,
                           steps, lr, chunk_size):
  """`_optimise` on ``fn``'s problem, compiled once per function and shapes."""
  net, h_box = _problem(fn, Interval(lower, upper), Interval(clean_lower, clean_upper), chunk_size)
  return _optimise(net, h_box, layer, grid, gaussian, eps, steps, lr)


def _magnitude(net, radii, h_box: Interval, layer: _Layer, i, duals) -> jax.Array:
  """The absolute sum ``[N]`` of every product `_bound` adds up at ``duals``: what its
  float64 rounding is relative to."""
  m = len(net.maps) - 1
  outer = list(duals["mu"]) + [duals["eta"]]
  big = lambda lo, hi: jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  total = 0.0
  for k in range(m + 1):
    box = net.boxes[k]
    x = big(box.lower, box.upper)
    const = net.maps[k](jnp.zeros_like(box.lower), x.dtype)
    total += _sum(jnp.abs(outer[k]) * (jnp.abs(const) + radii[k]))
    if k:
      total += _sum((jnp.abs(duals["nu"][k - 1]) + jnp.abs(duals["q"][k - 1]) * x) * x)
  for k in range(m):
    pre, c = net.inputs[k], net.thresholds[k]
    z = big(pre.lower, pre.upper)
    y = big(jnp.maximum(pre.lower, c), jnp.maximum(pre.upper, c))
    total += _sum((jnp.abs(duals["nu"][k]) + jnp.abs(duals["q"][k]) * y) * y +
                  jnp.abs(duals["mu"][k]) * z)
  alpha, beta = jnp.abs(duals["alpha"]), jnp.abs(duals["beta"])
  d, d0, w, w0 = _moments(layer, i, duals["theta"])
  pi = jax.nn.softmax(jnp.where(
      jnp.arange(duals["theta"].shape[-1]) != i, duals["theta"], -jnp.inf),
                      axis=-1)
  d_abs = jnp.abs(layer.mean_w[:, i]) + pi @ jnp.abs(layer.mean_w.T)
  d0_abs = jnp.abs(layer.mean_b[i]) + pi @ jnp.abs(layer.mean_b) + math.log(pi.shape[-1])
  h = big(h_box.lower, h_box.upper)
  total += alpha * d0_abs + beta * w0 + _sum(
      (alpha[:, None] * d_abs + jnp.abs(duals["eta"]) + beta[:, None] * w * h) * h)
  t_box, s_box = _moment_boxes(d, d0, w, w0, h_box)
  return total + alpha * big(*t_box) + beta * big(*s_box) + 2.0


def _certified_values(fn, box: Interval, clean: Interval, chunk_size, layer: _Layer, duals, grid,
                      gaussian, eps) -> np.ndarray:
  """The bound ``[C, N]`` at ``duals`` in float64 (boxes, layer and duals in float64), plus
  its rounding's margin: each float64 sum errs by less than ``n eps64`` of its terms'
  absolute sum (``n`` their count, below 1e5 here), so 1e-9 of `_magnitude` is a wide one.
  Call with 64-bit mode on."""
  net, h_box = _problem(fn, box, clean, chunk_size)
  duals = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), duals)
  radii = [map_reach(f, box) for f, box in zip(net.maps, net.boxes)]

  def one(i, d):
    return (_bound(net, h_box, layer, i, d, grid, gaussian, eps,
                   jnp.float64), _magnitude(net, radii, h_box, layer, i, d))

  values, scale = jax.vmap(one)(jnp.arange(layer.mean_b.shape[0]), duals)
  return np.asarray(values) + 1e-9 * (1 + np.asarray(scale))


def functional_lagrangian(fn: Callable,
                          interval: Interval,
                          distribution: GaussianLinear | GaussianNoise,
                          steps: int = 300,
                          lr: float = 0.02,
                          grid: int = 32,
                          chunk_size: int | None = None) -> jax.Array:
  """Upper bounds ``[N, C]`` of ``E[softmax(z)_c]`` for every input in the box.

  Args:
    fn: ``fn(x [N, ...]) -> [N, H]`` affine maps and ReLUs: the features ``h`` feeding a
      `GaussianLinear` last layer, or the logits ``z`` under `GaussianNoise`.
    interval: the input box ``[N, ...]`` (for noise, of the noise-free input).
    distribution: `GaussianLinear` (the last layer's weights) or `GaussianNoise` (the
      input's).
    steps: Adam steps on the multipliers (0: the bound at zero multipliers).
    lr: Adam's learning rate.
    grid: cells per axis of the last, two-dimensional maximisation (>= 1).
    chunk_size: rows per backward pass of CROWN's boxes.

  Returns:
    ``[N, C]`` float32 upper bounds, each at most 1, valid for the real-valued
    network whatever the optimiser reached.

  Raises:
    InputError: for a distribution without closed-form moments here, shapes that do not
      match, a network that is not affine maps and ReLUs (naming the operation),
      ``steps < 0``, ``grid < 1`` or a non-positive ``lr``.
  """
  if not isinstance(distribution, (GaussianLinear, GaussianNoise)):
    raise InputError(f"functional_lagrangian needs a distribution with closed-form moments: "
                     f"GaussianLinear (a Bayesian last layer) or GaussianNoise (input noise); "
                     f"got {type(distribution).__name__}")
  if not isinstance(interval, Interval):
    raise InputError(f"expected an Interval of inputs [N, ...], got {type(interval).__name__}")
  if not (np.all(np.isfinite(interval.lower)) and np.all(np.isfinite(interval.upper))):
    raise InputError("functional_lagrangian needs a finite input box: its lower or upper "
                     "ends have infinite or NaN entries")
  if steps < 0:
    raise InputError(f"steps must be at least 0, got {steps}")
  if grid < 1:
    raise InputError(f"grid must be at least 1, got {grid}")
  if not (lr > 0 and math.isfinite(lr)):
    raise InputError(f"lr must be finite and > 0, got {lr}")
  box, tail, layer, pad = interval, 0.0, None, 0.0
  if isinstance(distribution, GaussianNoise):
    distribution.check()
    pad = distribution.truncation * distribution.std
    box = Interval(interval.lower - pad, interval.upper + pad)
    noise = int(np.prod(interval.lower.shape[1:]))
    tail = min(1.0, noise * math.erfc(distribution.truncation / math.sqrt(2)) * (1 + 1e-6))
  out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype)).shape
  if len(out_shape) != 2:
    raise InputError(f"functional_lagrangian needs fn's output [N, H], got {out_shape}")
  features = out_shape[1]
  if isinstance(distribution, GaussianLinear):
    distribution.check(features)
    layer = distribution
    classes = np.shape(layer.mean_w)[1]
  else:
    classes = features
    if classes < 2:
      raise InputError(f"functional_lagrangian needs at least 2 logits, got {classes}")
  gaussian = layer is not None
  eps = probit_gap() if gaussian else 0.0
  best = _optimised_multipliers(fn, box.lower, box.upper, interval.lower, interval.upper,
                                _Layer.of(layer, classes, box.dtype), grid, gaussian, eps, steps,
                                lr, chunk_size)
  with jax.enable_x64(True):
    f64 = jnp.float64
    # The final evaluation's boxes are CROWN's in float64 (float32's could be off by its
    # rounding), the noise's widening included.
    clean = Interval(interval.lower.astype(f64), interval.upper.astype(f64))
    box64 = Interval(clean.lower - pad, clean.upper + pad)
    upper = _certified_values(fn, box64, clean, chunk_size, _Layer.of(layer, classes, f64), best,
                              grid, gaussian, eps)
  upper = np.minimum(upper, 1.0)
  upper = np.minimum(upper + tail * (1.0 - upper), 1.0)
  return jnp.asarray(np.minimum(round_up(upper.T), np.float32(1.0)))


def entropy_lower_bound(upper: jax.typing.ArrayLike) -> jax.Array:
  """A lower bound ``[N]`` of the predictive distribution's entropy (nats) from upper bounds
  ``[N, C]`` of its probabilities: ``H(p) >= -log max_c p_c``."""
  upper = np.asarray(upper, np.float64)
  value = -np.log(np.minimum(upper.max(axis=-1), 1.0))
  return jnp.asarray(np.maximum(round_down(value), 0.0))

"""SDP-FO: the first-order dual of the SDP relaxation of a ReLU network (Dathathri et al. 2020).

The network is read from its graph as affine maps between ReLUs,
``x_{k+1} = max(A_k(x_k), c_k)``, the output ``A_m(x_m)``. Every activation gets
the box CROWN's intermediate bounds give it, and the relaxation of Raghunathan
et al. 2018 keeps, for each ReLU, ``x_{k+1} >= c_k``, ``x_{k+1} >= A_k(x_k)`` and
``(x_{k+1} - c_k) * (x_{k+1} - A_k(x_k)) = 0``, and for every activation its box
``(x - l) * (u - x) >= 0``; the triangle relaxation's chord ``x_{k+1} <= s A_k(x_k) + t``
joins them as a linear cut (Batten et al. 2021), so the relaxation is at least as tight
as the LP's. With multipliers ``lam`` for these, the Lagrangian in
the box's coordinates ``x = a + r * z``, ``z`` in ``[-1, 1]^n``, is a quadratic
``c(lam) + g(lam)' z + z' H(lam) z / 2``, and for every ``kappa >= 0``

    max_z  L(z) <= c(lam) + 1/2 sum_i max(0, kappa_i - min(0, lambda_min(diag(kappa) - M(lam)))),

``M = [[0, g'], [g, H]]``: the dual objective, minimised over ``lam`` and ``kappa``
by Adam with ``lambda_min`` from a Lanczos iteration on matrix-vector products
(``H v`` is a difference of two gradients of the Lagrangian, never a dense
matrix): memory linear in the network's size, batched over examples and
specification rows, jitted. The multipliers start where the linear bound is
(``init``): alpha-CROWN's slopes give the linear constraints' multipliers layer by
layer backward, with which the dual is exactly alpha-CROWN's bound, and the
quadratic constraints' multipliers start at 0 (Dathathri et al. start from zero
multipliers, the box bound of the last layer: ``init="box"``).

Lanczos's estimate lies above the smallest eigenvalue, so the bound `sdp_fo`
returns is not the optimiser's: at the last iterate the dual is evaluated again
in float64, the smallest eigenvalue of the float64 matrix computed by a full
symmetric eigendecomposition less its backward-error margin, plus 1e-9 of the
absolute sums the Lagrangian adds up (every map's intermediate ones included, so
sums cancelled inside one stay in the margin), and the result rounded outwards
to float32: a valid bound whatever the iterate. That final
evaluation builds the matrix over the variables the box does not fix (a stable
inactive ReLU's output and a pixel pinned by ``[0, 1]`` are constants of the
Lagrangian: they enter neither the matrix nor the dual's sum, here or in the
optimiser), so problems of more than ``max_dense`` of them are refused; the
optimiser itself has no such limit. The returned bound is never looser than CROWN's (nor
alpha-CROWN's, with the default ``init``) on the same rows (the larger is returned, all
sound), and like every bound
here it is the real-valued network's: `verify.certify` adds the rounding
allowance of its float32 evaluation.

References:
  Dathathri et al., "Enabling certification of verification-agnostic networks via
  memory-efficient semidefinite programming", NeurIPS 2020.
  Raghunathan et al., "Semidefinite relaxations for certifying robustness to adversarial
  examples", NeurIPS 2018.
  Batten et al., "Efficient Neural Network Verification via Layer-based Semidefinite
  Relaxations and Linear Cuts", IJCAI 2021.
  Salman et al., "A Convex Relaxation Barrier to Tight Robustness Verification of Neural
  Networks", NeurIPS 2019 (the linear relaxation's multipliers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robustlib import compilation
from robustlib.checks import InputError
from verify import primitives
from verify.alpha_crown import alpha_crown
from verify.alpha_crown import optimise as optimise_slopes
from verify.alpha_crown import relu_nodes
from verify.crown import _prepare, intermediate_bounds, lower_bounds
from verify.graph import Node, ancestors
from verify.ibp import ibp_node
from verify.interval import Interval, round_up

# Where the optimiser's multipliers start (see `sdp_fo`'s ``init``).
INITS = ("alpha_crown", "crown", "box")

# Kinds of the nodes an affine map between ReLUs may contain.
_AFFINE = ("linear", "affine", "identity")


@dataclasses.dataclass(frozen=True)
class _Network:
  """A ReLU network as affine maps between ReLUs.

  Attributes:
    maps: ``maps[k](x_k) -> A_k(x_k)``: the input of ReLU ``k + 1`` (``k < m``), and the
      output for ``k = m``; arrays ``[N, ...]``.
    thresholds: ``c_k`` of each ReLU ``max(., c_k)``, broadcast to its shape ``[N, ...]``.
    boxes: boxes of ``x_0`` (the input) to ``x_m`` (the last ReLU's output).
    inputs: boxes of each ReLU's input ``A_k(x_k)``.
  """
  maps: tuple[Callable, ...]
  thresholds: tuple[jax.Array, ...]
  boxes: tuple[Interval, ...]
  inputs: tuple[Interval, ...]


def _widen(value, dtype):
  return value.astype(dtype) if hasattr(value, "dtype") and jnp.issubdtype(
      value.dtype, jnp.floating) else value


def _apply(node: Node, args: list, dtype) -> jax.Array:
  """``node`` applied to ``args`` (its bounded operands) in ``dtype``: constants and
  result types widened when ``dtype`` is float64."""
  if dtype == jnp.float32:
    return node.apply_bounded(*args)
  ins = list(node.inputs)
  for pos, val in zip(node.bounded_inputs, args):
    ins[pos] = val
  ins = [_widen(jnp.asarray(v), dtype) for v in ins]
  params = dict(node.params)
  for key in ("preferred_element_type", "new_dtype"):
    if params.get(key) is not None and jnp.issubdtype(params[key], jnp.floating):
      params[key] = jnp.dtype(dtype)
  out = primitives.bind(node.primitive, *ins, **params)
  return out[node.out_index] if node.out_index is not None else out


def _affine_map(source: Node, target: Node, method: str) -> Callable:
  """``v -> target`` with ``source`` set to ``v``: the nodes between must be affine and
  depend on ``source`` alone (``method`` names the caller in errors)."""
  path = [n for n in ancestors(target) if n.index > source.index]
  for n in path:
    if primitives.kind(n) not in _AFFINE:
      raise InputError(f"{method} bounds networks of affine maps and ReLUs; {n.describe()} is "
                       "neither")
    for a in n.inputs:
      if isinstance(a, Node) and a.index < source.index:
        raise InputError(f"{method} needs each layer to depend on the previous ReLU only; "
                         f"{n.describe()} also reads an earlier value (a skip connection)")
      if isinstance(a, Node) and a.index == source.index:
        continue
      if isinstance(a, Node) and a not in path:
        raise InputError(f"{method} needs each layer to depend on the previous ReLU only; "
                         f"{n.describe()} reads {a.describe()}")

  def apply(v, dtype=jnp.float32):
    vals = {source.index: v}
    for n in path:
      vals[n.index] = _apply(n, [vals[a.index] for a in n.inputs if isinstance(a, Node)], dtype)
    return vals[target.index]

  def reach(big: jax.Array) -> jax.Array:
    """An upper bound, up to float32 rounding, of the absolute sums the map adds up over
    ``[-big, big]``, times its number of operations (each rounds once, and every error
    reaches the output through at most these sums): interval arithmetic node by node over
    the symmetric hull of each node's interval, so no intermediate sum is hidden by a
    later cancellation."""
    hull = lambda m: Interval(-m, m)
    vals = {source.index: hull(big.astype(jnp.float32) * (1 + 1e-6))}
    for n in path:
      out = ibp_node(n, [vals[a.index] if isinstance(a, Node) else a for a in n.inputs])
      vals[n.index] = hull(jnp.maximum(jnp.abs(out.lower), jnp.abs(out.upper)) * (1 + 1e-6))
    return vals[target.index].upper * max(len(path), 1)

  apply.reach = reach
  return apply


def map_reach(f: Callable, box: Interval) -> jax.Array:
  """The absolute sums an affine map of `layered_network` adds up over ``box``, every
  intermediate one included, times its operation count (``|b| + |W| m`` for one dense
  layer, ``m`` the box's largest magnitudes): in the box's dtype, what a float64
  evaluation's rounding is relative to."""
  big = jnp.maximum(jnp.abs(box.lower), jnp.abs(box.upper))
  return f.reach(big).astype(box.lower.dtype)


def layered_network(fn: Callable,
                    interval: Interval,
                    spec=None,
                    chunk_size: int | None = None,
                    method: str = "sdp_fo",
                    crown_boxes: bool = True) -> tuple[_Network, jax.Array | None]:
  """The network's layers and CROWN's boxes of their activations, and the checked ``spec``
  (``None`` if none is given); ``method`` names the caller in errors. Without
  ``crown_boxes`` the boxes are the input's alone and ``inputs`` is empty (for callers
  that bound the layers themselves)."""
  graph, boxes, out, _, spec = _prepare(fn, interval, spec)
  if not isinstance(out, Node):
    raise InputError(f"{method} needs an output that depends on the input")
  relus = [
      n for n in ancestors(out) if n.primitive is not None and primitives.kind(n) not in _AFFINE
  ]
  for n in relus:
    if not primitives.is_max_relu(n):
      raise InputError(f"{method} bounds networks of affine maps and ReLUs; {n.describe()} is "
                       "neither")
  bounds = intermediate_bounds(graph, boxes, "crown", chunk_size) if crown_boxes else None
  sources = [graph.inputs[0]] + relus
  maps, thresholds, pres, act = [], [], [], [Interval(boxes[0].lower, boxes[0].upper)]
  for k, r in enumerate(relus):
    pre = r.inputs[r.bounded_inputs[0]]
    maps.append(_affine_map(sources[k], pre, method))
    # In the ReLU's own dtype: read in a narrower box dtype, 0.3 would become another number.
    _, c = primitives.relu_threshold(r, r.dtype)
    thresholds.append(c)
    if bounds is None:
      continue
    b = bounds[pre.index]
    pres.append(b)
    act.append(Interval(jnp.maximum(b.lower, c), jnp.maximum(b.upper, c)))
  maps.append(_affine_map(sources[-1], out, method))
  return _Network(tuple(maps), tuple(thresholds), tuple(act), tuple(pres)), spec


# ----------------------------------------------------------------------------------------------
# The Lagrangian and the dual objective, for a batch of examples (leading axis N) and one
# specification row.


def _vdot(a, b) -> jax.Array:
  """Per-example inner product of two pytrees of ``[N, ...]`` arrays: ``[N]``."""
  terms = jax.tree_util.tree_map(lambda u, v: jnp.sum(u * v, axis=tuple(range(1, u.ndim))), a, b)
  return sum(jax.tree_util.tree_leaves(terms))


def _lagrangian(net: _Network, row, duals, xs, dtype):
  """``L(x)`` ``[N]``: ``-row . out(x_m)`` plus the multiplied constraints."""
  m = len(net.thresholds)
  out = net.maps[m](xs[m], dtype)
  val = -jnp.sum(row.astype(dtype) * out.reshape(out.shape[0], -1), axis=1)
  for k in range(m):
    x, pre = xs[k + 1], net.maps[k](xs[k], dtype)
    y = x - net.thresholds[k].astype(dtype)
    val += _vdot(duals["above_threshold"][k], y) + _vdot(duals["above_input"][k], x - pre)
    val += _vdot(duals["complementary"][k], y * (x - pre))
    slope, offset = _chord(net, k, dtype)
    val += _vdot(duals["below_chord"][k], slope * pre + offset - x)
    lo, hi = net.inputs[k].lower.astype(dtype), net.inputs[k].upper.astype(dtype)
    val += _vdot(duals["input_in_box"][k], (pre - lo) * (hi - pre))
  for k in range(m + 1):
    lo, hi = net.boxes[k].lower.astype(dtype), net.boxes[k].upper.astype(dtype)
    val += _vdot(duals["in_box"][k], (xs[k] - lo) * (hi - xs[k]))
  return val


def _chord(net: _Network, k: int, dtype):
  """``(s, t)`` ``[N, ...]`` of the upper line ``x_{k+1} <= s A_k(x_k) + t`` of ReLU ``k``
  over its input's box: the chord of an unstable one (Batten et al. 2021 add this linear
  cut of the LP to the SDP), ``x <= A_k(x_k)`` of an active one, ``x <= c`` of an inactive
  one. The chord's offset is raised by a few roundings of its terms, so the line computed
  in ``dtype`` lies above ``max(z, c)`` at both ends of ``[l, u]`` (hence on all of it)."""
  lo, hi = net.inputs[k].lower.astype(dtype), net.inputs[k].upper.astype(dtype)
  c = net.thresholds[k].astype(dtype)
  unstable, active = (lo < c) & (hi > c), lo >= c
  slope = jnp.where(unstable, (hi - c) / jnp.where(unstable, hi - lo, 1.0), active.astype(dtype))
  ends = jnp.maximum(c - slope * lo, hi - slope * hi)
  slack = 4 * jnp.finfo(dtype).eps * (jnp.abs(c) + jnp.abs(hi) + jnp.abs(slope) *
                                      (jnp.abs(lo) + jnp.abs(hi)))
  offset = jnp.where(unstable, ends + slack, jnp.where(active, 0.0, c))
  return slope, offset


def _quadratic(net: _Network, row, duals, dtype, forward_hessian: bool = False):
  """``(c [N], g, Hv)`` of the Lagrangian in the box's coordinates ``z``: ``g`` a list of
  ``[N, ...]`` arrays like the boxes, ``Hv`` a function of such a list. ``Hv`` is a difference
  of two gradients (one gradient's cost), or with ``forward_hessian`` the forward-mode
  derivative of the gradient, whose rounding is relative to the Hessian's own terms rather
  than to the gradient's (what the sound evaluation needs)."""
  # In ``dtype`` from the ends: in float64 the box ``a +- r`` is the float32 one up to a
  # rounding of its ends (within the magnitude margin of `_certified_value`).
  ends = [(b.lower.astype(dtype), b.upper.astype(dtype)) for b in net.boxes]
  centre = [(lo + hi) / 2 for lo, hi in ends]
  radius = [(hi - lo) / 2 for lo, hi in ends]

  def transformed(z):
    return _lagrangian(net, row, duals, [a + r * v for a, r, v in zip(centre, radius, z)], dtype)

  zeros = [jnp.zeros_like(a) for a in centre]
  grad = jax.grad(lambda z: jnp.sum(transformed(z)))
  c, g = transformed(zeros), grad(zeros)

  def hv(v):
    if forward_hessian:
      return jax.jvp(grad, (zeros,), (v,))[1]
    return jax.tree_util.tree_map(jnp.subtract, grad(v), g)

  return c, g, hv


def _operator(g, hv, kappa):
  """``w -> (diag(kappa) - M) w`` on ``w = (w0 [N], z-like list)``."""

  def apply(w):
    w0, wz = w
    k0, kz = kappa
    mw0 = _vdot(g, wz)
    hw = hv(wz)
    mwz = [h + w0.reshape((-1,) + (1,) * (gi.ndim - 1)) * gi for h, gi in zip(hw, g)]
    return (k0 * w0 - mw0, [k * a - b for k, a, b in zip(kz, wz, mwz)])

  return apply


def _flatten(w) -> jax.Array:
  w0, wz = w
  return jnp.concatenate([w0[:, None]] + [a.reshape(a.shape[0], -1) for a in wz], axis=1)


def _unflatten(flat, like):
  _, wz = like
  out, at = [], 1
  for a in wz:
    size = math.prod(a.shape[1:])
    out.append(flat[:, at:at + size].reshape(a.shape))
    at += size
  return flat[:, 0], out


def lanczos_min(matvec: Callable, start: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
  """Smallest Ritz value and vector of a batch of symmetric operators (Lanczos, with full
  reorthogonalisation).

  Args:
    matvec: ``[N, n] -> [N, n]``, one symmetric operator per row.
    start: ``[N, n]`` starting vectors (nonzero).
    iterations: Krylov dimension ``k >= 1`` (at most ``n`` is useful).

  Returns:
    ``([N], [N, n])``: the smallest Ritz value of each operator, an upper estimate of its
    smallest eigenvalue, and its unit Ritz vector.
  """
  if iterations < 1:
    raise InputError(f"Lanczos iterations must be at least 1, got {iterations}")
  n_rows, n = start.shape
  k = iterations
  q = start / jnp.linalg.norm(start, axis=1, keepdims=True)
  basis = jnp.zeros((k, n_rows, n), start.dtype)
  alphas = jnp.zeros((k, n_rows), start.dtype)
  betas = jnp.zeros((k, n_rows), start.dtype)
  alive = jnp.ones((k, n_rows), bool)
  eps = jnp.finfo(start.dtype).eps

  def step(j, carry):
    basis, alphas, betas, alive, q, q_prev, beta, live = carry
    basis = basis.at[j].set(q)
    w = matvec(q)
    scale = jnp.linalg.norm(w, axis=1)
    alpha = jnp.sum(w * q, axis=1)
    w = w - alpha[:, None] * q - beta[:, None] * q_prev
    # Full reorthogonalisation against the vectors so far (twice is enough).
    for _ in range(2):
      w = w - jnp.einsum("kn,knd->nd", jnp.einsum("knd,nd->kn", basis, w), basis)
    b = jnp.linalg.norm(w, axis=1)
    # An invariant subspace found: the rest of the rows' steps are ignored.
    more = live & (b > 64 * eps * jnp.maximum(scale, jnp.abs(alpha)))
    q_next = jnp.where(more[:, None], w / jnp.where(more, b, 1.0)[:, None], 0.0)
    b = jnp.where(more, b, 0.0)
    return (basis, alphas.at[j].set(alpha), betas.at[j].set(b), alive.at[j].set(live), q_next, q, b,
            more)

  carry = (basis, alphas, betas, alive, q, jnp.zeros_like(q), jnp.zeros(
      (n_rows,), start.dtype), jnp.ones((n_rows,), bool))
  basis, alphas, betas, alive, *_ = jax.lax.fori_loop(0, k, step, carry)
  # Steps after a breakdown get a diagonal above every Ritz value (Gershgorin), decoupled.
  top = jnp.max(jnp.abs(alphas), axis=0) + 2 * jnp.max(betas, axis=0) + 1.0
  diag = jnp.where(alive, alphas, top[None]).T
  off = betas.T[:, :-1]
  t = jax.vmap(jnp.diag)(diag) + jax.vmap(lambda b: jnp.diag(b, 1))(off) + jax.vmap(
      lambda b: jnp.diag(b, -1))(off)
  evals, evecs = jnp.linalg.eigh(t)
  vec = jnp.einsum("knd,nk->nd", basis, evecs[:, :, 0])
  vec = vec / jnp.maximum(jnp.linalg.norm(vec, axis=1, keepdims=True), jnp.finfo(vec.dtype).tiny)
  return evals[:, 0], vec


def _free(net: _Network) -> list[jax.Array]:
  """Per activation, whether its box leaves it free (``l < u``), ``[N, ...]`` bools: a fixed
  one (a stable inactive ReLU's output, a pixel pinned by the input box) is a constant of the
  Lagrangian, its row and column of ``M`` zero."""
  return [b.upper > b.lower for b in net.boxes]


def _dual_value(c, kappa, lam_min, free):
  """``c + 1/2 sum_i max(0, kappa_i - min(0, lam_min))`` over the homogenising coordinate and
  the ``free`` activations, ``[N]``: the Lagrangian does not depend on the fixed ones, so the
  bound over the free ones holds, and ``lam_min`` of a matrix that holds the fixed ones too
  (decoupled, ``kappa_i >= 0`` on their diagonal) is at most the free block's."""
  neg = jnp.minimum(lam_min, 0.0)
  k0, kz = kappa
  total = jax.nn.relu(k0 - neg)
  for k, f in zip(kz, free):
    total += jnp.sum(jnp.where(f, jax.nn.relu(k - neg.reshape((-1,) + (1,) * (k.ndim - 1))), 0.0),
                     axis=tuple(range(1, k.ndim)))
  return c + 0.5 * total


def _project(duals):
  """Multipliers of inequalities and kappa at least 0; the complementarity one free."""
  return {
      name: (v if name == "complementary" else jax.tree_util.tree_map(jax.nn.relu, v))
      for name, v in duals.items()
  }


def _initial_duals(net: _Network, row, slopes=None):
  """The starting multipliers, and the kappa that makes ``diag(kappa) - M`` diagonally
  dominant (``kappa_0 = sum |g|``, ``kappa_i = |g_i|``), with which the dual is the box bound
  of the Lagrangian's linear part.

  Without ``slopes`` the multipliers are 0: the dual is the box bound of the last layer.
  With ``slopes`` (a lower slope per ReLU, ``[N, ...]`` each) they are the linear
  relaxation's, built backward as CROWN's bound is (Salman et al. 2019): a neuron whose
  coefficient ``w`` is positive takes its upper line (``below_chord = w``), a negative one the
  lower line of slope ``a``, the convex combination of ``x >= A(x)`` and ``x >= c``
  (``above_input = -a w``, ``above_threshold = -(1 - a) w``); every activation but the input
  is then multiplied away and the dual is exactly CROWN's bound with those slopes."""
  m = len(net.thresholds)
  zeros = lambda k: jnp.zeros_like(net.boxes[k].lower)
  duals = {
      "above_threshold": [zeros(k + 1) for k in range(m)],
      "above_input": [zeros(k + 1) for k in range(m)],
      "below_chord": [zeros(k + 1) for k in range(m)],
      "complementary": [zeros(k + 1) for k in range(m)],
      "input_in_box": [zeros(k + 1) for k in range(m)],
      "in_box": [zeros(k) for k in range(m + 1)],
  }
  if slopes is not None:
    transpose = lambda k, v: jax.vjp(net.maps[k], jnp.zeros_like(net.boxes[k].lower))[1](v)[0]
    out = jax.eval_shape(net.maps[m], net.boxes[m].lower)
    w = transpose(m, -row.astype(out.dtype).reshape(out.shape))  # on x_m
    for k in range(m - 1, -1, -1):
      lo, hi, c = net.inputs[k].lower, net.inputs[k].upper, net.thresholds[k]
      unstable, active = (lo < c) & (hi > c), lo >= c
      pos, neg = jax.nn.relu(w), jax.nn.relu(-w)
      a = jnp.where(unstable, jnp.clip(slopes[k], 0.0, 1.0), 1.0)
      live = unstable | active  # an inactive output is fixed at c: its box bounds it exactly
      duals["below_chord"][k] = jnp.where(live, pos, 0.0)
      duals["above_input"][k] = jnp.where(live, a * neg, 0.0)
      duals["above_threshold"][k] = jnp.where(unstable, (1 - a) * neg, 0.0)
      slope, _ = _chord(net, k, w.dtype)
      w = transpose(k, duals["below_chord"][k] * slope - duals["above_input"][k])
  _, g, _ = _quadratic(net, row, duals, jnp.float32)
  absg = [jnp.abs(a) for a in g]
  k0 = sum(jnp.sum(a, axis=tuple(range(1, a.ndim))) for a in absg)
  duals["kappa"] = (k0, absg)
  return duals


def _objective(net, row, duals, key, iterations):
  """The dual objective ``[N]`` at feasible ``duals`` (Lanczos's eigenvalue estimate)."""
  c, g, hv = _quadratic(net, row, {k: v for k, v in duals.items() if k != "kappa"}, jnp.float32)
  op = _operator(g, hv, duals["kappa"])
  like = (c, g)
  flat = lambda v: _flatten(op(_unflatten(v, like)))
  start = jax.random.normal(key, (c.shape[0], 1 + sum(math.prod(a.shape[1:]) for a in g)))
  _, vec = lanczos_min(flat, start, iterations)
  vec = jax.lax.stop_gradient(vec)
  lam = jnp.sum(vec * flat(vec), axis=1)  # Rayleigh quotient: a subgradient w.r.t. the duals
  return _dual_value(c, duals["kappa"], lam, _free(net))


def _optimise(net, rows, key, steps, iterations, lr, slopes=None):
  """Adam (learning rate decayed to 0 by a cosine) on the dual variables of every row, from
  `_initial_duals` (``slopes``: ``[S]``-stacked, or None): each example's best iterate,
  ``[S]``-stacked, and the objectives ``[S, steps, N]``."""

  def one(row, key, slopes):
    duals = _initial_duals(net, row, slopes)
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
    objective = lambda d, k: _objective(net, row, d, k, iterations)

    def step(carry, key):
      duals, state, best, best_value = carry

      def total(d):
        values = objective(d, key)
        return jnp.sum(values), values

      (_, per_example), grads = jax.value_and_grad(total, has_aux=True)(duals)
      better = per_example < best_value
      best = jax.tree_util.tree_map(
          lambda b, d: jnp.where(better.reshape((-1,) + (1,) * (d.ndim - 1)), d, b), best, duals)
      updates, state = opt.update(grads, state, duals)
      duals = _project(optax.apply_updates(duals, updates))
      return (duals, state, best, jnp.minimum(best_value, per_example)), per_example

    start = (duals, opt.init(duals), duals, jnp.full(row.shape[:1], jnp.inf, row.dtype))
    (_, _, best, _), values = jax.lax.scan(step, start, jax.random.split(key, steps))
    return best, values

  keys = jax.random.split(key, rows.shape[0])
  return jax.vmap(one)(rows, keys, slopes)


def _linear_slopes(fn, interval: Interval, rows, steps: int, chunk_size):
  """alpha-CROWN's lower slopes of every ReLU for each row (CROWN's for ``steps = 0``):
  ``[S, N, ...]`` per ReLU, in order."""
  graph, boxes, out, _, _ = _prepare(fn, interval, None)
  bounds = intermediate_bounds(graph, boxes, "crown", chunk_size)
  _, params = optimise_slopes(out, rows.astype(interval.dtype), bounds, steps, 0.1)
  return [params["alpha"][str(n.index)] for n in relu_nodes(out)]


@compilation.jit(static_argnames=("fn", "steps", "iterations", "lr", "chunk_size", "init",
                                  "init_steps"))
def _optimised_duals(fn, lower, upper, rows, key, steps, iterations, lr, chunk_size, init,
                     init_steps):
  """`_optimise` on ``fn``'s layers from the ``init`` multipliers, compiled once per
  function and shapes."""
  interval = Interval(lower, upper)
  net, _ = layered_network(fn, interval, None, chunk_size)
  slopes = None
  if init != "box":
    slopes = _linear_slopes(fn, interval, rows, init_steps if init == "alpha_crown" else 0,
                            chunk_size)
  return _optimise(net, rows, key, steps, iterations, lr, slopes)[0]


# The float64 evaluation's margin, relative to the absolute sums the Lagrangian adds up
# (`_magnitude`): sums of fewer than _MAX_TERMS terms err by less than 1.2e-10 of theirs.
_SLACK = 1e-9
_MAX_TERMS = 10**6


def _exact64(net: _Network) -> _Network:
  """``net`` with its boxes and thresholds in float64, converted by numpy: exactly (XLA's
  conversion on a CPU flushes float32 subnormals to 0, which moves a box's ends or a ReLU's
  threshold). Call under ``jax.enable_x64``."""
  f64 = lambda v: jnp.asarray(np.asarray(v, np.float64))
  box = lambda b: Interval(f64(b.lower), f64(b.upper))
  return _Network(net.maps, tuple(f64(c) for c in net.thresholds), tuple(box(b) for b in net.boxes),
                  tuple(box(b) for b in net.inputs))


def _magnitude(net: _Network, net32: _Network, row, duals, dtype) -> jax.Array:
  """An upper bound ``[N]`` of the absolute sums the Lagrangian adds up anywhere in its box,
  every intermediate one included: each term's multiplier times the magnitudes of its factors
  (a map's by its node-by-node reach, `map_reach`, over ``net32``'s boxes, the float32
  ``net`` they were read from). It bounds the Lagrangian's constant term's terms, and half
  the absolute sums of its gradient's (``sum_i r_i |d/dx_i|`` of a product of two factors is at
  most twice the product of their magnitudes, as ``r <= max(|l|, |u|)``) and of its Hessian's
  entries: what their rounding is relative to."""
  big = lambda b: jnp.maximum(jnp.abs(b.lower), jnp.abs(b.upper)).astype(dtype)
  absd = {k: [jnp.abs(v.astype(dtype)) for v in duals[k]] for k in duals if k != "kappa"}
  m = len(net.thresholds)
  reach = [map_reach(net32.maps[k], net32.boxes[k]).astype(dtype) for k in range(m + 1)]
  out = reach[m].reshape(reach[m].shape[0], -1)
  total = jnp.sum(jnp.abs(row.astype(dtype)).reshape(out.shape[0], -1) * out, axis=1)
  for k in range(m):
    x, p, c = big(net.boxes[k + 1]), reach[k], jnp.abs(net.thresholds[k].astype(dtype))
    lo, hi = (jnp.abs(v.astype(dtype)) for v in (net.inputs[k].lower, net.inputs[k].upper))
    slope, offset = _chord(net, k, dtype)
    total += _vdot(absd["above_threshold"][k], x + c) + _vdot(absd["above_input"][k], x + p)
    total += _vdot(absd["complementary"][k], (x + c) * (x + p))
    total += _vdot(absd["below_chord"][k], jnp.abs(slope) * p + jnp.abs(offset) + x)
    total += _vdot(absd["input_in_box"][k], (p + lo) * (hi + p))
  for k in range(m + 1):
    b = net.boxes[k]
    x, lo, hi = big(b), jnp.abs(b.lower.astype(dtype)), jnp.abs(b.upper.astype(dtype))
    total += _vdot(absd["in_box"][k], (x + lo) * (hi + x))
  return total


def _certified_value(net: _Network, row, duals, max_dense: int) -> np.ndarray:
  """The dual objective at ``duals`` evaluated soundly: an upper bound ``[N]`` (float32) of
  ``max -row . out`` over the relaxation, ``+inf`` where a multiplier or a term is not finite.

  In float64: the Lagrangian's quadratic ``c + g' z + z' H z / 2`` (``H`` by forward-mode
  derivatives of the gradient), the smallest eigenvalue of the dense ``diag(kappa) - M`` less
  its backward-error margin, and the dual objective at it; then ``1e-9`` of the absolute sums
  of the terms added up: ``|Delta c| + sum |Delta g| + sum |Delta H| / 2``, by which the computed
  quadratic may miss the Lagrangian anywhere in the box, is below ``2.4e-10`` of four times
  `_magnitude` (sums of fewer than a million terms), and the dual value's own sum below
  that of its kappa part. Rounded up to float32."""
  sizes = [math.prod(b.lower.shape[1:]) for b in net.boxes]
  if max(sizes) >= _MAX_TERMS:
    raise InputError(f"sdp_fo's sound evaluation covers sums of fewer than {_MAX_TERMS} terms; "
                     f"a layer here has {max(sizes)} values per example")
  net32 = net
  with jax.enable_x64(True):
    f64 = jnp.float64
    net = _exact64(net32)
    duals = jax.tree_util.tree_map(lambda v: jnp.asarray(v, f64), _project(duals))
    row = jnp.asarray(row, f64)
    multipliers = {k: v for k, v in duals.items() if k != "kappa"}
    c, g, hv = _quadratic(net, row, multipliers, f64, forward_hessian=True)
    # A variable of zero radius (a stable ReLU, a pixel fixed by the box) has a row of A that
    # is kappa_i e_i: it decouples, and only the others enter the dense matrix.
    radius = _flatten((jnp.ones_like(c), [b.upper - b.lower for b in net.boxes]))
    free = np.flatnonzero(np.any(np.asarray(radius) > 0, axis=0))
    n = free.size
    if n > max_dense:
      raise InputError(f"sdp_fo's sound evaluation builds the {n} x {n} matrix of one example's "
                       f"unfixed variables; at most max_dense={max_dense}")
    op = _operator(g, hv, duals["kappa"])
    like = (c, g)
    batch, total = radius.shape
    index = jnp.asarray(free)

    def column(j):
      e = jnp.zeros((batch, total), f64).at[:, j].set(1.0)
      return _flatten(op(_unflatten(e, like)))[:, index]

    cols = jax.lax.map(column, index, batch_size=min(n, 256))  # [n, N, n]
    mats = np.asarray(jnp.transpose(cols, (1, 2, 0)))
    mats = (mats + np.swapaxes(mats, 1, 2)) / 2
    kappa = np.asarray(_flatten(duals["kappa"]))
    size = np.asarray(_magnitude(net, net32, row, multipliers, f64))
    finite = (np.isfinite(mats).all(axis=(1, 2)) & np.isfinite(kappa).all(axis=1) &
              np.isfinite(np.asarray(c)) & np.isfinite(size))
    mats = np.where(finite[:, None, None], mats, 0.0)
    values = []
    for kappa_, mats_ in ((kappa, mats), _repaired(kappa, mats, free)):
      # A coordinate fixed in one example only is decoupled: kappa_i >= 0 on the diagonal.
      lam = np.linalg.eigvalsh(mats_)[:, 0]
      margin = 8 * (n + 1) * np.finfo(np.float64).eps * np.linalg.norm(mats_, axis=(1, 2))
      lam = jnp.asarray(lam - margin)
      kappa_ = _unflatten(jnp.asarray(kappa_), (c, g))
      value = np.asarray(_dual_value(c, kappa_, lam, _free(net)))
      scale = np.asarray(_dual_value(jnp.zeros_like(c), kappa_, lam, _free(net))) + 4 * size
      values.append(value + _SLACK * (1 + scale))
    value = np.minimum(*values)  # each a valid bound
  return round_up(np.where(finite & np.isfinite(value), value, np.inf))


def _repaired(kappa: np.ndarray, mats: np.ndarray, free: np.ndarray):
  """``kappa + delta`` ``[N, total]`` and its matrices ``mats + diag(delta)`` ``[N, n, n]``
  (``mats = diag(kappa) - M`` over the coordinates ``free``), with ``delta_i`` the absolute
  row sums of the matrix's negative part ``P = sum_{lambda_j < 0} |lambda_j| v_j v_j'``:
  ``diag(delta) - P`` is diagonally dominant and ``mats + P`` is the positive part, so the
  new matrix is PSD up to rounding and the dual pays ``sum delta_i / 2``, where the uniform
  shift by ``|lambda_min|`` pays ``n |lambda_min| / 2`` (much more when the negative
  eigenvectors are localised)."""
  w, v = np.linalg.eigh(mats)
  neg = np.maximum(-w, 0.0)
  negative = np.einsum("nij,nj,nkj->nik", v, neg, v)
  delta = np.abs(negative).sum(axis=2)
  kappa = kappa.copy()
  kappa[:, free] += delta
  index = np.arange(mats.shape[1])
  mats = mats.copy()
  mats[:, index, index] += delta
  return kappa, mats


def sdp_fo(fn: Callable,
           interval: Interval,
           spec: jax.typing.ArrayLike,
           steps: int = 500,
           lanczos_iterations: int = 30,
           lr: float = 0.03,
           key: jax.Array | None = None,
           max_dense: int = 4096,
           chunk_size: int | None = None,
           init: str = "alpha_crown",
           init_steps: int = 20,
           only_below: float | None = None) -> jax.Array:
  """Lower bounds ``[N, S]`` of ``spec @ fn(x)`` over the box by SDP-FO (Dathathri et al. 2020).

  Args:
    fn: ``fn(x [N, ...]) -> [N, K]``, affine maps and ReLUs (``max(., c)``), each layer
      reading the previous ReLU's output only.
    interval: the input box ``[N, ...]``.
    spec: ``[N, S, K]`` rows (`verify.margin_spec` for margins).
    steps: Adam steps on the dual variables.
    lanczos_iterations: Krylov dimension of each smallest-eigenvalue estimate (>= 1).
    lr: Adam's learning rate.
    key: PRNG key of Lanczos's starting vectors (default ``PRNGKey(0)``).
    max_dense: most variables (activations of one example, plus one) whose matrix the
      final, sound evaluation builds.
    chunk_size: rows per backward pass of CROWN's intermediate bounds.
    init: the multipliers the optimiser starts from: ``"alpha_crown"`` (the linear
      relaxation's with alpha-CROWN's slopes after ``init_steps`` steps: the dual starts at
      alpha-CROWN's bound), ``"crown"`` (CROWN's slopes and bound) or ``"box"`` (zero
      multipliers: the box bound of the last layer, as Dathathri et al. start).
    init_steps: alpha-CROWN's steps for ``init="alpha_crown"``.
    only_below: optimise only the rows whose linear bound (CROWN's, or alpha-CROWN's with
      that ``init``) is at most this for some example; the others keep it (`verify.certify`
      passes 0: a row already above 0 is proven). None: every row.

  Returns:
    ``[N, S]`` lower bounds, each the larger of SDP-FO's and CROWN's (and alpha-CROWN's,
    from which ``init="alpha_crown"`` starts), whatever the optimiser reached. Like CROWN's
    they are the real-valued network's up to the rounding of the float32 passes they rest
    on (CROWN's intermediate boxes, the linear bounds): on random programs with weights up to
    800 they exceeded the real minimum by up to 3e-5, against allowances of 1e-3 to 2e-3,
    the allowance `verify.certify` subtracts (`verify.rounding_allowance`, ``"crown"``,
    backward).

  Raises:
    InputError: for a network that is not affine maps and ReLUs (naming the operation),
      a bad spec, ``steps < 0``, ``lanczos_iterations < 1``, a problem larger than
      ``max_dense`` or a layer of a million values or more per example.
  """
  if steps < 0:
    raise InputError(f"steps must be at least 0, got {steps}")
  if lanczos_iterations < 1:
    raise InputError(f"lanczos_iterations must be at least 1, got {lanczos_iterations}")
  if init not in INITS:
    raise InputError(f"init must be one of {INITS}, got {init!r}")
  if isinstance(init_steps, bool) or not isinstance(init_steps, int) or init_steps < 0:
    raise InputError(f"init_steps must be an integer >= 0, got {init_steps!r}")
  if only_below is not None and (isinstance(only_below, bool) or
                                 not isinstance(only_below, (int, float, np.floating))):
    raise InputError(f"only_below must be a number or None, got {only_below!r}")
  if not isinstance(interval, Interval):
    raise InputError(f"expected an Interval of inputs [N, ...], got {type(interval).__name__}")
  key = jax.random.PRNGKey(0) if key is None else key
  if spec is None:
    raise InputError("sdp_fo needs a spec [N, S, K]")
  net, spec = layered_network(fn, interval, spec, chunk_size)
  linear = lower_bounds(fn, interval, spec, "crown", chunk_size)
  if init == "alpha_crown":  # the optimiser's start: never return less
    linear = jnp.maximum(
        linear, alpha_crown(fn, interval, spec, init_steps, chunk_size=chunk_size, lower_only=True))
  linear = np.array(linear)
  todo = np.arange(linear.shape[1])
  if only_below is not None:
    todo = np.flatnonzero(np.any(linear <= only_below, axis=0))
  if not todo.size:
    return jnp.asarray(linear)
  rows = jnp.transpose(jnp.asarray(spec, interval.dtype), (1, 0, 2))[todo]  # [S', N, K]
  duals = _optimised_duals(fn, interval.lower, interval.upper, rows, key, steps, lanczos_iterations,
                           lr, chunk_size, init, init_steps)
  upper = np.stack([
      _certified_value(net, rows[s], jax.tree_util.tree_map(lambda v, s=s: v[s], duals), max_dense)
      for s in range(rows.shape[0])
  ],
                   axis=1)  # [N, S']: upper bounds of -spec . fn
  linear[:, todo] = np.maximum(-upper, linear[:, todo])
  return jnp.asarray(linear)

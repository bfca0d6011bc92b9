"""FAB: the fast adaptive boundary attack, a minimum-norm white-box attack.

Croce and Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020; AutoAttack's FAB-T (Croce and Hein, ICML 2020)
runs its targeted version against the top 9 other classes.

Each iteration linearizes the decision boundary between the true class ``y``
and a class ``t`` at the current iterate, ``z_t - z_y = 0``, and projects both
the iterate and the original point onto that hyperplane intersected with the
box (the paper's box-constrained projection, solved exactly for L-inf, L2 and L1).
The next iterate is a convex combination of the two projections, biased toward
the original point (weight ``alpha <= alpha_max``), each extrapolated by
``eta``; after a success the iterate steps back toward ``x`` by ``beta``.
Restarts start from a random point at half the smallest norm found so far
(capped by ``eps``).

FAB minimizes the perturbation; as an :class:`attacks.core.AttackFn` it returns
per example the smallest adversarial point found when its norm is at most
``eps``, otherwise the best non-adversarial candidate inside the ball (``x``,
the in-ball iterates and the smallest adversarial point projected onto the
ball, ranked by the margin loss).

Example::

  fab_t = attacks.fab(eps=8 / 255)                   # FAB-T, 9 targets
  fab_u = attacks.fab(eps=0.5, norm="l2", num_targets=None)  # untargeted FAB
  x_adv = fab_t(logits_fn, x, y, key)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attacks import core
from robustlib.checks import InputError


def _dual_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-row dual norm of ``[..., D]`` (L1 for L-inf, L2 for L2, L-inf for L1)."""
  if norm == "linf":
    return jnp.sum(jnp.abs(v), axis=-1)
  if norm == "l1":
    return jnp.max(jnp.abs(v), axis=-1)
  return jnp.sqrt(jnp.sum(v * v, axis=-1))


def _project_l1(w: jax.Array, gap: jax.Array, room: jax.Array) -> jax.Array:
  """The L1 case of `project_onto_hyperplane` (``w`` signed so that ``gap >= 0``): the
  sizes ``[N, D]`` of the moves against ``sign(w)``. Every unit of L1 moved along
  coordinate ``i`` gains ``|w_i|``, so the optimum fills the coordinates of largest
  ``|w_i|`` to their room, the ties at the threshold in equal proportion; the threshold is
  found by bisection on the bit patterns of ``|w|`` (non-negative floats order as the
  integers they read as), with no sort."""
  aw = jnp.abs(w)
  bits = jax.lax.bitcast_convert_type(aw.astype(jnp.float32), jnp.int32)
  gain = aw * room

  def reach(level):  # the decrease from filling every coordinate above ``level``
    return jnp.sum(jnp.where(bits > level[:, None], gain, 0.0), axis=1)

  def halve(_, bracket):
    low, high = bracket  # reach(low) >= gap > reach(high)
    mid = low + (high - low) // 2
    enough = reach(mid) >= gap
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

  n = w.shape[0]
  _, level = jax.lax.fori_loop(0, 32, halve, (jnp.full((n,), -1, jnp.int32), jnp.max(bits, axis=1)))
  above = reach(level)
  tied = bits == level[:, None]
  tied_gain = jnp.sum(jnp.where(tied, gain, 0.0), axis=1)
  share = jnp.clip((gap - above) / jnp.maximum(tied_gain, jnp.finfo(w.dtype).tiny), 0.0, 1.0)
  size = jnp.where(bits > level[:, None], room, jnp.where(tied, share[:, None] * room, 0.0))
  size = jnp.where((gap > jnp.sum(gain, axis=1))[:, None], jnp.where(aw > 0, room, 0.0), size)
  return jnp.where((gap > 0)[:, None], size, 0.0)


def project_onto_hyperplane(points: jax.Array, w: jax.Array, b: jax.Array, norm: str,
                            bounds: core.Bounds) -> jax.Array:
  """Minimum-norm step onto ``{z : <w, z> = b}`` inside the box.

  Solves ``min_d ||d||  s.t.  <w, p + d> = b,  lo <= p + d <= hi`` exactly for
  each row (the projection of the FAB paper, Sec. 3.1): the optimal step moves
  every coordinate against ``sign(w)`` by ``min(lam, room)`` (L-inf) or
  ``min(lam * |w|, room)`` (L2), or fills the coordinates of largest ``|w|`` (L1,
  `_project_l1`), with ``room`` the distance to the box face in
  that direction; the Lagrange multiplier ``lam`` is found by bisection on this increasing
  piecewise-linear function, then solved exactly on the bracket's linear piece. When the box does not reach
  the hyperplane, the step goes to the box corner closest to it.

  Args:
    points: ``[N, D]`` points ``p`` inside the box.
    w: ``[N, D]`` normals.
    b: ``[N]`` offsets.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    bounds: the box ``(lo, hi)``.

  Returns:
    ``[N, D]`` the step ``d``.
  """
  lo, hi = bounds
  gap = jnp.sum(w * points, axis=1) - b
  sign = jnp.where(gap >= 0, 1.0, -1.0).astype(w.dtype)
  w = w * sign[:, None]
  gap = gap * sign  # >= 0: <w, p + d> must fall by gap.
  room = jnp.where(w > 0, points - lo, hi - points)
  if norm == "l1":
    return -jnp.sign(w) * jnp.maximum(_project_l1(w, gap, room), 0.0)
  aw = jnp.abs(w)
  moves = aw > (0.0 if norm == "linf" else 1e-12)
  big = jnp.asarray(jnp.finfo(w.dtype).max / 4, w.dtype)
  if norm == "linf":
    slope, knot = aw, room
  else:
    slope, knot = aw * aw, room / jnp.where(moves, aw, 1.0)
  slope = jnp.where(moves, slope, 0.0)
  knot = jnp.where(moves, knot, big)
  # g(lam) = sum_i slope_i * min(lam, knot_i), the decrease of <w, .>, is increasing and
  # piecewise linear: bisection brackets g(lam) = gap (no sort: XLA's CPU sort of a [N, D]
  # array costs ten forward passes), then g is solved on the bracket's linear piece.
  finite = jnp.where(moves, knot, 0.0)
  reach = jnp.sum(slope * finite, axis=1)  # g at the largest knot: every face reached

  def bisect(_, bracket):
    low, high = bracket
    mid = 0.5 * (low + high)
    below = jnp.sum(slope * jnp.minimum(mid[:, None], knot), axis=1) < gap
    return jnp.where(below, mid, low), jnp.where(below, high, mid)

  low, high = jax.lax.fori_loop(0, core.BISECTIONS, bisect,
                                (jnp.zeros_like(gap), jnp.max(finite, axis=1)))
  saturated = jnp.sum(jnp.where(knot <= low[:, None], slope * finite, 0.0), axis=1)
  free = jnp.sum(jnp.where(knot > low[:, None], slope, 0.0), axis=1)
  lam = jnp.clip((gap - saturated) / jnp.maximum(free, jnp.finfo(w.dtype).tiny), low, high)
  lam = jnp.where(gap > reach, big, lam)[:, None]
  if norm == "linf":
    size = jnp.minimum(lam, room)
  else:
    size = jnp.minimum(lam, knot) * aw
  return jnp.where(moves, -jnp.sign(w) * jnp.maximum(size, 0.0), 0.0)


def _check_config(norm, steps, restarts, num_targets, alpha_max, eta, beta):
  core.check_norm(norm, ("linf", "l2", "l1"))
  core.check_positive_int(steps, "steps")
  core.check_positive_int(restarts, "restarts")
  if num_targets is not None:
    core.check_positive_int(num_targets, "num_targets")
  for value, name, ok, what in ((alpha_max, "alpha_max", lambda v: 0.0 <= v <= 1.0,
                                 "[0, 1]"), (eta, "eta", lambda v: v >= 1.0, ">= 1"),
                                (beta, "beta", lambda v: 0.0 < v <= 1.0, "(0, 1]")):
    if isinstance(value, bool) or not np.isscalar(value) or not ok(float(value)):
      raise InputError(f"{name} must be a number in {what}, got {value!r}")


def _run(logits_fn,
         x,
         y,
         key,
         eps,
         target,
         r=None,
         live=None,
         *,
         norm,
         steps,
         restarts,
         num_targets,
         alpha_max,
         eta,
         beta,
         bounds,
         restart_eps):
  """Every run in turn; or, with ``r`` (traced), run ``r`` alone, stopping once every
  example where ``live`` is adversarial inside the ball. With ``eps = inf`` (unbounded,
  the smallest adversarial point) restarts start within ``restart_eps``."""
  n = x.shape[0]
  x0 = x.reshape(n, -1)
  dtype = x.dtype

  fast_fn = core.prepare(logits_fn, x)

  def logits_flat(z):
    return fast_fn(z.reshape(x.shape))

  clean = logits_flat(x0)
  num_classes = clean.shape[1]
  # The calling convention: target only for attacks built with targeted=True.
  success_target = target
  classes = jnp.arange(num_classes)
  if target is not None:
    mode, runs_per_restart = "given", 1
  elif num_targets is None:
    mode, runs_per_restart = "all", 1
  else:
    mode = "top"
    top_targets = core.top_targets(clean, y, num_targets)
    runs_per_restart = top_targets.shape[1]

  def linearize(z, t):
    """``df [N]``, ``dg [N, D]``: ``z_t - z_j`` at ``z`` and its gradient.

    FAB-T (mode "top") takes ``j = y``, as AutoAttack does. With a given target
    ``j`` is the strongest class other than ``t`` at ``z``: being classified as
    ``t`` means beating that class, which near ``x`` is ``y``. Untargeted FAB
    (mode "all") takes ``t`` with the closest linearized boundary and ``j = y``.
    """
    logits, vjp = jax.vjp(logits_flat, z)
    if mode != "all":
      if mode == "top":
        rival = y
      else:
        rival = jnp.argmax(jnp.where(classes[None] == t[:, None], -jnp.inf, logits), axis=1)
      cot = jax.nn.one_hot(t, num_classes, dtype=logits.dtype) - jax.nn.one_hot(
          rival, num_classes, dtype=logits.dtype)
      return jnp.sum(cot * logits, axis=1), vjp(cot)[0]
    eye = jnp.eye(num_classes, dtype=logits.dtype)
    jac = jax.vmap(lambda c: vjp(jnp.broadcast_to(c, logits.shape))[0])(eye)  # [K, N, D]
    jac = jnp.moveaxis(jac, 0, 1)  # [N, K, D]
    df = logits - jnp.take_along_axis(logits, y[:, None], axis=1)
    dg = jac - jnp.take_along_axis(jac, y[:, None, None], axis=1)
    dist = jnp.abs(df) / (1e-12 + _dual_norm(dg, norm))
    dist = jnp.where(classes[None] == y[:, None], jnp.inf, dist)
    k = jnp.argmin(dist, axis=1)
    return (jnp.take_along_axis(df, k[:, None],
                                axis=1)[:, 0], jnp.take_along_axis(dg, k[:, None, None], axis=1)[:,
                                                                                                 0])

  def objective(logits):
    return core.margin_loss(logits, y, success_target)

  def score(logits, adversarial, dist):
    # Adversarial points rank by smaller norm, the others by the margin loss.
    return jnp.where(adversarial, -dist, objective(logits))

  clean_adv = core.is_adversarial(clean, y, success_target)
  best = core.init_best(x0, clean_adv if live is None else clean_adv | ~live,
                        score(clean, clean_adv, jnp.zeros((n,), dtype)))
  smallest = jnp.where(clean_adv, 0.0, jnp.inf).astype(dtype)
  x_smallest = x0

  def one_run(carry, run):
    best, smallest, x_smallest = carry
    restart = run % restarts
    if mode == "top":
      t = jnp.take(top_targets, run // restarts, axis=1)
    else:
      t = target  # None for mode "all".
    k_run = core.fold_in(key, run)
    radius = 0.5 * jnp.minimum(smallest, jnp.where(jnp.isfinite(eps), eps, restart_eps))
    if norm == "linf":
      u = core.uniform(k_run, x0.shape, dtype, -1.0, 1.0, flat=True)
    else:
      u = core.normal(k_run, x0.shape, dtype, flat=True)
    u = u / jnp.maximum(core.lp_norm(u, norm), 1e-12)[:, None]
    start = jnp.clip(x0 + radius[:, None] * u, *bounds)
    x1 = jnp.where(restart > 0, start, x0)

    def step(_, state):
      x1, best, smallest, x_smallest = state
      df, dg = linearize(x1, t)
      b = jnp.sum(dg * x1, axis=1) - df
      d = project_onto_hyperplane(jnp.concatenate([x1, x0]), jnp.concatenate([dg, dg]),
                                  jnp.concatenate([b, b]), norm, bounds)
      d1, d2 = d[:n], d[n:]
      a1 = jnp.maximum(core.lp_norm(d1, norm), 1e-8)
      a2 = jnp.maximum(core.lp_norm(d2, norm), 1e-8)
      alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
      x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, *bounds)
      logits = logits_flat(x1)
      adversarial = core.is_adversarial(logits, y, success_target)
      dist = core.lp_norm(x1 - x0, norm)
      shorter = adversarial & (dist < smallest)
      smallest = jnp.where(shorter, dist, smallest)
      x_smallest = jnp.where(shorter[:, None], x1, x_smallest)
      inside = dist <= eps
      best = core.update_best(best, x1, adversarial & inside,
                              jnp.where(inside, score(logits, adversarial, dist), -jnp.inf))
      x1 = jnp.where(adversarial[:, None], x0 + beta * (x1 - x0), x1)
      return x1, best, smallest, x_smallest

    state = (x1, best, smallest, x_smallest)
    state = core.iterate(steps, step, state,
                         None if r is None else lambda c: jnp.all(c[1].adversarial))
    return state[1:], None

  if r is None:
    (best, smallest, x_smallest), _ = jax.lax.scan(one_run, (best, smallest, x_smallest),
                                                   jnp.arange(runs_per_restart * restarts))
  else:
    # Fewer classes than num_targets + 1: the last runs have no target.
    (best, smallest, x_smallest) = jax.lax.cond(r < runs_per_restart * restarts,
                                                lambda c: one_run(c, r)[0], lambda c: c,
                                                (best, smallest, x_smallest))
  # The smallest adversarial point, pulled into the ball when it lies outside.
  pulled = core.project(x_smallest, x0, eps, norm, bounds)
  logits = logits_flat(pulled)
  adversarial = core.is_adversarial(logits, y, success_target)
  best = core.update_best(best, pulled, adversarial,
                          score(logits, adversarial, core.lp_norm(pulled - x0, norm)))
  return best.x.reshape(x.shape)


def fab(eps: float,
        *,
        norm: str = "linf",
        steps: int = 100,
        restarts: int = 1,
        num_targets: int | None = 9,
        targeted: bool = False,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """FAB (Croce and Hein, ICML 2020): minimum-norm adversarial points.

  Three modes:

  * ``num_targets=k`` (default 9, ``targeted=False``): FAB-T as in AutoAttack.
    For each of the ``k`` classes with the highest clean logits other than
    ``y``, ``restarts`` runs linearize the boundary between ``y`` and that
    class; a point counts as adversarial when it is misclassified. The call is
    untargeted (no ``target=``).
  * ``num_targets=None``: untargeted FAB, which at every step linearizes the
    boundary to the class whose linearized boundary is closest (one
    input-gradient per class and step).
  * ``targeted=True``: calls take ``target=``; success means being classified
    as ``target``, and each step linearizes the boundary between ``target`` and
    the strongest other class at the iterate (``y`` near ``x``);
    ``num_targets`` is not used.

  Args:
    eps: default radius; FAB's result is used when its norm is at most
      ``eps`` (the search itself does not depend on it, except for the
      random starts of restarts). Called with ``eps=inf`` FAB returns the
      smallest adversarial point it finds (``attack.distances``), its restarts
      starting within this ``eps``.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    steps: iterations per run.
    restarts: runs per target; the first starts at ``x``, the others at a
      random point at half the smallest norm found so far (capped by ``eps``).
    num_targets: top classes to target (FAB-T), or None for untargeted FAB.
    targeted: calls take ``target=``.
    alpha_max: the largest weight of the step toward the original point.
    eta: extrapolation of the projections (overshoot), ``>= 1``.
    beta: after a success the iterate moves to ``x + beta * (x_adv - x)``.
    bounds: the input box.

  Returns:
    An :class:`attacks.core.AttackFn`.

  Raises:
    InputError: for bad hyper-parameters.
  """
  _check_config(norm, steps, restarts, num_targets, alpha_max, eta, beta)
  core.check_eps(eps)  # finite: the restarts' radius when a call is unbounded
  bounds = core.check_bounds(bounds)
  if targeted:
    num_targets = None
  run = functools.partial(_run,
                          norm=norm,
                          steps=steps,
                          restarts=restarts,
                          num_targets=num_targets,
                          alpha_max=float(alpha_max),
                          eta=float(eta),
                          beta=float(beta),
                          bounds=bounds,
                          restart_eps=float(eps))
  return core.make_minimum_norm_attack(run,
                                       family="fab",
                                       eps=eps,
                                       norm=norm,
                                       bounds=bounds,
                                       targeted=targeted,
                                       num_targets=num_targets,
                                       runs=(num_targets or 1) * restarts)

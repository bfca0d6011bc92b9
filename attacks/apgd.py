"""Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks"), as in AutoAttack.

One run of ``N`` steps: a start on the sphere of radius ``eps`` around ``x``,
step size ``eta = 2 eps`` per example, and momentum::

  z     = P(x_k + eta * s(grad))                       s: sign (L-inf), grad / |grad|_2 (L2)
  x_k+1 = P(x_k + a (z - x_k) + (1 - a) (x_k - x_k-1))  a = 1 at the first step, then 0.75

with ``P`` the projection onto the ball and the box. At the checkpoints
``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``,
``p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)`` (:func:`checkpoints`), an
example's step size is halved and its iterate restarted from its highest-loss
point when (1) the loss went up in at most a fraction ``rho = 0.75`` of the
steps since the last checkpoint, or (2) its step size was not halved at the last
checkpoint and its best loss has not improved since. (As in the reference code,
(1) is tested with ``<=``, where the paper writes ``<``; the first step's loss is
compared with the start's, where the reference reads an unset entry of its loss
history.) Everything runs in one ``lax.fori_loop`` with per-example step sizes,
so a batch never recompiles.

The result is, per example, the best point over every iterate of every restart
(and target): an adversarial point beats any other, ties go to the higher loss.

Example::

  x_adv = attacks.apgd(eps=8 / 255, loss="ce")(logits_fn, x, y, jax.random.key(0))
  x_adv = attacks.apgd_t(eps=8 / 255)(logits_fn, x, y, jax.random.key(0))  # top-9 targets
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attacks import core
from robustlib.checks import InputError


def checkpoints(steps: int) -> list[int]:
  """The checkpoints ``w_1 < w_2 < ...``: numbers of steps done when progress is checked.

  As AutoAttack computes them: the first interval is ``max(int(0.22 N), 1)``
  steps, each next one ``max(int(0.03 N), 1)`` shorter, but at least
  ``max(int(0.06 N), 1)``. For ``N = 100``: 22, 41, 57, 70, 80, 87, 93, 99.

  Args:
    steps: the number of steps ``N`` of a run.

  Returns:
    The checkpoints, increasing, each at most ``steps``.
  """
  interval = max(int(0.22 * steps), 1)
  shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
  points = []
  while (points[-1] if points else 0) + interval <= steps:
    points.append((points[-1] if points else 0) + interval)
    interval = max(interval - shrink, shortest)
  return points


class _State(NamedTuple):
  x_adv: jax.Array  # [N, ...] the current iterate
  x_prev: jax.Array  # [N, ...] the iterate before it (momentum)
  grad: jax.Array  # [N, ...] the loss gradient at x_adv
  loss_prev: jax.Array  # [N] the loss at the last step's iterate
  x_top: jax.Array  # [N, ...] the highest-loss point so far (restarts go there)
  grad_top: jax.Array  # [N, ...] its gradient
  loss_top: jax.Array  # [N] its loss
  eta: jax.Array  # [N] step sizes
  successes: jax.Array  # [N] steps that raised the loss since the last checkpoint
  top_at_check: jax.Array  # [N] loss_top at the last checkpoint
  halved_at_check: jax.Array  # [N] bool: eta was halved at the last checkpoint
  best: core.Best


def initial_point(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str,
                  bounds: core.Bounds) -> jax.Array:
  """AutoAttack's start: a random direction scaled to norm ``eps``, clipped to the box
  (L1: `run_l1`'s Gaussian draw projected on the ball ∩ box)."""
  if norm == "l1":
    return core.project(x + core.normal(key, x.shape, x.dtype), x, eps, "l1", bounds)
  if norm == "linf":
    t = core.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    size = jnp.max(jnp.abs(t.reshape(t.shape[0], -1)), axis=1)
  else:
    t = core.normal(key, x.shape, x.dtype)
    size = core.l2_norm(t)
  return jnp.clip(x + core.expand(eps / (size + 1e-12), x) * t, bounds[0], bounds[1])


def _all_broken(state) -> jax.Array:
  return jnp.all(state.best.adversarial)


def run_once(fn: core.LogitsFn,
             x: jax.Array,
             eps: jax.Array,
             key: jax.Array,
             best: core.Best,
             *,
             loss: Callable[[jax.Array], jax.Array],
             judge: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
             steps: int,
             norm: str,
             bounds: core.Bounds,
             momentum: float = 0.75,
             rho: float = 0.75,
             early_exit: bool = False,
             large_eps: bool = False,
             start: jax.Array | None = None) -> core.Best:
  """One APGD run from a random start (or ``start``); every iterate is offered to ``best``.

  Args:
    fn: ``[N, ...] -> [N, K]``.
    x: clean inputs ``[N, ...]``.
    eps: radii ``[N]``.
    key: PRNG key of the start.
    best: the bookkeeping so far.
    loss: ``logits -> [N]``, ascended (its value also drives the step sizes).
    judge: ``logits -> (adversarial [N], score [N])`` for ``best``.
    steps: ``N``, gradient steps (the run costs ``N + 1`` forward and
      backward passes).
    norm: ``"linf"`` or ``"l2"``.
    bounds: the box.
    momentum: the weight ``a`` of the new step (0.75 in AutoAttack).
    rho: the fraction of successful steps below which the step is halved.
    early_exit: stop once every example's best point is adversarial.
    large_eps: L1 only: AutoAttack's schedule of radii (`run_l1`).
    start: the first iterate ``[N, ...]`` inside the ball and the box (a warm
      start), instead of the random start drawn from ``key``.

  Returns:
    The updated :class:`attacks.core.Best`.
  """
  if norm == "l1":
    return run_l1(fn,
                  x,
                  eps,
                  key,
                  best,
                  loss=loss,
                  judge=judge,
                  steps=steps,
                  bounds=bounds,
                  early_exit=early_exit,
                  large_eps=large_eps,
                  start=start)
  marks = checkpoints(steps)
  is_check = np.zeros(steps, bool)
  length = np.ones(steps, np.float32)
  for previous, point in zip([0] + marks, marks):
    is_check[point - 1] = True
    length[point - 1] = point - previous
  is_check, length = jnp.asarray(is_check), jnp.asarray(length)

  grad_fn = core.loss_gradient(fn, loss)

  def direction(g):
    return core.steepest_direction(g, norm)

  def project(z):
    return core.project(z, x, eps, norm, bounds)

  x0 = initial_point(key, x, eps, norm, bounds) if start is None else start
  g0, (l0, logits0) = grad_fn(x0)
  state = _State(x_adv=x0,
                 x_prev=x0,
                 grad=g0,
                 loss_prev=l0,
                 x_top=x0,
                 grad_top=g0,
                 loss_top=l0,
                 eta=2.0 * eps,
                 successes=jnp.zeros_like(l0),
                 top_at_check=l0,
                 halved_at_check=jnp.ones(l0.shape, bool),
                 best=core.update_best(best, x0, *judge(logits0)))

  def body(i, s: _State) -> _State:
    a = jnp.where(i > 0, momentum, 1.0).astype(x.dtype)
    z = project(s.x_adv + core.expand(s.eta, x) * direction(s.grad))
    z = project(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev))
    g, (value, logits) = grad_fn(z)
    best = core.update_best(s.best, z, *judge(logits))
    successes = s.successes + (value > s.loss_prev)
    better = value > s.loss_top
    x_top = jnp.where(core.expand(better, x), z, s.x_top)
    grad_top = jnp.where(core.expand(better, x), g, s.grad_top)
    loss_top = jnp.where(better, value, s.loss_top)
    # The checkpoint test (only where is_check[i]).
    check = is_check[i]
    stalled = successes <= rho * length[i]
    unchanged = ~s.halved_at_check & (s.top_at_check >= loss_top)
    halve = check & (stalled | unchanged)
    return _State(x_adv=jnp.where(core.expand(halve, x), x_top, z),
                  x_prev=s.x_adv,
                  grad=jnp.where(core.expand(halve, x), grad_top, g),
                  loss_prev=value,
                  x_top=x_top,
                  grad_top=grad_top,
                  loss_top=loss_top,
                  eta=jnp.where(halve, s.eta / 2, s.eta),
                  successes=jnp.where(check, 0.0, successes),
                  top_at_check=jnp.where(check, loss_top, s.top_at_check),
                  halved_at_check=jnp.where(check, halve, s.halved_at_check),
                  best=best)

  return core.iterate(steps, body, state, _all_broken if early_exit else None).best


class _L1State(NamedTuple):
  x_adv: jax.Array  # [N, ...] the current iterate
  grad: jax.Array  # [N, ...] its loss gradient
  x_top: jax.Array  # [N, ...] the highest-loss point so far
  grad_top: jax.Array
  loss_top: jax.Array  # [N]
  step: jax.Array  # [N] step sizes (the L1 length of a step)
  density: jax.Array  # [N] the fraction of coordinates a step moves ("topk")
  support: jax.Array  # [N] the non-zeros of x_top - x at the last check
  best: core.Best


def run_l1(fn: core.LogitsFn,
           x: jax.Array,
           eps: jax.Array,
           key: jax.Array,
           best: core.Best,
           *,
           loss: Callable[[jax.Array], jax.Array],
           judge: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
           steps: int,
           bounds: core.Bounds,
           early_exit: bool = False,
           large_eps: bool = False,
           start: jax.Array | None = None) -> core.Best:
  """L1-APGD (Croce & Hein, ICML 2021, "Mind the box: l1-APGD for sparse adversarial
  attacks on image classifiers"), as in AutoAttack's code.

  A step moves the ``density`` fraction of coordinates with the largest gradient
  magnitudes, each by ``step / count`` in the gradient's sign (no momentum), then
  projects onto the L1 ball ∩ box (`attacks.core.project_l1_box`). Steps start at
  ``eps`` and a density of 0.2; every ``max(int(0.04 N), 1)`` steps the density
  becomes the best point's sparsity / 1.5, and where that sparsity fell by more
  than 5 % since the last check the step returns to ``eps`` and the iterate to
  the best point, elsewhere the step shrinks by 1.5 (never below ``eps / 10``).
  With ``large_eps`` (AutoAttack's L1 setting) the run takes radii ``3 eps``,
  ``2 eps``, ``eps`` over 30 %, 30 % and 40 % of the steps, each phase started
  at the previous one's best point projected on the smaller ball; only the last
  phase (radius ``eps``) is offered to ``best`` (fewer than 5 steps: one phase).
  The first start is a Gaussian draw projected on the ball (the original's
  projects it as a perturbation of ``x + draw``), or ``start`` (a warm start,
  inside the ``eps`` ball and the box).
  """
  grad_fn = core.loss_gradient(fn, loss)
  n_fts = int(np.prod(x.shape[1:]))
  flat = lambda v: v.reshape(v.shape[0], -1)

  def project(z, radius):
    return core.project(z, x, radius, "l1", bounds)

  def phase(x_start, radius, phase_steps, best, first, stop_early):
    every = max(int(0.04 * phase_steps), 1)
    g0, (l0, logits0) = grad_fn(x_start)
    support = core.l0_norm(x_start - x).astype(x.dtype)
    density = jnp.full(l0.shape, 0.2, x.dtype) if first else support / n_fts / 1.5
    state = _L1State(x_adv=x_start,
                     grad=g0,
                     x_top=x_start,
                     grad_top=g0,
                     loss_top=l0,
                     step=radius,
                     density=density,
                     support=jnp.full(l0.shape, float(n_fts), x.dtype) if first else support,
                     best=core.update_best(best, x_start, *judge(logits0)))

    def body(i, s: _L1State) -> _L1State:
      magnitude = flat(jnp.abs(s.grad))
      k = jnp.clip(jnp.floor((1.0 - s.density) * n_fts), 0, n_fts - 1).astype(jnp.int32)
      moved = jnp.sign(flat(s.grad)) * (magnitude >= core.kth_smallest(magnitude, k)[:, None])
      count = jnp.sum(jnp.abs(moved), axis=1, keepdims=True)
      z = flat(s.x_adv) + s.step[:, None] * moved / (count + 1e-10)
      z = project(z.reshape(x.shape), radius)
      g, (value, logits) = grad_fn(z)
      best = core.update_best(s.best, z, *judge(logits))
      better = value > s.loss_top
      x_top = jnp.where(core.expand(better, x), z, s.x_top)
      grad_top = jnp.where(core.expand(better, x), g, s.grad_top)
      loss_top = jnp.where(better, value, s.loss_top)
      check = (i + 1) % every == 0
      support = core.l0_norm(x_top - x).astype(x.dtype)
      sparser = check & (support / s.support < 0.95)
      step = jnp.where(sparser, radius, s.step / 1.5)
      step = jnp.where(check, jnp.clip(step, radius / 10.0, radius), s.step)
      return _L1State(x_adv=jnp.where(core.expand(sparser, x), x_top, z),
                      grad=jnp.where(core.expand(sparser, x), grad_top, g),
                      x_top=x_top,
                      grad_top=grad_top,
                      loss_top=loss_top,
                      step=step,
                      density=jnp.where(check, support / n_fts / 1.5, s.density),
                      support=jnp.where(check, support, s.support),
                      best=best)

    return core.iterate(phase_steps, body, state, _all_broken if stop_early else None)

  draw = core.normal(key, x.shape, x.dtype)
  first = lambda radius: project(x + draw, radius) if start is None else start
  early = int(np.ceil(0.3 * steps))
  if not large_eps or steps - 2 * early < 1:  # too few steps for three phases: one
    return phase(first(eps), eps, steps, best, True, early_exit).best
  # Earlier phases search larger balls: their points are not offered to best.
  ignored = core.init_best(x, jnp.zeros_like(best.adversarial), best.score)
  start = phase(first(3.0 * eps), 3.0 * eps, early, ignored, True, False).x_top
  start = phase(project(start, 2.0 * eps), 2.0 * eps, early, ignored, False, False).x_top
  return phase(project(start, eps), eps, steps - 2 * early, best, False, early_exit).best


def _first_best(x: jax.Array, judged: tuple[jax.Array, jax.Array],
                live: jax.Array | None) -> core.Best:
  """The bookkeeping's start at ``x``; rows not ``live`` (a cascade's chunk) count as done."""
  adversarial, score = judged
  return core.init_best(x, adversarial if live is None else adversarial | ~live, score)


def _check_config(norm: str, steps: Any, restarts: Any, momentum: Any, rho: Any) -> None:
  core.check_norm(norm, ("linf", "l2", "l1"))
  core.check_positive_int(steps, "steps")
  core.check_positive_int(restarts, "restarts")
  for value, name in ((momentum, "momentum"), (rho, "rho")):
    if isinstance(value, bool) or not np.isscalar(value) or not 0.0 < float(value) <= 1.0:
      raise InputError(f"{name} must be a number in (0, 1], got {value!r}")


def apgd(eps: float,
         steps: int = 100,
         *,
         norm: str = "linf",
         loss: str | Callable = "ce",
         restarts: int = 1,
         targeted: bool = False,
         momentum: float = 0.75,
         rho: float = 0.75,
         large_eps: bool = False,
         bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """APGD on the cross-entropy or the DLR loss (Croce & Hein 2020); L1-APGD
  (Croce & Hein 2021) for ``norm="l1"`` (`run_l1`).

  Args:
    eps: default radius (a call may pass a traced ``eps=`` scalar or ``[N]``).
    steps: steps per restart (100 in AutoAttack).
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    loss: ``"ce"``, ``"dlr"`` (needs K >= 3), ``"margin"`` or a callable ``loss(logits, y,
      target) -> [N]`` (`attacks.core.get_loss`).
    restarts: independent runs (scanned), each from its own random start.
    targeted: calls take ``target=`` and the loss pulls toward it (targeted
      DLR needs K >= 4); success is being classified as the target.
    momentum: the weight of the new step (0.75).
    rho: the success fraction of the checkpoint test (0.75).
    large_eps: L1: radii 3 eps, 2 eps, eps in turn (AutoAttack's L1 setting).
    bounds: the input box.

  Returns:
    An attack ``attack(logits_fn, x, y, key, *, eps=None, target=None, x_init=None) -> x_adv``;
    with ``x_init`` (a warm start) the first restart starts there, projected
    onto the ball and the box.

  Raises:
    InputError: for invalid hyper-parameters.
  """
  _check_config(norm, steps, restarts, momentum, rho)
  engine = dict(steps=steps, norm=norm, momentum=momentum, rho=rho, large_eps=large_eps)
  loss_fn, min_classes = core.get_loss(loss, targeted)
  bounds = core.check_bounds(bounds)

  def setup(logits_fn, x, y, target, live=None):
    fn = core.prepare(logits_fn, x)
    objective = lambda logits: loss_fn(logits, y, target)
    judge = lambda logits: (core.is_adversarial(logits, y, target), objective(logits))
    options = dict(loss=objective, judge=judge, bounds=bounds, **engine)
    return fn, _first_best(x, judge(fn(x)), live), options

  def run(logits_fn, x, y, key, eps, target, x_init=None):
    fn, best, options = setup(logits_fn, x, y, target)

    def restart(best, r):
      # Restart r draws fold_in(key, r): the first restarts of a longer run are a shorter run.
      k = core.fold_in(key, r)
      start = None
      if x_init is not None:  # a warm start: the first restart starts there
        start = jnp.where(r == 0, core.project(x_init, x, eps, norm, bounds),
                          initial_point(k, x, eps, norm, bounds))
      return run_once(fn, x, eps, k, best, start=start, **options), None

    best, _ = jax.lax.scan(restart, best, jnp.arange(restarts))
    return best.x

  def run_one(logits_fn, x, y, key, eps, r, live):
    fn, best, options = setup(logits_fn, x, y, None, live)
    return run_once(fn, x, eps, core.fold_in(key, r), best, early_exit=True, **options).x

  return core.make_attack(run,
                          name=f"apgd-{core.loss_name(loss)}" + ("-targeted" if targeted else ""),
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          targeted=targeted,
                          min_classes=min_classes,
                          runs=restarts,
                          run_one=None if targeted else run_one,
                          warm_start=True)


def apgd_t(eps: float,
           steps: int = 100,
           *,
           norm: str = "linf",
           num_targets: int = 9,
           restarts: int = 1,
           momentum: float = 0.75,
           rho: float = 0.75,
           large_eps: bool = False,
           bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """APGD-T as in AutoAttack: targeted DLR toward each of the top ``num_targets`` classes.

  For each of the ``num_targets`` classes other than ``y`` with the highest
  clean logits (capped at ``K - 1``), in order, ``restarts`` APGD runs ascend
  the targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``. The
  call is untargeted: success is any misclassification, and the best point over
  all runs is chosen by the untargeted DLR loss (one scale for every target).
  Needs K >= 4 classes.

  Args:
    eps: default radius (a call may pass a traced ``eps=`` scalar or ``[N]``).
    steps: steps per run (100 in AutoAttack).
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    num_targets: target classes (9 in AutoAttack).
    restarts: runs per target (1 in AutoAttack's standard version).
    momentum: the weight of the new step (0.75).
    rho: the success fraction of the checkpoint test (0.75).
    large_eps: L1: radii 3 eps, 2 eps, eps in turn (AutoAttack's L1 setting).
    bounds: the input box.

  Returns:
    An untargeted attack ``attack(logits_fn, x, y, key, *, eps=None, x_init=None) -> x_adv``;
    with ``x_init`` (a warm start) each target's first restart starts there,
    projected onto the ball and the box.

  Raises:
    InputError: for invalid hyper-parameters.
  """
  _check_config(norm, steps, restarts, momentum, rho)
  engine = dict(steps=steps, norm=norm, momentum=momentum, rho=rho, large_eps=large_eps)
  core.check_positive_int(num_targets, "num_targets")
  targeted_dlr, min_classes = core.get_loss("dlr", targeted=True)
  bounds = core.check_bounds(bounds)

  def setup(logits_fn, x, y, live=None):
    fn = core.prepare(logits_fn, x)
    clean = fn(x)
    targets = core.top_targets(clean, y, num_targets)  # [N, T]
    judge = lambda logits: (core.is_adversarial(logits, y), core.dlr_loss(logits, y))
    # Runs in AutoAttack's order: every restart of the first target, then the next target.
    runs_targets = jnp.repeat(targets.T, restarts, axis=0)  # [T * restarts, N]
    one_run = functools.partial(run_once, fn, x, judge=judge, bounds=bounds, **engine)
    return one_run, _first_best(x, judge(clean), live), runs_targets

  def run(logits_fn, x, y, key, eps, target, x_init=None):
    del target  # untargeted: the attack picks its own targets
    one_run, best, runs_targets = setup(logits_fn, x, y)
    if x_init is not None:
      x_init = core.project(x_init, x, eps, norm, bounds)

    def step(best, inputs):
      t, k, r = inputs
      start = None
      if x_init is not None:  # a warm start: each target's first restart starts there
        start = jnp.where(r % restarts == 0, x_init, initial_point(k, x, eps, norm, bounds))
      return one_run(eps, k, best, loss=lambda logits: targeted_dlr(logits, y, t),
                     start=start), None

    keys = core.split(key, runs_targets.shape[0])
    best, _ = jax.lax.scan(step, best, (runs_targets, keys, jnp.arange(runs_targets.shape[0])))
    return best.x

  def run_one(logits_fn, x, y, key, eps, r, live):
    one_run, best, runs_targets = setup(logits_fn, x, y, live)
    t = runs_targets[jnp.minimum(r, runs_targets.shape[0] - 1)]

    def attack(best):
      return one_run(eps,
                     core.fold_in(key, r),
                     best,
                     loss=lambda logits: targeted_dlr(logits, y, t),
                     early_exit=True)

    # Fewer classes than num_targets + 1: the last runs have no target.
    return jax.lax.cond(r < runs_targets.shape[0], attack, lambda b: b, best).x

  return core.make_attack(run,
                          name="apgd-t",
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          min_classes=min_classes,
                          runs=num_targets * restarts,
                          run_one=run_one,
                          warm_start=True)

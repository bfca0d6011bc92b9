"""Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"), with any optax step rule.

The attack is assembled from named pieces: an init (``x`` or a random point of
the ball), a loss (:data:`attacks.core.LOSSES`), a step rule that is an
``optax.GradientTransformation`` (sign steps for L-inf, per-example normalised
gradient steps for L2, or e.g. ``optax.adam(0.01)``), and the projection onto
the ball and the box. Steps run in ``lax.fori_loop``, restarts in ``lax.scan``;
per example the best point over every iterate of every restart is kept.

Example::

  attack = attacks.pgd(eps=0.3, steps=40)                      # L-inf, sign steps
  attack = attacks.pgd(eps=0.3, steps=40, optimizer=optax.adam(0.01))
  attack = attacks.pgd(eps=1.5, norm="l2", loss="margin", restarts=5)
  x_adv = attack(logits_fn, x, y, jax.random.key(0))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from attacks import core
from robustlib.checks import InputError

StepSize = float | Callable[[jax.Array], Any] | None
# objective(logits [N, K]) -> [N]: what the steps ascend.
Objective = Callable[[jax.Array], jax.Array]
# judge(logits [N, K]) -> (adversarial [N] bool, score [N]): what the best point is chosen by.
Judge = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

# ----------------------------------------------------------------------------
# Step rules.


def _steepest(norm: str) -> optax.GradientTransformation:
  """Each example's update ``[N, ...]`` as `core.steepest_direction` (sign, unit L2)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u: core.steepest_direction(u, norm), updates))


def step_rule(norm: str, learning_rate: Any) -> optax.GradientTransformation:
  """The default PGD step rule as an optax transformation.

  Optax transformations minimise, so attacks feed them the negated gradient of
  the loss; the resulting update ascends the loss.

  Args:
    norm: ``"linf"`` (steps ``learning_rate * sign(grad)``) or ``"l2"``
      (steps ``learning_rate * grad / ||grad||_2`` per example).
    learning_rate: a float, an array broadcastable against ``[N, ...]`` (per
      example) or an optax schedule (a callable of the step count).

  Returns:
    An ``optax.GradientTransformation``.
  """
  return optax.chain(_steepest(norm), optax.scale_by_learning_rate(learning_rate))


def cosine_l2_rule(eps: jax.Array, steps: int, like: jax.Array) -> optax.GradientTransformation:
  """Normalised gradient steps of ``2 eps`` per example, decayed to 0 over ``steps`` on a
  cosine: long first steps turn the iterate to the sphere's best direction (on a linear
  model the angle to it shrinks by more than half per step), short last ones settle there,
  where a fixed ``2.5 eps / steps`` leaves a few percent of the margin after 40 steps."""
  peak = core.expand(2.0 * eps, like)
  return step_rule("l2", lambda count: peak * optax.cosine_decay_schedule(1.0, steps)(count))


def check_step_size(step_size: StepSize) -> None:
  if step_size is None or callable(step_size):
    return
  if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
    raise InputError(f"step_size must be a positive float, an optax schedule or None, "
                     f"got {step_size!r}")


def make_step_rule(norm: str, step_size: StepSize, optimizer: optax.GradientTransformation | None,
                   eps: jax.Array, steps: int, like: jax.Array) -> optax.GradientTransformation:
  """The step rule used at call time; ``step_size=None`` means ``2.5 * eps / steps`` per example."""
  if optimizer is not None:
    return optimizer
  if step_size is None:
    return step_rule(norm, core.expand(2.5 * eps / steps, like))
  return step_rule(norm, step_size)


# ----------------------------------------------------------------------------
# The engine shared by PGD and MultiTargeted.


def ascend(fn: core.LogitsFn, x: jax.Array, x_start: jax.Array, eps: jax.Array, best: core.Best, *,
           objective: Objective, judge: Judge, tx: optax.GradientTransformation, steps: int,
           norm: str, bounds: core.Bounds) -> core.Best:
  """Runs ``steps`` projected steps of ``tx`` from ``x_start``, ascending ``objective``.

  Every iterate (the start, each step's result and the final point) is offered
  to the per-example best-point bookkeeping; the gradient evaluation of an
  iterate also supplies its logits, so the attack costs ``steps`` forward and
  backward passes plus one forward pass.

  Args:
    fn: ``[N, ...] -> [N, K]``.
    x: the clean inputs ``[N, ...]`` (centre of the ball).
    x_start: the first iterate ``[N, ...]``, inside the ball and the box.
    eps: radii ``[N]``.
    best: the bookkeeping so far.
    objective: ``logits -> [N]``, ascended.
    judge: ``logits -> (adversarial [N], score [N])``.
    tx: the step rule (fed the negated gradient of ``objective``).
    steps: number of steps.
    norm: ``"linf"`` or ``"l2"``.
    bounds: the box.

  Returns:
    The updated :class:`attacks.core.Best`.
  """

  grad_fn = core.loss_gradient(fn, objective)

  def body(_, carry):
    z, opt_state, best = carry
    grad, (_, logits) = grad_fn(z)
    adversarial, score = judge(logits)
    best = core.update_best(best, z, adversarial, score)
    updates, opt_state = tx.update(jax.tree.map(jnp.negative, grad), opt_state, z)
    z = core.project(z + updates.astype(z.dtype), x, eps, norm, bounds)
    return z, opt_state, best

  z, _, best = jax.lax.fori_loop(0, steps, body, (x_start, tx.init(x_start), best))
  adversarial, score = judge(fn(z))
  return core.update_best(best, z, adversarial, score)


def loss_judge(loss_fn: Callable, y: jax.Array,
               target: jax.Array | None) -> tuple[Objective, Judge]:
  """Objective and judge of an attack whose score is its own loss."""

  def objective(logits):
    return loss_fn(logits, y, target)

  def judge(logits):
    return core.is_adversarial(logits, y, target), loss_fn(logits, y, target)

  return objective, judge


# ----------------------------------------------------------------------------
# The factory.


def pgd(
    eps: float,
    steps: int = 40,
    step_size: StepSize = None,
    *,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    loss: str | Callable = "ce",
    targeted: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    bounds: Sequence[float] = (0.0, 1.0)
) -> core.AttackFn:
  """Projected gradient ascent on a loss, inside an L-inf or L2 ball (Madry et al. 2018).

  Args:
    eps: default radius (a call may pass a traced ``eps=`` scalar or ``[N]``).
    steps: gradient steps per restart.
    step_size: a float, an optax schedule (callable of the step) or None for
      ``2.5 * eps / steps`` (per example, from the radius of the call).
    norm: ``"linf"`` or ``"l2"``.
    restarts: independent runs (scanned); the best point over all is returned.
    random_start: start each restart from a uniform random point of the ball
      (else from ``x``). A call's ``x_init=`` (a warm start: earlier points,
      another attack's) replaces the first restart's start, projected onto the
      ball and the box.
    loss: ``"ce"``, ``"margin"``, ``"dlr"`` (see :mod:`attacks.core`) or a callable
      ``loss(logits, y, target) -> [N]`` to ascend.
    targeted: calls take ``target=`` and the loss pushes toward it; success is
      being classified as the target.
    optimizer: an ``optax.GradientTransformation`` used as the step rule (it
      carries its own learning rate, so ``step_size`` must then be None);
      default: sign steps for L-inf, normalised-gradient steps for L2.
    bounds: the input box.

  Returns:
    An attack ``attack(logits_fn, x, y, key, *, eps=None, target=None) -> x_adv``.

  Raises:
    InputError: for invalid hyper-parameters.
  """
  core.check_norm(norm)
  core.check_positive_int(steps, "steps")
  core.check_positive_int(restarts, "restarts")
  check_step_size(step_size)
  loss_fn, min_classes = core.get_loss(loss, targeted)
  if optimizer is not None and step_size is not None:
    raise InputError("pass either optimizer= (which carries its learning rate) or step_size=, "
                     "not both")
  if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
    raise InputError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
  bounds = core.check_bounds(bounds)

  def run(logits_fn, x, y, key, eps, target, x_init=None):
    fn = core.prepare(logits_fn, x)
    objective, judge = loss_judge(loss_fn, y, target)
    best = core.init_best(x, *judge(fn(x)))
    tx = make_step_rule(norm, step_size, optimizer, eps, steps, x)
    keys = jax.random.split(key, restarts)

    def restart(best, r):
      k = keys[r]
      x_start = core.random_init(k, x, eps, norm, bounds) if random_start else x
      if x_init is not None:  # a warm start: the first restart starts there
        x_start = jnp.where(r == 0, core.project(x_init, x, eps, norm, bounds), x_start)
      return ascend(fn,
                    x,
                    x_start,
                    eps,
                    best,
                    objective=objective,
                    judge=judge,
                    tx=tx,
                    steps=steps,
                    norm=norm,
                    bounds=bounds), None

    best, _ = jax.lax.scan(restart, best, jnp.arange(restarts))
    return best.x

  name = "pgd" + ("" if loss == "ce" else f"-{core.loss_name(loss)}") + ("-targeted"
                                                                         if targeted else "")
  return core.make_attack(run,
                          name=name,
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          targeted=targeted,
                          min_classes=min_classes,
                          warm_start=True)

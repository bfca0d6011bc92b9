"""MultiTargeted PGD (Gowal et al. 2019, "An Alternative Surrogate Loss for
PGD-based Adversarial Testing").

For each pair (restart, target class ``t``) an independent PGD ascends the
logit difference ``z_t - z_y`` (`attacks.core.logit_difference`) from its own start; per example the best point
over every iterate of every pair is returned, judged by the untargeted margin
``max_{j != y} z_j - z_y`` (adversarial first), so that pairs aiming at
different classes compare on one scale. The targets are all classes other than
``y`` (``num_targets=None``) or the ``k`` other classes with the highest clean
logits. Pairs run ``chunk_size`` at a time (stacked along the batch) in a
``lax.scan`` over chunks: memory grows with ``chunk_size``, not with the
number of pairs.

Example::

  attack = attacks.multitargeted(eps=0.3, steps=40)                  # all targets
  attack = attacks.multitargeted(eps=1.5, norm="l2", num_targets=3, restarts=2)
  x_adv = attack(logits_fn, x, y, jax.random.key(0))
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from attacks import core
from attacks import pgd as pgd_lib
from robustlib.checks import InputError


def multitargeted(
    eps: float,
    steps: int = 40,
    step_size: pgd_lib.StepSize = None,
    *,
    norm: str = "linf",
    restarts: int = 1,
    num_targets: int | None = None,
    chunk_size: int = 8,
    random_start: bool = True,
    optimizer: optax.GradientTransformation | None = None,
    bounds: Sequence[float] = (0.0, 1.0)
) -> core.AttackFn:
  """MultiTargeted: one PGD on ``z_t - z_y`` per (restart, target) pair, best pair per example.

  Args:
    eps: default radius (a call may pass a traced ``eps=`` scalar or ``[N]``).
    steps: gradient steps per pair.
    step_size: a float, an optax schedule or None: L-inf ``2.5 * eps / steps``
      (per example), as in :func:`attacks.pgd`; L2 normalised steps of
      ``2 * eps`` decayed on a cosine (`attacks.pgd.cosine_l2_rule`), which
      reach the known optimum of a linear model in the default 40 steps.
    norm: ``"linf"`` or ``"l2"``.
    restarts: independent starts per target.
    num_targets: None for every class other than ``y``, or ``k`` for the ``k``
      other classes with the highest clean logits (capped at ``K - 1``).
    chunk_size: pairs run side by side (stacked along the batch) per chunk;
      peak memory is about ``chunk_size`` times that of one PGD.
    random_start: start each pair from a uniform random point of the ball
      (else from ``x``).
    optimizer: an ``optax.GradientTransformation`` step rule (then
      ``step_size`` must be None); default sign steps (L-inf) or normalised
      gradient steps (L2).
    bounds: the input box.

  Returns:
    An untargeted attack ``attack(logits_fn, x, y, key, *, eps=None, x_init=None) -> x_adv``;
    with ``x_init`` (a warm start) each target's first restart starts there,
    projected onto the ball and the box.

  Raises:
    InputError: for invalid hyper-parameters.
  """
  core.check_norm(norm)
  core.check_positive_int(steps, "steps")
  core.check_positive_int(restarts, "restarts")
  core.check_positive_int(chunk_size, "chunk_size")
  if num_targets is not None:
    core.check_positive_int(num_targets, "num_targets")
  pgd_lib.check_step_size(step_size)
  if optimizer is not None and step_size is not None:
    raise InputError("pass either optimizer= (which carries its learning rate) or step_size=, "
                     "not both")
  if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
    raise InputError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
  bounds = core.check_bounds(bounds)

  def run(logits_fn, x, y, key, eps, target, x_init=None):
    del target  # untargeted: the attack picks its own targets
    n = x.shape[0]
    clean = logits_fn(x)
    targets = core.top_targets(clean, y, num_targets)  # [N, T]
    num_pairs = restarts * targets.shape[1]
    num_chunks = -(-num_pairs // chunk_size)
    chunk = -(-num_pairs // num_chunks)  # at most chunk_size, with the least padding
    # Pair p = (restart p // T, target p % T); the last chunk is padded by
    # repeating pair 0, which cannot change the best point.
    pair = jnp.arange(num_chunks * chunk) % num_pairs
    pair_targets = jnp.take(targets, pair % targets.shape[1], axis=1).T  # [P', N]
    pair_keys = jax.random.split(key, num_pairs)[pair]

    tile = lambda v: jnp.tile(v, (chunk,) + (1,) * (v.ndim - 1))  # [N, ...] -> [C*N, ...]
    x_c, y_c, eps_c = tile(x), tile(y), tile(eps)
    fn = core.prepare(logits_fn, x_c)
    if norm == "l2" and step_size is None and optimizer is None:
      tx = pgd_lib.cosine_l2_rule(eps_c, steps, x_c)
    else:
      tx = pgd_lib.make_step_rule(norm, step_size, optimizer, eps_c, steps, x_c)

    def judge(logits):
      return core.is_adversarial(logits, y_c), core.margin_loss(logits, y_c)

    best = core.init_best(x, core.is_adversarial(clean, y), core.margin_loss(clean, y))

    warm = None if x_init is None else tile(core.project(x_init, x, eps, norm, bounds))

    def run_chunk(best, chunk_inputs):
      t, keys, p = chunk_inputs  # [C, N], [C], [C]
      t = t.reshape(-1)
      if random_start:
        starts = jax.vmap(lambda k, x_, e: core.random_init(k, x_, e, norm, bounds))(
            keys, x_c.reshape((chunk,) + x.shape), eps_c.reshape(chunk, n))
        x_start = starts.reshape(x_c.shape)
      else:
        x_start = x_c
      if warm is not None:  # a warm start: each target's first restart starts there
        first = jnp.repeat(p < targets.shape[1], n)  # [C*N]
        x_start = jnp.where(core.expand(first, x_c), warm, x_start)
      objective = lambda logits: core.logit_difference(logits, y_c, t)
      found = pgd_lib.ascend(fn,
                             x_c,
                             x_start,
                             eps_c,
                             core.init_best(x_c, jnp.zeros(x_c.shape[:1], bool),
                                            jnp.full(x_c.shape[:1], -jnp.inf, x.dtype)),
                             objective=objective,
                             judge=judge,
                             tx=tx,
                             steps=steps,
                             norm=norm,
                             bounds=bounds)
      candidates = jax.tree.map(lambda v: v.reshape((chunk, n) + v.shape[1:]), found)
      best, _ = jax.lax.scan(lambda b, c: (core.update_best(b, *c), None), best, candidates)
      return best, None

    best, _ = jax.lax.scan(run_chunk, best, (pair_targets.reshape(
        num_chunks, chunk, n), pair_keys.reshape((num_chunks, chunk) + pair_keys.shape[1:]),
                                             pair.reshape(num_chunks, chunk)))
    return best.x

  return core.make_attack(run,
                          name="multitargeted",
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          warm_start=True)

"""Searching a box for a counterexample: projected gradient descent on the safety.

Every polytope of the unsafe set gets its own runs (as MultiTargeted gives
every target class its own): a run descends the distance of the output to its
polytope, ``max_s (C_s y - d_s)``, with sign steps scaled to the box's widths
and clipped to the box. All runs, ``restarts`` per polytope, form one batch
under one ``lax.fori_loop``; the point of least safety ever seen is returned.
The first run of each polytope starts at the box's centre, the others at
uniform random points.

A returned point with safety <= 0 is only a candidate: the caller confirms it
on the network before reporting it (see `verify.vnncomp`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from robustlib import compilation
from robustlib.checks import InputError, as_key
from verify.unsafe import UnsafeSet


def _check_runs(steps: int, restarts: int) -> None:
  for value, name in ((steps, "steps"), (restarts, "restarts")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise InputError(f"{name} must be an integer >= 1, got {value!r}")


def falsify(fn: Callable[[jax.Array], jax.Array],
            lower: jax.Array,
            upper: jax.Array,
            unsafe: UnsafeSet,
            key: jax.Array,
            steps: int = 100,
            restarts: int = 4) -> tuple[jax.Array, jax.Array]:
  """The least safe point found in the box ``[lower, upper]`` by `falsify_runs`: ``(x [...],
  safety [])`` (<= 0: a candidate counterexample)."""
  _check_runs(steps, restarts)
  return _falsify(fn, lower, upper, unsafe, as_key(key), steps, restarts)


@compilation.jit(static_argnames=("fn", "steps", "restarts"))
def _falsify(fn, lower, upper, unsafe, key, steps, restarts):
  bx, bs = _falsify_runs(fn, lower, upper, unsafe, key, steps, restarts)
  i = jnp.argmin(bs)
  return bx[i], bs[i]


def falsify_runs(fn: Callable[[jax.Array], jax.Array],
                 lower: jax.Array,
                 upper: jax.Array,
                 unsafe: UnsafeSet,
                 key: jax.Array,
                 steps: int = 100,
                 restarts: int = 4) -> tuple[jax.Array, jax.Array]:
  """The least safe point of every run in the box ``[lower, upper]``.

  Args:
    fn: ``fn(x [N, ...]) -> [N, K]``.
    lower: ``[...]``, one input's lower bounds.
    upper: ``[...]``, its upper bounds.
    unsafe: the unsafe set of outputs (``P`` polytopes).
    key: PRNG key for the random starts.
    steps: descent steps per run; the step shrinks geometrically from 20 % to
      0.2 % of the box's width.
    restarts: runs per polytope.

  Returns:
    ``(x [P * restarts, ...], safety [P * restarts])``: each run's point and its
    safety (<= 0: a candidate counterexample).

  Raises:
    InputError: for ``steps`` or ``restarts`` below 1, or a key that is none.
  """
  _check_runs(steps, restarts)
  return _falsify_runs(fn, lower, upper, unsafe, as_key(key), steps, restarts)


@compilation.jit(static_argnames=("fn", "steps", "restarts"))
def _falsify_runs(fn, lower, upper, unsafe, key, steps, restarts):
  p = unsafe.num_polytopes
  n = p * restarts
  width = upper - lower
  starts = lower + width * jax.random.uniform(key, (n,) + lower.shape, lower.dtype)
  starts = starts.at[:p].set(jnp.broadcast_to((lower + upper) / 2, (p,) + lower.shape))
  target = jnp.arange(n) % p

  def objective(x):
    d = unsafe.distance(fn(x))
    return jnp.sum(jnp.take_along_axis(d, target[:, None], axis=1)), jnp.min(d, axis=1)

  return signed_descent(objective, starts, lower, upper, steps)


def signed_descent(objective: Callable[[jax.Array], tuple[jax.Array, jax.Array]], starts: jax.Array,
                   lower: jax.Array, upper: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
  """Signed gradient steps from ``starts [N, ...]`` clipped to the box ``[lower, upper]`` (one
  input's shape ``[...]``), shrinking geometrically from 20 % to 0.2 % of its width.

  ``objective(x [N, ...]) -> (loss [], score [N])``: the steps descend the loss;
  returns every run's point of least score ever seen and that score, ``(x [N, ...],
  score [N])``. Runs under one ``lax.fori_loop`` (trace it inside a jitted function).
  """
  width = upper - lower
  grad_fn = jax.grad(objective, has_aux=True)

  def keep(best, x, s):
    bx, bs = best
    better = s < bs
    return jnp.where(better.reshape((-1,) + (1,) * lower.ndim), x, bx), jnp.where(better, s, bs)

  def body(t, carry):
    x, best = carry
    g, s = grad_fn(x)
    best = keep(best, x, s)
    step = width * (0.2 * 0.01**(t / max(steps - 1, 1)))
    return jnp.clip(x - step * jnp.sign(g), lower, upper), best

  score = jax.eval_shape(objective, starts)[1]
  init = (starts, jnp.full(score.shape, jnp.inf, score.dtype))
  x, best = lax.fori_loop(0, steps, body, (starts, init))
  return keep(best, x, objective(x)[1])

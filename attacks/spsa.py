"""SPSA: a gradient-free attack with finite-difference gradient estimates.

Uesato, O'Donoghue, van den Oord and Kohli, "Adversarial risk and the dangers of
evaluating against weak attacks", ICML 2018.

The gradient of the margin loss is estimated by simultaneous perturbation,
``g = mean_v (f(x + delta v) - f(x - delta v)) / (2 delta) * v`` over Rademacher
vectors ``v``; Adam (optax) ascends it and every step is projected back onto
the epsilon-ball and the box. Samples are drawn in chunks inside ``lax.scan``, so
memory grows with ``chunk_size``, not ``num_samples``; sample ``i`` uses the key
``fold_in(key, i)``, so the estimate does not depend on the chunking.

Example::

  attack = attacks.spsa(eps=0.3, steps=100, num_samples=128, chunk_size=32)
  x_adv = attack(logits_fn, x, y, key)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from attacks import core
from robustlib.checks import InputError


def _check_sampling(delta: Any, num_samples: Any, chunk_size: Any) -> None:
  core.check_positive_int(num_samples, "num_samples")
  core.check_positive_int(chunk_size, "chunk_size")
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not float(delta) > 0:
    raise InputError(f"delta must be a number > 0, got {delta!r}")


def spsa_gradient(loss_fn: Callable[[jax.Array], jax.Array],
                  x: jax.Array,
                  key: jax.Array,
                  *,
                  delta: float = 0.01,
                  num_samples: int = 128,
                  chunk_size: int = 32) -> jax.Array:
  """SPSA estimate of the input-gradient of a per-example loss.

  ``g = 1/S sum_i (f(x + delta v_i) - f(x - delta v_i)) / (2 delta) * v_i`` with
  ``v_i`` Rademacher vectors (Uesato et al., ICML 2018); ``v_i`` is drawn from
  ``fold_in(key, i)``, so the chunking changes only the order of summation.

  Args:
    loss_fn: ``[N, ...] -> [N]``, example ``n``'s loss depending on row ``n`` only.
    x: ``[N, ...]`` where to estimate.
    key: PRNG key.
    delta: finite-difference step.
    num_samples: ``S``, the number of directions.
    chunk_size: directions evaluated together (``2 * chunk_size`` calls of
      ``loss_fn`` vmapped); bounds the memory.

  Returns:
    ``[N, ...]`` the estimate.
  """
  _check_sampling(delta, num_samples, chunk_size)
  chunk_size = min(chunk_size, num_samples)
  num_chunks = -(-num_samples // chunk_size)

  def directions(index):
    # Drawn flat: XLA compiles threefry for rank-1 shapes much faster.
    flat = jax.random.rademacher(jax.random.fold_in(key, index), (x.size,), x.dtype)
    return flat.reshape(x.shape)

  def one_chunk(total, c):
    index = c * chunk_size + jnp.arange(chunk_size)
    v = jax.vmap(directions)(index)  # [C, N, ...]
    f = jax.vmap(loss_fn)(jnp.concatenate([x + delta * v, x - delta * v]))  # [2C, N]
    weight = (f[:chunk_size] - f[chunk_size:]) / (2.0 * delta)
    weight = jnp.where((index < num_samples)[:, None], weight, 0.0)
    return total + jnp.einsum("cn,cn...->n...", weight, v), None

  total, _ = jax.lax.scan(one_chunk, jnp.zeros_like(x), jnp.arange(num_chunks))
  return total / num_samples


def _run(logits_fn, x, y, key, eps, target, *, norm, steps, learning_rate, delta, num_samples,
         chunk_size, bounds, loss_fn):

  def loss(z):
    return loss_fn(logits_fn(z), y, target)

  optimizer = optax.adam(learning_rate)
  k_init, k_steps = jax.random.split(key)
  x_adv = core.random_init(k_init, x, eps, norm, bounds)
  clean = logits_fn(x)
  best = core.init_best(x, core.is_adversarial(clean, y, target), loss_fn(clean, y, target))

  def evaluate(best, z):
    logits = logits_fn(z)
    return core.update_best(best, z, core.is_adversarial(logits, y, target),
                            loss_fn(logits, y, target))

  def step(i, state):
    x_adv, opt_state, best = state
    best = evaluate(best, x_adv)
    grad = spsa_gradient(loss,
                         x_adv,
                         jax.random.fold_in(k_steps, i),
                         delta=delta,
                         num_samples=num_samples,
                         chunk_size=chunk_size)
    updates, opt_state = optimizer.update(-grad, opt_state, x_adv)  # Ascent on the loss.
    x_adv = core.project(optax.apply_updates(x_adv, updates), x, eps, norm, bounds)
    return x_adv, opt_state, best

  x_adv, _, best = jax.lax.fori_loop(0, steps, step, (x_adv, optimizer.init(x_adv), best))
  return evaluate(best, x_adv).x


def spsa(eps: float,
         *,
         steps: int = 100,
         learning_rate: float = 0.01,
         delta: float = 0.01,
         num_samples: int = 128,
         chunk_size: int = 32,
         norm: str = "linf",
         targeted: bool = False,
         loss: str | Callable = "margin",
         bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """SPSA attack (Uesato et al., ICML 2018): Adam on an SPSA gradient estimate.

  Starts at a uniform random point of the ball; each step estimates the
  gradient of the margin loss with ``num_samples`` Rademacher directions
  (:func:`spsa_gradient`), takes an Adam step up it and projects onto the ball
  and the box. Uses ``2 * num_samples + 1`` logits evaluations per step.

  Args:
    eps: default radius of the ``norm`` ball.
    steps: Adam steps.
    learning_rate: Adam's step size.
    delta: finite-difference step.
    num_samples: directions per gradient estimate.
    chunk_size: directions evaluated at once (memory bound).
    norm: ``"linf"`` or ``"l2"``.
    targeted: calls take ``target=``; the margin loss is then C&W's
      ``z_t - max_{j != t} z_j``.
    loss: ``"margin"`` (default), ``"ce"``, ``"dlr"`` or a callable
      ``loss(logits [N, K], y [N], target [N] | None) -> [N]`` (higher is more
      adversarial; see `attacks.core.get_loss`), estimated and ascended as it is.
    bounds: the input box.

  Returns:
    An :class:`attacks.core.AttackFn`.

  Raises:
    InputError: for ``eps < 0``, ``steps``, ``num_samples`` or ``chunk_size``
      below 1, ``delta <= 0`` or a non-positive learning rate.
  """
  core.check_positive_int(steps, "steps")
  _check_sampling(delta, num_samples, chunk_size)
  if isinstance(learning_rate, bool) or not isinstance(learning_rate,
                                                       (int, float)) or not learning_rate > 0:
    raise InputError(f"learning_rate must be a number > 0, got {learning_rate!r}")
  core.check_norm(norm)
  bounds = core.check_bounds(bounds)
  loss_fn, min_classes = core.get_loss(loss, targeted)
  run = functools.partial(_run,
                          loss_fn=loss_fn,
                          norm=norm,
                          steps=steps,
                          learning_rate=float(learning_rate),
                          delta=float(delta),
                          num_samples=num_samples,
                          chunk_size=chunk_size,
                          bounds=bounds)
  return core.make_attack(run,
                          name=f"spsa-{norm}",
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          targeted=targeted,
                          min_classes=min_classes)

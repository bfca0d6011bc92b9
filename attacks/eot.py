"""Expectation over Transformation (Athalye et al. 2018, "Synthesizing Robust
Adversarial Examples"; "Obfuscated Gradients Give a False Sense of Security"):
gradient attacks on randomized models.

A randomized model is a pure function ``model_fn(x, key) -> logits`` that draws
its randomness (noise, random resizing, dropout at test time, ...) from
``key``. Wrap it as :class:`Randomized` to evaluate and attack it like any
model::

  model = attacks.Randomized(model_fn, key=jax.random.key(0))
  logits = model(x)                 # one draw, fresh for every new input batch
  attack = attacks.eot(attacks.pgd(eps=8 / 255), samples=20)
  x_adv = attack(model, x, y, jax.random.key(1))
  report = attacks.evaluate(model, x, y, attacks.autoattack(8 / 255, version="rand"))

Called with ``x`` alone, a :class:`Randomized` model draws with a key derived
from its own key and the bits of ``x``: every new input sees new randomness
(as a deployed randomized defence does), and the same input the same draw, so
that calls stay pure and results repeatable.

:func:`eot` wraps an attack: at every iterate a gradient attack takes the
average over ``samples`` draws of its loss gradient (draws made with the
attack's key, fresh at every new iterate) and judges its steps on the mean
logits, or on the last draw as AutoAttack's ``rand`` version does
(``judge_one_draw``); a score-based attack ranks by the mean logits. On a deterministic
model (any other ``logits_fn``) the draws would all agree, so the wrapped attack
runs unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from attacks import core
from robustlib.checks import InputError

RandomizedFn = Callable[[jax.Array, jax.Array], jax.Array]


def input_key(key: jax.Array, x: jax.Array) -> jax.Array:
  """``key`` folded with a hash of the bits of ``x``: a new key for every new input."""
  bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x).astype(jnp.float32), jnp.uint32)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jax.random.fold_in(key, jnp.sum(bits.reshape(-1) * weights, dtype=jnp.uint32))


@dataclasses.dataclass(frozen=True, eq=False)
class Randomized:
  """A randomized model ``fn(x, key) -> logits`` usable wherever a ``logits_fn`` is.

  Attributes:
    fn: ``fn(x [N, ...], key) -> logits [N, K]``, pure.
    key: the key of the draws made by ``model(x)``.
  """
  fn: RandomizedFn
  key: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    """One draw: ``fn(x, key)`` with ``key`` derived from :attr:`key` and ``x``."""
    return self.fn(x, input_key(self.key, x))

  def cast_inputs(self, dtype) -> "Randomized":
    """The same model fed inputs cast to ``dtype`` (an attack searching in float32 on a
    float16 model, `attacks.core.widen`)."""
    return Randomized(lambda x, key: self.fn(x.astype(dtype), key), self.key)

  def mean_logits(self, x: jax.Array, key: jax.Array, samples: int) -> jax.Array:
    """The logits averaged over ``samples`` draws keyed by ``key`` and ``x``: ``[N, K]``."""
    keys = jax.random.split(input_key(key, x), samples)
    return jnp.mean(jax.vmap(lambda k: self.fn(x, k))(keys), axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class Expectation:
  """What an EOT attack sees of a :class:`Randomized` model: ``samples`` draws per iterate,
  keyed by ``key`` and the iterate's bits.

  Called, it gives the logits averaged over the draws (what score-based attacks
  rank by); `attacks.core.loss_gradient` takes from it the loss gradient
  averaged over the draws, with the loss and logits of the mean logits, or with
  ``judge_one_draw`` of the last draw (AutoAttack's EOT: step sizes and success
  judged on one draw).
  """
  model: Randomized
  key: jax.Array
  samples: int
  judge_one_draw: bool = False

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.model.mean_logits(x, self.key, self.samples)

  def expected_gradient(self, loss: Callable[[jax.Array], jax.Array]):
    """``z -> (mean over draws of grad sum(loss(draw(z))), (loss, logits))``."""

    def one_draw(z, key):
      logits = self.model.fn(z, key)
      value = loss(logits)
      return jnp.sum(value), (value, logits)

    def gradient(z):
      keys = jax.random.split(input_key(self.key, z), self.samples)
      grads, (values, logits) = jax.vmap(jax.grad(one_draw, has_aux=True), (None, 0))(z, keys)
      if self.judge_one_draw:
        return jnp.mean(grads, axis=0), (values[-1], logits[-1])
      mean_logits = jnp.mean(logits, axis=0)
      return jnp.mean(grads, axis=0), (loss(mean_logits), mean_logits)

    return gradient


def eot(attack: core.AttackFn, samples: int = 20, judge_one_draw: bool = False) -> core.AttackFn:
  """Makes a gradient attack average over ``samples`` draws of a :class:`Randomized` model.

  Args:
    attack: a gradient attack, e.g. ``attacks.apgd(...)`` or ``attacks.pgd(...)``.
    samples: draws per iterate (20 in AutoAttack's ``rand`` version); memory
      grows with it (the draws are vectorised).
    judge_one_draw: a gradient attack judges its steps and successes on the
      last draw, as AutoAttack's ``rand`` version does, instead of the mean
      logits (a steadier choice of the best iterate).

  Returns:
    An attack with ``attack``'s settings, named ``eot-<name>``; called with a
    :class:`Randomized` model it runs on its :class:`Expectation` (gradients
    averaged over ``samples`` draws, success judged on one; score-based attacks
    rank by the mean logits), with any other ``logits_fn`` it is ``attack``.

  Raises:
    InputError: for a bad ``samples`` or something that is not an attack.
  """
  if not isinstance(attack, core.AttackFn):
    raise InputError(f"eot wraps an attack (e.g. attacks.pgd(...)), got {type(attack).__name__}")
  core.check_positive_int(samples, "samples")

  def run(logits_fn, x, y, key, eps, target):
    if not isinstance(logits_fn, Randomized):
      return attack.run(logits_fn, x, y, key, eps, target)
    attack_key, draw_key = jax.random.split(key)
    view = Expectation(logits_fn, draw_key, samples, judge_one_draw)
    return attack.run(view, x, y, attack_key, eps, target)

  return core.derived_attack(attack, run, f"eot-{attack.name}")

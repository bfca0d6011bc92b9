"""Gradients from a stand-in: BPDA for a preprocessing step, transfer from another model.

* :func:`bpda`: Backward Pass Differentiable Approximation (Athalye, Carlini and
  Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018). A
  non-differentiable or gradient-masking step (quantization, JPEG, a denoiser)
  runs as it is in the forward pass; its gradient is that of a differentiable
  approximation (the identity by default: the straight-through estimator).
* :func:`transfer`: a transfer attack (Papernot et al. 2017): an attack runs on a
  surrogate model's gradients and its points are judged on the target model.

Example::

  quantize = lambda x: jnp.round(x * 4) / 4
  logits_fn = lambda x: model(attacks.bpda(quantize)(x))   # attackable by PGD
  attack = attacks.transfer(attacks.pgd(eps=0.3), surrogate_fn)
  x_adv = attack(target_fn, x, y, key)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from attacks import core
from robustlib.checks import InputError


def bpda(
    forward: Callable[[jax.Array], jax.Array],
    backward: Callable[[jax.Array], jax.Array] | None = None) -> Callable[[jax.Array], jax.Array]:
  """``forward`` with the gradient of ``backward`` (BPDA; Athalye et al. 2018).

  Args:
    forward: the step as deployed, ``x -> forward(x)`` (any shapes).
    backward: a differentiable approximation with ``forward``'s input and output
      shapes; None for the identity (straight-through; ``forward`` must then keep
      its input's shape).

  Returns:
    ``f`` with ``f(x) == forward(x)`` and ``vjp(f) == vjp(backward)`` at ``x``.

  Raises:
    InputError: if ``forward`` or ``backward`` is not callable.
  """
  if not callable(forward) or (backward is not None and not callable(backward)):
    raise InputError("bpda takes the forward step and optionally its differentiable "
                     "approximation, both callables")
  approximation = (lambda x: x) if backward is None else backward

  @jax.custom_vjp
  def f(x):
    return forward(x)

  def f_fwd(x):
    return forward(x), x

  def f_bwd(x, cotangent):
    return jax.vjp(approximation, x)[1](cotangent)

  f.defvjp(f_fwd, f_bwd)
  return f


def transfer(attack: core.AttackFn, surrogate: core.LogitsFn) -> core.AttackFn:
  """``attack`` run on ``surrogate``'s gradients (and scores), judged on the model called.

  Per example the result is the surrogate's point where it fools the target
  model or where ``x`` itself does not, else ``x`` (never less adversarial than
  ``x`` on the target, as every attack).

  Args:
    attack: any attack (`attacks.pgd`, `attacks.autoattack`, ...).
    surrogate: ``[N, ...] -> [N, K]`` with the target's input shape and classes.

  Returns:
    An attack named ``transfer-<name>`` with ``attack``'s settings.

  Raises:
    InputError: for something that is not an attack or a surrogate that is not callable.
  """
  if not isinstance(attack, core.AttackFn):
    raise InputError(f"transfer wraps an attack (e.g. attacks.pgd(...)), got "
                     f"{type(attack).__name__}")
  if not callable(surrogate):
    raise InputError(f"the surrogate must be a logits_fn, got {type(surrogate).__name__}")

  def run(logits_fn, x, y, key, eps, target):
    x_adv = attack.run(surrogate, x, y, key, eps, target)
    fools = core.is_adversarial(logits_fn(x_adv), y, target)
    keep = fools | ~core.is_adversarial(logits_fn(x), y, target)
    return jnp.where(core.expand(keep, x), x_adv, x)

  return core.derived_attack(attack, run, f"transfer-{attack.name}")

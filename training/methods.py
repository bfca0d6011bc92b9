"""Robust training objectives, each a pure loss built from ``attacks`` and ``verify``.

`make_loss(method, robust)` builds the loss from the ``robust`` section of a
training config (``training/configs/default.py`` lists its fields), with the
signature of `training.steps.LossFn`:
``loss_fn(apply_fn, variables, x, y, key, step) -> (loss, (metrics, batch_stats))``.
Attacks and bounds run inside the same jitted train step (no host round trip).
The attack and the bounds see the model in inference mode (BatchNorm with its
running statistics); the clean forward pass is the model in training mode.

Methods:
  * ``standard``: cross-entropy.
  * ``pgd``: PGD adversarial training (Madry et al. 2018): cross-entropy at
    ``attacks.pgd``'s point, epsilon following the schedule.
  * ``trades``: TRADES (Zhang et al. 2019): ``CE(z, y) + beta KL(p(x) || p(x'))``
    with ``x'`` maximising the KL term by PGD.
  * ``ibp``: IBP training (Gowal et al. 2018): ``kappa CE(z, y) + (1 - kappa)
    CE(z_hat, y)``, ``z_hat`` the worst-case logits from IBP margin bounds with
    the specification folded into the last layer (elision).
  * ``crown_ibp``: CROWN-IBP (Zhang et al. 2020): margin bounds
    ``beta CROWN-IBP + (1 - beta) IBP``, ``beta`` going from 1 to 0 during the ramp.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

import attacks
import verify
from training import schedules
from training.steps import LossFn, standard_loss

METHODS = ("standard", "pgd", "trades", "ibp", "crown_ibp")


def check(c: ml_collections.ConfigDict, method: str, num_steps: int | None = None) -> None:
  """Raises ValueError for values that would fail (or mean nothing) only later in training.

  Args:
    c: the ``robust`` section of a training config.
    method: one of `METHODS`.
    num_steps: the run's length; the epsilon ramp must end within it.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  for field in ("eps", "eval_eps"):
    if not float(c[field]) >= 0:
      raise ValueError(f"robust.{field} must be >= 0, got {c[field]}")
  if method != "standard" and not float(c.eps) > 0:
    raise ValueError(f"method {method!r} needs robust.eps > 0, got {c.eps}")
  for field in ("warmup_steps", "ramp_steps"):
    if int(c[field]) < 0:
      raise ValueError(f"robust.{field} must be >= 0, got {c[field]}")
  for field in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
    if not 0.0 <= float(c[field]) <= 1.0:
      raise ValueError(f"robust.{field} must lie in [0, 1], got {c[field]}")
  ramp_end = int(c.warmup_steps) + int(c.ramp_steps)
  if method != "standard" and num_steps is not None and ramp_end > int(num_steps):
    raise ValueError(f"the epsilon schedule ends at step {ramp_end} (warmup_steps + ramp_steps), "
                     f"after training ends (num_steps={num_steps})")
  if c.schedule not in schedules.KINDS:
    raise ValueError(f"robust.schedule must be one of {schedules.KINDS}, got {c.schedule!r}")
  if method in ("pgd", "trades") and int(c.attack_steps) < 1:
    raise ValueError(f"robust.attack_steps must be >= 1, got {c.attack_steps}")
  if float(c.attack_step_size) < 0:
    raise ValueError(f"robust.attack_step_size must be >= 0, got {c.attack_step_size}")
  if float(c.trades_beta) < 0:
    raise ValueError(f"robust.trades_beta must be >= 0, got {c.trades_beta}")
  if not 0.0 <= float(c.ema_decay) < 1.0:
    raise ValueError(f"robust.ema_decay must lie in [0, 1), got {c.ema_decay}")


class Coefficients:
  """The schedules of one run: ``eps(step)``, ``kappa(step)``, ``beta(step)``."""

  def __init__(self, c: ml_collections.ConfigDict):
    begin = int(c.warmup_steps)
    finish = begin + int(c.ramp_steps)
    self.eps = schedules.ramp(0.0, float(c.eps), begin, finish, c.schedule)
    self.kappa = schedules.ramp(float(c.kappa_start), float(c.kappa_end), begin, finish)
    self.beta = schedules.ramp(float(c.beta_start), float(c.beta_end), begin, finish)


def _inference_fn(apply_fn, variables) -> Callable[[jax.Array], jax.Array]:
  return lambda z: apply_fn(variables, z, train=False)


def _clean(apply_fn, variables, x, y, key):
  """Training-mode logits, cross-entropy and the updated batch statistics."""
  logits, updates = apply_fn(variables,
                             x,
                             train=True,
                             mutable=["batch_stats"],
                             rngs={"dropout": key})
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return logits, ce, updates.get("batch_stats", variables.get("batch_stats", {}))


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def worst_case_cross_entropy(margin_lower: jax.Array) -> jax.Array:
  """``CE(z_hat, y)`` per example from lower bounds ``[N, K-1]`` on ``z_y - z_j``.

  The worst-case logits are ``z_hat_y = 0``, ``z_hat_j = -margin_lower_j``, so the
  loss is ``log(1 + sum_j exp(-margin_lower_j))``.
  """
  zeros = jnp.zeros(margin_lower.shape[:1] + (1,), margin_lower.dtype)
  return jax.nn.logsumexp(jnp.concatenate([zeros, -margin_lower], axis=1), axis=1)


def make_pgd(c: ml_collections.ConfigDict, coef: Coefficients) -> LossFn:
  step_size = float(c.attack_step_size) or None
  attack = attacks.pgd(eps=float(c.eps), steps=int(c.attack_steps), step_size=step_size)

  def loss_fn(apply_fn, variables, x, y, key, step):
    eps = coef.eps(step)
    k_attack, k_model = jax.random.split(key)
    frozen = jax.lax.stop_gradient(variables)
    x_adv = jax.lax.stop_gradient(attack(_inference_fn(apply_fn, frozen), x, y, k_attack, eps=eps))
    logits, loss, batch_stats = _clean(apply_fn, variables, x_adv, y, k_model)
    metrics = {"loss": loss, "adv_accuracy": _accuracy(logits, y), "eps": eps}
    return loss, (metrics, batch_stats)

  return loss_fn


def make_trades(c: ml_collections.ConfigDict, coef: Coefficients) -> LossFn:
  step_size = float(c.attack_step_size) or None
  beta = float(c.trades_beta)

  def loss_fn(apply_fn, variables, x, y, key, step):
    eps = coef.eps(step)
    k_attack, k_model = jax.random.split(key)
    frozen = jax.lax.stop_gradient(variables)
    logits, ce, batch_stats = _clean(apply_fn, variables, x, y, k_model)
    p_clean = jax.lax.stop_gradient(jax.nn.softmax(logits))

    def kl_to_clean(adv_logits, labels, target=None):
      del labels, target
      return jnp.sum(p_clean * (jnp.log(p_clean + 1e-12) - jax.nn.log_softmax(adv_logits)), -1)

    attack = attacks.pgd(eps=float(c.eps),
                         steps=int(c.attack_steps),
                         step_size=step_size,
                         loss=kl_to_clean)
    x_adv = jax.lax.stop_gradient(attack(_inference_fn(apply_fn, frozen), x, y, k_attack, eps=eps))
    adv_logits = apply_fn(variables, x_adv, train=False)
    kl = jnp.sum(
        jax.nn.softmax(logits) * (jax.nn.log_softmax(logits) - jax.nn.log_softmax(adv_logits)),
        -1).mean()
    loss = ce + beta * kl
    metrics = {
        "loss": loss,
        "accuracy": _accuracy(logits, y),
        "adv_accuracy": _accuracy(adv_logits, y),
        "kl": kl,
        "eps": eps
    }
    return loss, (metrics, batch_stats)

  return loss_fn


def make_bound_loss(method: str, c: ml_collections.ConfigDict, coef: Coefficients) -> LossFn:
  """IBP (``method="ibp"``) or CROWN-IBP (``"crown_ibp"``) certified training."""

  def loss_fn(apply_fn, variables, x, y, key, step):
    eps, kappa = coef.eps(step), coef.kappa(step)
    logits, ce, batch_stats = _clean(apply_fn, variables, x, y, key)
    fn = _inference_fn(apply_fn, variables)
    margins = verify.margin_bounds(fn, x, y, eps, method="ibp")
    metrics = {}
    if method == "crown_ibp":
      beta = coef.beta(step)
      tight = jax.lax.cond(beta > 0, lambda: verify.margin_bounds(fn, x, y, eps, "crown_ibp"),
                           lambda: margins)
      margins = beta * tight + (1.0 - beta) * margins
      metrics["beta"] = beta
    robust = worst_case_cross_entropy(margins).mean()
    loss = kappa * ce + (1.0 - kappa) * robust
    metrics.update(loss=loss,
                   accuracy=_accuracy(logits, y),
                   robust_loss=robust,
                   verified=jnp.mean(jnp.all(margins > 0, axis=1)),
                   eps=eps,
                   kappa=kappa)
    return loss, (metrics, batch_stats)

  return loss_fn


def make_loss(method: str, robust: ml_collections.ConfigDict) -> LossFn:
  """The loss of ``method`` with the hyper-parameters of the ``robust`` config section."""
  check(robust, method)
  coef = Coefficients(robust)
  if method == "standard":
    return standard_loss
  if method == "pgd":
    return make_pgd(robust, coef)
  if method == "trades":
    return make_trades(robust, coef)
  return make_bound_loss(method, robust, coef)

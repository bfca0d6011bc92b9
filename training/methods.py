"""Robust training objectives, each a pure loss built from ``attacks`` and ``verify``.

`make_loss(method, robust)` builds the loss from the ``robust`` section of a
training config (``training/configs/default.py`` lists its fields), with the
signature of `training.steps.LossFn`:
``loss_fn(apply_fn, variables, x, y, key, step) -> (loss, (metrics, batch_stats))``.
Attacks and bounds run inside the same jitted train step (no host round trip).
The clean forward pass is the model in training mode; the bounds see the model as it
trains, BatchNorm normalizing with the clean batch's statistics (Shi et al. 2021, as
auto_LiRPA; `training.batch_statistics`); the attacks see it in inference mode
(BatchNorm with its running statistics).

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
  * ``fast_ibp``: fast certified training (Shi et al. 2021): the IBP loss plus, during
    the ramp, regularizers of bound tightness and of the balance of active and
    inactive ReLUs, weighted ``reg_lambda (1 - eps(t) / eps)``; use it with
    ``ibp_init`` (`ibp_init`), the smooth schedule and gradient clipping.
  * ``pvt``: predictor-verifier training (Dvijotham et al. 2018): the IBP loss's form,
    ``kappa CE(z, y) + (1 - kappa) CE(z_hat, y)``, with the margins' lower bounds from the
    Lagrangian dual (`verify.lagrangian_dual`) whose multipliers a verifier network beside
    the model predicts (`robustlib.models.WithVerifier`, ``config.verifier_width``); both
    are trained on the loss. Any predicted multipliers give a valid bound, so the report's
    certified accuracy recomputes them soundly (`verify.lagrangian_dual.certify`).
  * ``cure``: CURE (Moosavi-Dezfooli et al. 2019): cross-entropy plus ``cure_lambda``
    times the curvature regularizer ``||grad l(x + h z) - grad l(x)||^2``, ``z`` the
    sign of the input gradient scaled to unit L2 length and ``h`` ramped from 0 to
    ``cure_h`` (`curvature`); no radius is needed to train.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import attacks
import verify
from training import batch_statistics, schedules
from training.steps import LossFn, standard_loss

METHODS = ("standard", "pgd", "trades", "ibp", "crown_ibp", "fast_ibp", "cure", "pvt")
# Methods that train a verifier beside the model (config.verifier_width > 0).
VERIFIER_METHODS = ("pvt",)
# Methods that train without a radius (robust.eps may be 0).
RADIUS_FREE = ("standard", "cure")


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
    if not 0 <= float(c[field]) < 1:
      raise ValueError(f"robust.{field} must lie in [0, 1): an L-inf radius in pixel units of "
                       f"images in [0, 1] (1 covers the whole box; e.g. 0.3 on MNIST, 8/255 "
                       f"on CIFAR-10), got {c[field]}")
  if method not in RADIUS_FREE and not float(c.eps) > 0:
    raise ValueError(f"method {method!r} needs robust.eps > 0, got {c.eps}")
  if method == "cure" and not (float(c.cure_h) > 0 and float(c.cure_lambda) >= 0):
    raise ValueError(f"robust.cure_h must be > 0 and cure_lambda >= 0, got {c.cure_h} and "
                     f"{c.cure_lambda}")
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
  if float(c.reg_lambda) < 0 or not float(c.reg_tol) > 0:
    raise ValueError(f"robust.reg_lambda must be >= 0 and reg_tol > 0, got {c.reg_lambda} and "
                     f"{c.reg_tol}")
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


def _bounded_fn(apply_fn, variables,
                stats: batch_statistics.Statistics) -> Callable[[jax.Array], jax.Array]:
  """The network the certified losses bound: BatchNorm with the clean batch's statistics
  ``stats`` (from `_clean`), and in float32 under mixed precision (bounds of the bfloat16
  program would carry its rounding allowance at every layer)."""
  return batch_statistics.replay(
      _inference_fn(getattr(apply_fn, "full_precision", apply_fn), variables), stats)


def _clean(apply_fn, variables, x, y, key):
  """Training-mode logits, cross-entropy, the updated running statistics and each
  BatchNorm layer's batch statistics (`training.batch_statistics.record`)."""
  (logits, updates), stats = batch_statistics.record(
      lambda: apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return logits, ce, updates.get("batch_stats", variables.get("batch_stats", {})), stats


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
    logits, loss, batch_stats, _ = _clean(apply_fn, variables, x_adv, y, k_model)
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
    logits, ce, batch_stats, _ = _clean(apply_fn, variables, x, y, k_model)
    p_clean = jax.lax.stop_gradient(jax.nn.softmax(logits))

    def kl_to_clean(adv_logits, labels, target=None):
      del labels, target
      return jnp.sum(p_clean * (jnp.log(p_clean + 1e-12) - jax.nn.log_softmax(adv_logits)), -1)

    attack = attacks.pgd(eps=float(c.eps),
                         steps=int(c.attack_steps),
                         step_size=step_size,
                         loss=kl_to_clean)
    x_adv = jax.lax.stop_gradient(attack(_inference_fn(apply_fn, frozen), x, y, k_attack, eps=eps))
    # In training mode, as the clean pass (Zhang et al.'s code: model.train() for both): one
    # BatchNorm mode on both sides of the KL, so x' = x gives 0.
    updated = variables | ({"batch_stats": batch_stats} if batch_stats else {})
    adv_logits, _, batch_stats, _ = _clean(apply_fn, updated, x_adv, y, k_model)
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


def _dual_margins(apply_fn, variables, fn, x, y, eps) -> jax.Array:
  """Margins' lower bounds ``[N, K - 1]`` by the Lagrangian dual at the multipliers the
  model's verifier predicts (`robustlib.models.WithVerifier.duals`)."""
  raw = getattr(apply_fn, "full_precision", apply_fn)
  verifier = lambda f: raw(variables, f, method="duals")
  box = verify.linf_ball(x, eps)
  num_classes = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[1]
  return verify.lagrangian_dual(fn, box, verify.margin_spec(y, num_classes), verifier, x)


def make_bound_loss(method: str,
                    c: ml_collections.ConfigDict,
                    coef: Coefficients,
                    auxiliary: bool = True,
                    regularizer: Callable | None = None) -> LossFn:
  """IBP (``method="ibp"``), CROWN-IBP (``"crown_ibp"``) or predictor-verifier (``"pvt"``)
  certified training.

  ``auxiliary=False`` leaves CROWN-IBP's own bounds out (exact where ``beta`` or
  ``eps`` is 0, see `auxiliary_steps`). ``regularizer(fn, x, step) -> (weight, term)``
  adds ``weight * term`` to the loss, ``fn`` being the bounded network.
  """

  def loss_fn(apply_fn, variables, x, y, key, step):
    eps, kappa = coef.eps(step), coef.kappa(step)
    logits, ce, batch_stats, stats = _clean(apply_fn, variables, x, y, key)
    fn = _bounded_fn(apply_fn, variables, stats)
    metrics = {}
    if method == "pvt":
      margins = _dual_margins(apply_fn, variables, fn, x, y, eps)
    else:
      margins = verify.margin_bounds(fn, x, y, eps, method="ibp")
    if method == "crown_ibp":
      beta = coef.beta(step)
      if auxiliary:
        tight = verify.margin_bounds(fn, x, y, eps, "crown_ibp")
        margins = beta * tight + (1.0 - beta) * margins
      metrics["beta"] = beta
    robust = worst_case_cross_entropy(margins).mean()
    loss = kappa * ce + (1.0 - kappa) * robust
    if regularizer is not None:
      weight, term = regularizer(fn, x, step)
      loss = loss + weight * term
      metrics["regularizer"] = term
    metrics.update(loss=loss,
                   accuracy=_accuracy(logits, y),
                   robust_loss=robust,
                   verified=jnp.mean(jnp.all(margins > 0, axis=1)),
                   eps=eps,
                   kappa=kappa)
    return loss, (metrics, batch_stats)

  return loss_fn


def warmup_regularizer(pre_activations: list[verify.Interval],
                       input_box: verify.Interval,
                       tol: float,
                       input_std: float | tuple[float, ...] = 1.0) -> jax.Array:
  """Shi et al. 2021's warm-up regularizer ``L_tightness + L_relu`` (a scalar).

  For each ReLU layer with pre-activation bounds ``[l, u]`` (centre ``c``, radius
  ``r``): tightness ``relu(tol - mean(r_input) / mean(r)) / tol``, which keeps the
  bounds from growing layer by layer; and balance ``(relu(tol - m) + relu(tol - v)) / tol``
  with ``m`` and ``v`` the ratios (at most 1, either way round) of the mean centre
  and of the spread of the centres of active (``l > 0``) and inactive (``u < 0``)
  neurons, which keeps IBP from killing most ReLUs. Averaged over layers.

  Args:
    pre_activations: bounds of each ReLU's input (`verify.relu_input_bounds`).
    input_box: the input box, in pixels.
    tol: the tolerance ``tau``.
    input_std: the per-channel (last axis) standard deviation by which the model
      normalizes its input: the tightness compares the ReLUs' radii with the input's
      radius at the normalized input, where Shi et al. measure it (at IBP
      initialization the ratio is then about 1 and the term about 0).
  """
  if not pre_activations:
    return jnp.zeros(())
  tight_0 = jnp.mean(input_box.radius / jnp.asarray(input_std, input_box.radius.dtype))
  total = jnp.zeros(())
  for b in pre_activations:
    c, r = b.center, b.radius
    total += jax.nn.relu(tol - tight_0 / jnp.maximum(jnp.mean(r), 1e-12)) / tol
    active, inactive = b.lower > 0, b.upper < 0
    spread = (c - jnp.mean(c))**2
    mean_inactive, var_inactive = jnp.mean(c * inactive), jnp.sum(spread * inactive)
    # Undefined without inactive neurons: the term is left out (with finite gradients).
    defined = (mean_inactive < 0) & (var_inactive > 0)
    mean_ratio = jnp.mean(c * active) / jnp.where(defined, -mean_inactive, 1.0)
    var_ratio = jnp.sum(spread * active) / jnp.where(defined, var_inactive, 1.0)
    mean_ratio = jnp.minimum(mean_ratio, 1.0 / jnp.maximum(mean_ratio, 1e-12))
    var_ratio = jnp.minimum(var_ratio, 1.0 / jnp.maximum(var_ratio, 1e-12))
    balance = (jax.nn.relu(tol - mean_ratio) + jax.nn.relu(tol - var_ratio)) / tol
    total += jnp.where(defined, balance, 0.0)
  return total / len(pre_activations)


def _regularizer_weight(c: ml_collections.ConfigDict, coef: Coefficients, step) -> jax.Array:
  return float(c.reg_lambda) * (1.0 - coef.eps(step) / float(c.eps))


def make_fast_ibp(c: ml_collections.ConfigDict,
                  coef: Coefficients,
                  auxiliary: bool = True,
                  input_std: float | tuple[float, ...] = 1.0) -> LossFn:
  """Fast certified training; ``auxiliary=False`` leaves the warm-up regularizer out (exact
  where its weight is 0, see `auxiliary_steps`); ``input_std`` as in
  `warmup_regularizer`."""
  tol = float(c.reg_tol)

  def regularizer(fn, x, step):
    if not auxiliary:
      return 0.0, jnp.zeros(())
    box = verify.linf_ball(x, coef.eps(step))
    pre = verify.relu_input_bounds(fn, box)
    return _regularizer_weight(c, coef, step), warmup_regularizer(pre, box, tol, input_std)

  return make_bound_loss("ibp", c, coef, regularizer=regularizer)


def curvature(fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array,
              h: jax.Array) -> jax.Array:
  """CURE's curvature regularizer (Moosavi-Dezfooli et al. 2019, Eq. 7): per example
  ``||grad l(x + h z) - grad l(x)||^2`` ``[N]``, ``l`` the cross-entropy, ``z`` the sign of
  ``grad l(x)`` scaled to unit L2 length (held constant): a finite difference of the
  gradient along the direction of steepest L-inf ascent, which is large where the loss
  surface is curved. Differentiable in ``fn``'s parameters (double back-propagation)."""

  def input_gradient(z):
    return jax.grad(lambda v: optax.softmax_cross_entropy_with_integer_labels(fn(v), y).sum())(z)

  g = input_gradient(x)
  direction = jax.lax.stop_gradient(jnp.sign(g))
  flat = direction.reshape(direction.shape[0], -1)
  norms = jnp.linalg.norm(flat, axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
  z = direction / jnp.maximum(norms, 1e-12)
  diff = (input_gradient(x + h * z) - g).reshape(x.shape[0], -1)
  return jnp.sum(jnp.square(diff), axis=1)


def make_cure(c: ml_collections.ConfigDict) -> LossFn:
  """CURE: training-mode cross-entropy plus ``cure_lambda`` times the mean `curvature` of the
  inference-mode model (as the authors' code), ``h`` ramped over the robust schedule's
  warm-up and ramp from 0 to ``cure_h`` (an L2 length in pixels)."""
  h_of = schedules.ramp(0.0, float(c.cure_h), int(c.warmup_steps),
                        int(c.warmup_steps) + int(c.ramp_steps))
  weight = float(c.cure_lambda)

  def loss_fn(apply_fn, variables, x, y, key, step):
    logits, ce, batch_stats, _ = _clean(apply_fn, variables, x, y, key)
    h = h_of(step)
    reg = jnp.mean(curvature(_inference_fn(apply_fn, variables), x, y, h))
    loss = ce + weight * reg
    metrics = {"loss": loss, "accuracy": _accuracy(logits, y), "curvature": reg, "h": h}
    return loss, (metrics, batch_stats)

  return loss_fn


def ibp_init(params: dict, key: jax.Array, skip: tuple[str, ...] = ()) -> dict:
  """Shi et al. 2021's IBP initialization of a Flax parameter tree.

  Every ``kernel`` but the last one created (the output layer) is redrawn from
  ``N(0, 2 pi / fan_in**2)``, so that interval bounds keep their size from layer
  to layer at initialization; biases and normalization parameters are kept.

  Args:
    params: ``variables["params"]`` (dicts in creation order, as Flax builds them).
    key: PRNG key.
    skip: names of top-level subtrees left as they are (a learned verifier's).
  """
  paths = []

  def walk(tree, path):
    for name, value in tree.items():
      if isinstance(value, dict):
        walk(value, path + (name,))
      elif name == "kernel" and getattr(value, "ndim", 0) >= 2:
        paths.append(path + (name,))

  walk({k: v for k, v in params.items() if k not in skip}, ())

  def redraw(tree, path, k):
    if not path:
      fan_in = int(np.prod(tree.shape[:-1]))
      return jax.random.normal(k, tree.shape, tree.dtype) * (np.sqrt(2 * np.pi) / fan_in)
    return {**tree, path[0]: redraw(tree[path[0]], path[1:], k)}

  for i, path in enumerate(paths[:-1]):
    params = redraw(params, path, jax.random.fold_in(key, i))
  return params


def make_loss(method: str,
              robust: ml_collections.ConfigDict,
              auxiliary: bool = True,
              input_std: float | tuple[float, ...] = 1.0) -> LossFn:
  """The loss of ``method`` with the hyper-parameters of the ``robust`` config section.

  Args:
    method: one of `METHODS`.
    robust: the ``robust`` config section.
    auxiliary: for ``crown_ibp`` and ``fast_ibp``, whether the loss computes its
      scheduled auxiliary term (CROWN-IBP's bounds; the warm-up regularizer). A
      loss without it is exact at the steps where the term's weight is 0, as
      `auxiliary_steps` gives them, and much cheaper: a trainer switches between
      the two jitted steps from the host rather than branching with ``lax.cond``
      inside one (on XLA's CPU backend, differentiating a bound computation inside a
      conditional ran about 7 times slower).
    input_std: the data set's per-channel standard deviation, by which the model
      normalizes its input (`warmup_regularizer`; ``fast_ibp`` only).
  """
  check(robust, method)
  coef = Coefficients(robust)
  if method == "standard":
    return standard_loss
  if method == "pgd":
    return make_pgd(robust, coef)
  if method == "trades":
    return make_trades(robust, coef)
  if method == "fast_ibp":
    return make_fast_ibp(robust, coef, auxiliary, input_std)
  if method == "cure":
    return make_cure(robust)
  return make_bound_loss(method, robust, coef, auxiliary)


def auxiliary_steps(method: str, robust: ml_collections.ConfigDict,
                    num_steps: int) -> np.ndarray | None:
  """Bool ``[num_steps]``: at which steps (``state.step`` before the update) the auxiliary term
  of ``make_loss(method, robust)`` has a nonzero weight; None for methods without one.

  ``crown_ibp``: ``beta > 0`` and ``eps > 0`` (at ``eps = 0`` IBP's and CROWN-IBP's
  margins are both exact). ``fast_ibp``: ``reg_lambda (1 - eps(t) / eps) > 0``.
  """
  if method not in ("crown_ibp", "fast_ibp"):
    return None
  coef = Coefficients(robust)
  steps = jnp.arange(num_steps)
  if method == "crown_ibp":
    active = (jax.vmap(coef.beta)(steps) > 0) & (jax.vmap(coef.eps)(steps) > 0)
  else:
    active = jax.vmap(lambda t: _regularizer_weight(robust, coef, t))(steps) > 0
  return np.asarray(active)

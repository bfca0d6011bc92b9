"""Optimizers and learning-rate schedules from plain config values."""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "piecewise")


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
  """A learning-rate schedule over ``num_steps`` steps, with optional linear warm-up.

  Args:
    cfg: the ``optimizer`` section of a training config.
    num_steps: total training steps.
  """
  lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
  if not 0 < lr < float("inf"):
    raise ValueError(f"learning_rate must be a positive number, got {cfg.learning_rate}")
  if not float(cfg.decay_factor) > 0:
    raise ValueError(f"decay_factor must be > 0, got {cfg.decay_factor}")
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {SCHEDULES}")
  if not 0 <= warmup < max(num_steps, 1):
    raise ValueError(f"warmup_steps must be in [0, num_steps), got {warmup}")
  decay_steps = max(num_steps - warmup, 1)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    boundaries = {int(f * num_steps) - warmup: float(cfg.decay_factor) for f in cfg.decay_boundaries}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """The optimizer described by a config's ``optimizer`` section.

  ``weight_decay`` is an L2 penalty added to the gradient for sgd and adam, and
  decoupled decay for adamw; ``grad_clip_norm > 0`` clips the global norm first.
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
  for field in ("weight_decay", "grad_clip_norm"):
    if not float(cfg[field]) >= 0:
      raise ValueError(f"{field} must be >= 0 (0: none), got {cfg[field]}")
  if not 0 <= float(cfg.momentum) < 1:
    raise ValueError(f"momentum must lie in [0, 1), got {cfg.momentum}")
  schedule = make_schedule(cfg, num_steps)
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  if cfg.name == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=float(cfg.weight_decay)))
  else:
    if cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
    if cfg.name == "sgd":
      parts.append(
          optax.sgd(schedule, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)))
    else:
      parts.append(optax.adam(schedule))
  return optax.chain(*parts)

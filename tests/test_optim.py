"""Optimizers and schedules are built from plain config values."""

import jax.numpy as jnp
import optax
import pytest

from training import optim
from training.configs import default


def _cfg(**overrides):
  cfg = default.get_config().optimizer
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def test_piecewise_schedule_decays_at_the_boundaries():
  schedule = optim.make_schedule(_cfg(schedule="piecewise", learning_rate=1.0), 100)
  assert [float(schedule(s)) for s in (0, 49, 51, 74, 76, 99)
         ] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
  schedule = optim.make_schedule(_cfg(warmup_steps=10, learning_rate=2.0), 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(1.0)
  assert float(schedule(10)) == pytest.approx(2.0)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_takes_a_descent_step(name):
  tx = optim.make_optimizer(
      _cfg(name=name, schedule="constant", weight_decay=1e-4, grad_clip_norm=1.0), 10)
  params = {"w": jnp.array([3.0, -2.0])}
  loss = lambda p: jnp.sum(p["w"]**2)
  updates, _ = tx.update({"w": 2 * params["w"]}, tx.init(params), params)
  assert float(loss(optax.apply_updates(params, updates))) < float(loss(params))


@pytest.mark.parametrize("overrides, message", [
    ({
        "name": "rmsprop"
    }, "unknown optimizer"),
    ({
        "schedule": "exponential"
    }, "unknown schedule"),
    ({
        "warmup_steps": 100
    }, "warmup_steps"),
])
def test_bad_optimizer_settings_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(_cfg(**overrides), 100)

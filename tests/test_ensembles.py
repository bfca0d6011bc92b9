"""Ensembles (Grefenstette et al. 2018) as one model: the mean of independently initialized
members' logits, bounded soundly by IBP and CROWN, trained jointly and loaded as one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import verify
from robustlib import checkpoints, models
from training import trainer
from training.configs import digits_pgd_ensemble


def test_an_ensemble_is_the_mean_of_its_independent_members():
  ensemble = models.create("cnn_small", num_classes=10, input_shape=(28, 28, 1), ensemble=3)
  single = models.create("cnn_small", num_classes=10, input_shape=(28, 28, 1))
  variables = models.init(ensemble, jax.random.PRNGKey(0), (28, 28, 1))
  assert sorted(variables["params"]) == ["member_0", "member_1", "member_2"]
  kernels = [variables["params"][f"member_{i}"]["Conv_0"]["kernel"] for i in range(3)]
  assert not np.allclose(kernels[0], kernels[1])
  x = jax.random.uniform(jax.random.PRNGKey(1), (5, 28, 28, 1))
  members = [single.apply({"params": variables["params"][f"member_{i}"]}, x) for i in range(3)]
  np.testing.assert_allclose(ensemble.apply(variables, x), sum(members) / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_of_an_ensemble_hold_at_sampled_points(method):
  ensemble = models.create("mlp", num_classes=10, input_shape=(8, 8, 1), hidden=(16,), ensemble=3)
  variables = models.init(ensemble, jax.random.PRNGKey(0), (8, 8, 1))
  fn = lambda z: ensemble.apply(variables, z)
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1))
  box = verify.linf_ball(x, 0.05)
  bounds = getattr(verify, method)(fn, box)
  for k in range(20):
    z = jax.random.uniform(jax.random.PRNGKey(k), x.shape, minval=box.lower, maxval=box.upper)
    out = fn(z)
    assert bool(jnp.all(out >= bounds.lower - 1e-5) & jnp.all(out <= bounds.upper + 1e-5))
  assert float(jnp.mean(bounds.upper - bounds.lower)) > 0


def test_an_ensemble_trains_end_to_end_and_loads_as_one_model(tmp_path):
  report = trainer.train_and_evaluate(digits_pgd_ensemble.get_config("tiny"), str(tmp_path))
  assert "pgd_accuracy" in report and "verified_accuracy" in report
  _, model, variables = checkpoints.load_run(str(tmp_path))
  assert isinstance(model, models.Ensemble) and model.size == 2
  assert sorted(variables["params"]) == ["member_0", "member_1"]


@pytest.mark.parametrize("size", [0, -1])
def test_bad_ensemble_sizes_are_errors(size, tmp_path):
  config = digits_pgd_ensemble.get_config("tiny")
  config.ensemble = size
  with pytest.raises(trainer.ConfigError, match="config.ensemble must be a number of members"):
    trainer.train_and_evaluate(config, str(tmp_path))
  for bad in (size, 1.5, True):
    with pytest.raises(ValueError, match="ensemble must be a number of members >= 1"):
      models.create("mlp", num_classes=10, input_shape=(8, 8, 1), ensemble=bad)

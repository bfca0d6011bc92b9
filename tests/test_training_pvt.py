"""Predictor-verifier training (Dvijotham et al. 2018) on the digits: the classifier and its
learned verifier train end to end, and the certified accuracy the report gives is recomputed
soundly from the predicted duals, never above the attack's and checked against CROWN's."""

import jax.numpy as jnp
import numpy as np
import pytest

import attacks
import verify
import verify.runs
from robustlib import checkpoints, data, models
from robustlib.checks import InputError
from training import trainer
from training.configs import digits_pvt_mlp


def _config():
  config = digits_pvt_mlp.get_config("tiny")
  config.model_kwargs.hidden = (32,)
  config.verifier_width = 8
  config.num_steps = 200
  config.log_every = config.eval_every = config.checkpoint_every = 200
  config.optimizer.learning_rate = 3e-3
  config.eval_batch_size = 100
  config.robust.eps, config.robust.warmup_steps, config.robust.ramp_steps = 0.06, 10, 120
  config.robust.eval_eps = 0.05
  config.report.verify_methods = ("crown",)
  config.report.num_examples = 100
  config.report.sweep = ()
  return config


def test_pvt_trains_and_reports_a_sound_certified_accuracy(tmp_path):
  report = trainer.train_and_evaluate(_config(), str(tmp_path))
  verified = report["verified_accuracy"]
  assert report["method"] == "pvt" and report["test_accuracy"] > 0.8, report
  assert 0.3 < verified["pvt"] <= report["pgd_accuracy"], report
  assert verified["crown"] <= report["pgd_accuracy"], report
  # On the same model the learned duals are not far from CROWN's bound.
  assert verified["pvt"] >= verified["crown"] - 0.1, report

  config, model, variables = checkpoints.load_run(str(tmp_path))
  assert isinstance(model, models.WithVerifier) and "verifier" in variables["params"]
  test = data.load("digits", "test")
  x, y = jnp.asarray(test.images[:100]), jnp.asarray(test.labels[:100])
  fn = lambda z: model.apply(variables, z)
  verifier = lambda f: model.apply(variables, f, method="duals")
  flags = np.asarray(verify.lagrangian_dual.certify(fn, x, y, 0.05, verifier))
  assert float(flags.mean()) == pytest.approx(verified["pvt"])
  adv = attacks.pgd(eps=0.05, steps=50)(fn, x, y, np.uint32([0, 1]))
  assert not np.any(flags & np.asarray(jnp.argmax(fn(adv), axis=1) != y))

  # python -m verify.certify --method=pvt recomputes the same flags from the run.
  content = verify.runs.certify_run(str(tmp_path), methods="pvt", eps=[0.05], num_examples=100)
  clean = np.asarray(content["clean_flags"], bool)
  np.testing.assert_array_equal(np.asarray(content["verified_flags"]["pvt"][0], bool),
                                flags & clean)
  with pytest.raises(InputError, match="method pvt certifies with a learned verifier"):
    verify.runs.certified_flags(fn, np.asarray(x), np.asarray(y), [0.05], "pvt")


@pytest.mark.parametrize("method, width", [("pvt", 0), ("ibp", 8)])
def test_a_verifier_width_that_does_not_fit_the_method_is_a_config_error(method, width, tmp_path):
  config = _config()
  config.method, config.verifier_width = method, width
  with pytest.raises(trainer.ConfigError, match="verifier_width"):
    trainer.train_and_evaluate(config, str(tmp_path))

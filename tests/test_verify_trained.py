"""Certification of a model trained with the training loop (``training.trainer``).

An MLP (two hidden layers of 64) is trained with IBP on the embedded digits for
300 steps (a few seconds). On its 359 test images, at every radius tested:
verified (any method) <= accuracy under PGD <= clean accuracy, point by point;
CROWN certifies at least as many points as IBP; alpha-CROWN certifies every
point CROWN does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
import verify
from robustlib import as_logits_fn, checkpoints, data
from training import trainer
from training.configs import digits_mlp

EPS = (0.0, 0.01, 0.02, 0.05, 0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(logits_fn, images, labels)`` of an IBP-trained digits MLP and its test split."""
  workdir = tmp_path_factory.mktemp("digits_ibp")
  config = digits_mlp.get_config("tiny")
  config.model_kwargs.hidden = (64, 64)
  config.num_steps = 300
  config.log_every = config.eval_every = config.checkpoint_every = 300
  config.optimizer.learning_rate = 3e-3
  config.eval_batch_size = 120
  config.method = "ibp"
  config.robust.eps, config.robust.warmup_steps, config.robust.ramp_steps = 0.11, 20, 150
  config.report.enabled = False
  trainer.train_and_evaluate(config, str(workdir))
  _, model, variables = checkpoints.load_run(str(workdir))
  test = data.load("digits", "test")
  return as_logits_fn(model, variables, test.info.input_shape), test.images, test.labels


@pytest.fixture(scope="module")
def flags(trained):
  """Per radius: clean, PGD-robust and verified flags (bool ``[N]``) of every method."""
  logits_fn, x, y = trained
  n = x.shape[0]
  clean = np.asarray(jnp.argmax(logits_fn(x), axis=1) == y)
  attack = attacks.pgd(eps=max(EPS), steps=50, restarts=2, loss="margin")
  out = []
  for i, eps in enumerate(EPS):
    x_adv = attack(logits_fn, x, y, jax.random.key(i), eps=eps)
    robust = clean & np.asarray(jnp.argmax(logits_fn(x_adv), axis=1) == y)
    radius = jnp.full((n,), eps, jnp.float32)  # one compilation per method for every radius
    verified = {
        m: np.asarray(verify.certify(logits_fn, x, y, radius, method=m))
        for m in ("ibp", "crown_ibp", "crown")
    }
    out.append((clean, robust, verified))
  return out


def test_the_model_is_worth_certifying(flags):
  clean, robust, verified = flags[EPS.index(0.05)]
  assert clean.mean() > 0.8
  assert verified["ibp"].mean() > 0.5  # IBP training worked
  assert robust.sum() < clean.sum()  # and PGD finds something to break at larger radii
  assert flags[EPS.index(0.1)][1].sum() < flags[EPS.index(0.1)][0].sum()


@pytest.mark.parametrize("eps", EPS)
def test_verified_within_pgd_robust_within_clean(flags, eps):
  clean, robust, verified = flags[EPS.index(eps)]
  assert np.all(clean[robust])
  for method, v in verified.items():
    assert not np.any(v & ~robust), f"{method} verified a point PGD breaks at eps={eps}"
    assert v.sum() <= robust.sum() <= clean.sum()
  if eps == 0:  # nothing to break: every correctly classified point is verified
    np.testing.assert_array_equal(robust, clean)
    np.testing.assert_array_equal(verified["crown"], clean)


def test_crown_certifies_at_least_as_many_points_as_ibp(flags):
  # Not a theorem point by point (CROWN's bound on a margin can be looser than IBP's), but on
  # a trained model CROWN certifies at least as many points.
  for eps, (_, _, verified) in zip(EPS, flags):
    assert verified["crown"].sum() >= verified["ibp"].sum(), eps
    assert np.all(verified["crown"][verified["ibp"]]), eps  # every IBP-certified point too
  assert any(v["crown"].sum() > v["ibp"].sum() for _, _, v in flags)


def test_alpha_crown_certifies_every_point_crown_does(trained, flags):
  # A theorem: alpha-CROWN's margin bounds are never below CROWN's.
  logits_fn, x, y = trained
  eps = 0.1
  alpha = np.asarray(verify.certify(logits_fn, x, y, eps, method="alpha_crown"))
  crown = flags[EPS.index(eps)][2]["crown"]
  assert np.all(alpha[crown])
  assert alpha.sum() >= crown.sum()

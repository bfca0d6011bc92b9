"""BPDA and transfer attacks (gradients from a stand-in, success judged on the real model), and
custom losses in every attack that ascends one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attack_models
import attacks
from attacks import core
from robustlib.checks import InputError


def quantize(x):
  return jnp.round(x * 4) / 4  # a gradient-masking preprocessing: zero gradient everywhere


def test_bpda_keeps_the_forward_pass_and_takes_the_approximations_gradient():
  x = jnp.linspace(0.0, 1.0, 7)
  f = attacks.bpda(quantize)
  np.testing.assert_array_equal(f(x), quantize(x))
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(quantize(v)))(x), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(f(v)))(x), 1.0)  # straight through
  g = attacks.bpda(quantize, lambda v: 2.0 * v)
  np.testing.assert_array_equal(
      jax.grad(lambda v: jnp.sum(jnp.sin(g(v))))(x), 2.0 * jnp.cos(quantize(x)))


def test_bpda_lets_pgd_break_a_quantized_model():
  logits_fn, x, y = attack_models.digits_mlp()
  eps = 0.3
  masked = lambda v: logits_fn(quantize(v))
  through = lambda v: logits_fn(attacks.bpda(quantize)(v))
  pgd = attacks.pgd(eps=eps, steps=20, step_size=eps / 8, random_start=False)
  key = jax.random.key(0)
  robust = lambda fn, x_adv: np.mean(np.asarray(jnp.argmax(masked(x_adv), 1) == y))
  clean = robust(masked, x)
  assert robust(masked, pgd(masked, x, y, key)) == clean  # zero gradients: PGD is stuck
  x_bpda = pgd(through, x, y, key)
  assert robust(masked, x_bpda) < clean - 0.3  # the same model, attacked through BPDA
  assert float(jnp.max(jnp.abs(x_bpda - x))) <= eps + 1e-6


def test_transfer_attacks_on_the_surrogate_and_judges_on_the_target():
  logits_fn, x, y = attack_models.digits_mlp()
  pgd = attacks.pgd(eps=0.2, steps=10, step_size=0.05)
  key = jax.random.key(0)
  # A surrogate with the same decisions (scaled logits) transfers perfectly.
  same = attacks.transfer(pgd, lambda v: 3.0 * logits_fn(v))
  assert same.name == "transfer-pgd" and same.norm == "linf" and same.eps == 0.2
  direct = np.asarray(jnp.argmax(logits_fn(pgd(logits_fn, x, y, key)), 1) != y)
  transferred = np.asarray(jnp.argmax(logits_fn(same(logits_fn, x, y, key)), 1) != y)
  assert transferred.mean() >= direct.mean() - 0.05 and transferred.mean() > 0.3
  # A surrogate that knows nothing (constant logits, zero gradients) breaks nothing; x stays.
  blind = attacks.transfer(pgd, lambda v: jnp.zeros((v.shape[0], 10)) + 0.0 * jnp.sum(v))
  x_blind = blind(logits_fn, x, y, key)
  fooled = np.asarray(jnp.argmax(logits_fn(x_blind), 1) != y)
  np.testing.assert_array_equal(fooled, np.asarray(jnp.argmax(logits_fn(x), 1) != y))


def test_surrogate_helpers_reject_bad_input():
  with pytest.raises(InputError, match="wraps an attack"):
    attacks.transfer(lambda *a: a, lambda v: v)
  with pytest.raises(InputError, match="surrogate"):
    attacks.transfer(attacks.fgsm(eps=0.1), "model")
  with pytest.raises(InputError, match="callables"):
    attacks.bpda("round")


def _trades_like(logits, y, target=None):
  """A custom loss: the KL divergence from the uniform prediction (any callable works)."""
  del y, target
  return jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), axis=1)


@pytest.mark.parametrize("factory", ["fgsm", "pgd", "apgd", "square", "spsa"])
def test_every_attack_ascends_a_custom_loss(factory):
  # Maximizing the negative entropy makes predictions confident: a loss no built-in one is.
  logits_fn, x, y = attack_models.digits_mlp()
  kwargs = {
      "square": {
          "queries": 100
      },
      "spsa": {
          "steps": 5
      },
      "pgd": {
          "steps": 5
      },
      "apgd": {
          "steps": 5
      }
  }.get(factory, {})
  attack = getattr(attacks, factory)(eps=0.1, loss=_trades_like, **kwargs)
  x_adv = attack(logits_fn, x, y, jax.random.key(0))
  before = _trades_like(logits_fn(x), y)
  after = _trades_like(logits_fn(x_adv), y)
  # Never lower per example (the bookkeeping keeps x unless a point beats it), higher on average.
  fooled_before = np.asarray(jnp.argmax(logits_fn(x), 1) != y)
  fooled_after = np.asarray(jnp.argmax(logits_fn(x_adv), 1) != y)
  same = fooled_after == fooled_before
  assert bool(jnp.all(jnp.where(same, after >= before - 1e-6, True)))
  assert float(jnp.mean(after - before)) > 0.0
  if factory in ("fgsm", "pgd", "apgd"):
    assert attack.name.startswith(factory) and "_trades_like" in attack.name


def test_pgd_warm_starts_from_x_init():
  logits_fn, x, y = attack_models.digits_mlp()
  key = jax.random.key(0)
  strong = attacks.pgd(eps=0.2, steps=20, step_size=0.05)(logits_fn, x, y, key)
  # One step from x breaks less than one step from the strong attack's points: it starts there.
  one = attacks.pgd(eps=0.2, steps=1, step_size=1e-4, random_start=False)
  fooled = lambda v: np.asarray(jnp.argmax(logits_fn(v), 1) != y)
  cold = one(logits_fn, x, y, key)
  warm = one(logits_fn, x, y, key, x_init=strong)
  assert fooled(warm).mean() >= fooled(strong).mean() > fooled(cold).mean() + 0.2
  # A start outside the ball is projected; inside jit too.
  far = one(logits_fn, x, y, key, x_init=x + 5.0)
  assert float(jnp.max(jnp.abs(far - x))) <= 0.2 + 1e-6
  jitted = jax.jit(lambda s: one(logits_fn, x, y, key, x_init=s))(strong)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(warm))


def test_apgd_warm_starts_from_x_init():
  logits_fn, x, y = attack_models.digits_mlp()
  key = jax.random.key(0)
  strong = attacks.pgd(eps=0.2, steps=20, step_size=0.05)(logits_fn, x, y, key)
  fooled = lambda v: np.asarray(jnp.argmax(logits_fn(v), 1) != y)
  one = attacks.apgd(eps=0.2, steps=1)
  warm = one(logits_fn, x, y, key, x_init=strong)
  assert fooled(warm).mean() >= fooled(strong).mean() > fooled(one(logits_fn, x, y, key)).mean()
  with pytest.raises(InputError, match="takes no x_init"):
    attacks.square(eps=0.2, queries=2)(logits_fn, x, y, key, x_init=x)


def test_x_init_misuse_is_a_clear_error():
  logits_fn, x, y = attack_models.digits_mlp()
  with pytest.raises(InputError, match="takes no x_init"):
    attacks.fgsm(eps=0.1)(logits_fn, x, y, jax.random.key(0), x_init=x)
  with pytest.raises(InputError, match="shape of x"):
    attacks.pgd(eps=0.1)(logits_fn, x, y, jax.random.key(0), x_init=x[:2])
  with pytest.raises(InputError, match="NaN"):
    attacks.pgd(eps=0.1)(logits_fn, x, y, jax.random.key(0), x_init=x * np.nan)


@pytest.mark.parametrize("factory", ["apgd-l1", "apgd_t", "multitargeted"])
def test_more_attacks_warm_start_from_x_init(factory):
  logits_fn, x, y = attack_models.digits_mlp()
  key = jax.random.key(0)
  fooled = lambda v: np.asarray(jnp.argmax(logits_fn(v), 1) != y)
  if factory == "apgd-l1":
    eps, norm = 3.0, "l1"
    strong = attacks.apgd(eps=eps, norm=norm, steps=50)(logits_fn, x, y, key)
    one = attacks.apgd(eps=eps, norm=norm, steps=1)
  else:
    eps, norm = 0.1, "linf"
    strong = attacks.pgd(eps=eps, steps=20, step_size=0.025)(logits_fn, x, y, key)
    one = (attacks.apgd_t(eps=eps, steps=1, num_targets=2) if factory == "apgd_t" else
           attacks.multitargeted(eps=eps, steps=1, step_size=1e-4, num_targets=2, restarts=2))
  warm = one(logits_fn, x, y, key, x_init=strong)
  cold = one(logits_fn, x, y, key)
  assert fooled(warm).mean() >= fooled(strong).mean() > fooled(cold).mean() + 0.1
  # A start outside the ball is projected.
  far = one(logits_fn, x, y, key, x_init=jnp.clip(x + 5.0, 0.0, 1.0))
  assert float(jnp.max(core.lp_norm(far - x, norm))) <= eps * (1 + 1e-5)

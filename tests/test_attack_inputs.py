"""Bad input to an attack call is a clear error naming the problem, before any work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
from robustlib.checks import InputError

W = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)


def linear(x):
  return x.reshape(x.shape[0], -1) @ W


def _inputs():
  x = np.random.default_rng(1).uniform(size=(4, 3, 4)).astype(np.float32)
  return x, np.array([0, 1, 2, 3], np.int32)


@pytest.mark.parametrize("factory", [
    lambda: attacks.pgd(eps=0.1, steps=2),
    lambda: attacks.fgsm(eps=0.1),
    lambda: attacks.apgd(eps=0.1, steps=4),
])
@pytest.mark.parametrize("change, match", [
    (dict(eps=-0.1), "eps"),
    (dict(x_shift=0.5), r"\[0(\.0)?, 1(\.0)?\]|box|range"),
    (dict(y=np.array([0, 1, 2], np.int32)), "shape|labels|y"),
    (dict(y=np.array([0.0, 1.0, 2.0, 3.0], np.float32)), "dtype|integer"),
    (dict(y=np.array([0, 1, 2, 7], np.int32)), "7|classes|range"),
    (dict(nan=True), "NaN"),
])
def test_bad_calls_are_errors(factory, change, match):
  attack = factory()
  x, y = _inputs()
  fn = linear
  if change.get("nan"):
    fn = lambda z: linear(z) * jnp.nan
  if "x_shift" in change:
    x = x + change["x_shift"]
  y = change.get("y", y)
  kwargs = {"eps": change["eps"]} if "eps" in change else {}
  with pytest.raises(InputError, match=match):
    attack(fn, x, y, jax.random.key(0), **kwargs)


def test_a_target_equal_to_the_label_is_an_error():
  attack = attacks.pgd(eps=0.1, steps=2, loss="margin", targeted=True)
  x, y = _inputs()
  with pytest.raises(InputError, match="target"):
    attack(linear, x, y, jax.random.key(0), target=y)
  with pytest.raises(InputError, match="target"):
    attack(linear, x, y, jax.random.key(0))  # a targeted attack needs its targets


def test_a_negative_default_radius_is_an_error_at_construction():
  with pytest.raises(InputError, match="eps"):
    attacks.pgd(eps=-1.0)


def test_a_valid_call_passes_the_same_checks():
  x, y = _inputs()
  x_adv = attacks.pgd(eps=0.1, steps=2)(linear, x, y, jax.random.key(0))
  assert x_adv.shape == x.shape and float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6

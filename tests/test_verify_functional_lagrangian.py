"""The functional Lagrangian (Berrada et al. 2021): bounds on expected probabilities that
Monte Carlo never exceeds, under a Bayesian last layer and under input noise."""

import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit, ndtr

from robustlib.checks import InputError
from verify import functional_lagrangian as fl
from verify.interval import Interval

D, H, C = 8, 12, 4


def _features(seed=0):
  rng = np.random.default_rng(seed)
  w1 = (rng.normal(size=(D, 16)) / np.sqrt(D)).astype(np.float32)
  b1 = (0.1 * rng.normal(size=16)).astype(np.float32)
  w2 = (rng.normal(size=(16, H)) / 4).astype(np.float32)
  b2 = (0.1 * rng.normal(size=H)).astype(np.float32)
  return lambda x: jax.nn.relu(jax.nn.relu(x @ w1 + b1) @ w2 + b2)


def _layer(seed=0):
  rng = np.random.default_rng(seed + 1)
  mean = rng.normal(size=(H, C)) / np.sqrt(H)
  return fl.GaussianLinear(mean, 0.3 * np.abs(mean) + 0.05, 0.1 * rng.normal(size=C),
                           0.1 * np.ones(C))


def _box(seed=0, n=3, eps=0.1):
  x = jnp.asarray(np.random.default_rng(seed + 2).normal(size=(n, D)), jnp.float32)
  return Interval(x - eps, x + eps)


def _points(box, key, num):
  """Sampled points and every example's box corners along random sign patterns."""
  u = jax.random.uniform(key, (num,) + box.lower.shape)
  corners = jnp.where(jax.random.bernoulli(key, 0.5, (num,) + box.lower.shape), box.upper,
                      box.lower)
  return jnp.concatenate([box.lower + u * (box.upper - box.lower), corners])


def test_the_closed_form_maxima_are_exact():
  rng = np.random.default_rng(0)
  a, b, mu = (rng.normal(size=500) for _ in range(3))
  lo = rng.normal(size=500)
  hi = lo + rng.exponential(size=500)
  c = rng.normal(size=500) * 0.5
  grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 20001)
  quad = np.asarray(fl.max_quadratic(*map(jnp.asarray, (a, b, lo, hi))))
  brute = (a[:, None] * grid**2 + b[:, None] * grid).max(axis=1)
  np.testing.assert_allclose(quad, brute, atol=1e-4)
  assert np.all(quad >= brute - 1e-5)
  y = np.maximum(grid, c[:, None])
  relu = np.asarray(fl.max_relu_term(*map(jnp.asarray, (b, a, mu, lo, hi, c))))
  brute = ((b[:, None] + a[:, None] * y) * y - mu[:, None] * grid).max(axis=1)
  np.testing.assert_allclose(relu, brute, atol=1e-4)
  assert np.all(relu >= brute - 1e-5)


def test_the_probit_gap_bounds_the_sigmoid():
  gap = fl.probit_gap()
  assert 0.009 < gap < 0.011
  t = np.random.default_rng(0).normal(size=200000) * 8
  assert np.all(expit(t) <= ndtr(fl._KAPPA * t) + gap)
  assert np.max(expit(t) - ndtr(fl._KAPPA * t)) > gap - 1e-3  # not needlessly loose


def _monte_carlo(fn, layer, points, key, num=20000):
  """``E[softmax]`` ``[P, N, C]`` at each point and its standard error."""
  w, b = layer.sample(key, num)
  h = fn(points.reshape((-1, D))).reshape(points.shape[:2] + (H,))
  p = jax.nn.softmax(jnp.einsum("pnh,shc->psnc", h, w) + b[None, :, None], axis=-1)
  return np.asarray(p.mean(1)), np.asarray(p.std(1)) / math.sqrt(num)


def test_bayesian_last_layer_bounds_hold_and_tighten_with_steps():
  fn, layer, box = _features(), _layer(), _box()
  start = np.asarray(fl.functional_lagrangian(fn, box, layer, steps=0))
  upper = np.asarray(fl.functional_lagrangian(fn, box, layer, steps=100))
  assert upper.shape == (3, C) and upper.dtype == np.float32
  assert np.all(upper <= 1) and np.all(upper <= start + 1e-6)
  assert np.mean(start - upper) > 0.01  # the multipliers do work
  key = jax.random.PRNGKey(0)
  mean, err = _monte_carlo(fn, layer, _points(box, key, 64), key)
  assert np.all(mean <= upper + 4 * err + 1e-6)
  # Within reach of the best sampled value: the bound is not vacuous.
  assert np.all(upper - mean.max(0) < 0.1)
  entropy = np.asarray(fl.entropy_lower_bound(upper))
  sampled = -np.sum(mean * np.log(mean), axis=-1)
  assert np.all(entropy <= sampled.min(0) + 1e-3) and np.all(entropy > 0)


def test_a_maximised_expectation_stays_below_the_bound():
  fn, layer, box = _features(1), _layer(1), _box(1, n=2)
  upper = np.asarray(fl.functional_lagrangian(fn, box, layer, steps=100))
  w, b = layer.sample(jax.random.PRNGKey(3), 4000)

  def expected(x, c):
    p = jax.nn.softmax(fn(x) @ w + b[:, None], axis=-1)  # [S, N, C]
    return jnp.sum(p.mean(0)[:, c])

  x = (box.lower + box.upper) / 2
  for c in range(C):
    z = x
    for _ in range(60):  # projected gradient ascent on the expectation
      z = jnp.clip(z + 0.02 * jnp.sign(jax.grad(expected)(z, c)), box.lower, box.upper)
    w2, b2 = layer.sample(jax.random.PRNGKey(4), 20000)
    p = np.asarray(jax.nn.softmax(fn(z) @ w2 + b2[:, None], axis=-1).mean(0))[:, c]
    assert np.all(p <= upper[:, c] + 0.005), (c, p, upper[:, c])


def test_the_final_evaluation_is_sound_for_wild_multipliers():
  # Dyadic weights and integer inputs: float32 and float64 are exact, the box is a point,
  # and for any multipliers the bound's exact value is sigmoid of the logit difference;
  # multipliers up to 1e8 make its terms cancel by far more than float64's precision.
  rng = np.random.default_rng(0)
  w1 = rng.integers(-4, 5, size=(4, 64)).astype(np.float32)
  b1 = rng.integers(-8, 9, size=64).astype(np.float32)
  w2 = (rng.integers(-2, 3, size=(64, 2)) / 8).astype(np.float32)
  x = rng.integers(-64, 65, size=(1, 4)).astype(np.float32)
  z = np.maximum(x.astype(np.float64) @ w1 + b1, 0) @ w2
  b2 = np.array([0.0, np.round((z[0, 0] - z[0, 1] - 0.5) * 8) / 8], np.float32)
  fn = lambda v: jax.nn.relu(v @ w1 + b1) @ w2 + b2
  diff = float((z + b2)[0, 0] - (z + b2)[0, 1])
  exact = np.array([expit(diff), expit(-diff)])
  box = Interval(jnp.asarray(x), jnp.asarray(x))
  with jax.enable_x64(True):
    box64 = Interval(box.lower.astype(jnp.float64), box.upper.astype(jnp.float64))
    net, h_box = fl._problem(fn, box, box, None)
    layer = fl._Layer.of(None, 2, jnp.float64)
    for scale in 10.0**np.arange(2, 9):
      duals = jax.vmap(lambda _: fl._zero_duals(net, h_box, 2))(jnp.arange(2))
      duals = jax.tree_util.tree_map(lambda v: jnp.asarray(scale * rng.normal(size=v.shape)), duals)
      upper = fl._certified_values(fn, box64, box64, None, layer, duals, 8, False, 0.0)[:, 0]
      assert np.all(upper >= exact), (scale, upper, exact)


def test_input_noise_bounds_hold():
  feats = _features(2)
  rng = np.random.default_rng(5)
  w = (rng.normal(size=(H, C)) / np.sqrt(H)).astype(np.float32)
  fn = lambda x: feats(x) @ w
  box = _box(2, n=2, eps=0.05)
  noise = fl.GaussianNoise(std=0.1, truncation=5.0)
  upper = np.asarray(fl.functional_lagrangian(fn, box, noise, steps=100))
  assert np.all(upper <= 1) and upper.min() < 0.9
  key = jax.random.PRNGKey(1)
  points = _points(box, key, 16)
  delta = 0.1 * jax.random.normal(key, (20000,) + points.shape)
  p = jax.nn.softmax(fn((points[None] + delta).reshape((-1, D))),
                     -1).reshape(delta.shape[:3] + (C,))
  mean = np.asarray(p.mean(0))
  err = np.asarray(p.std(0)) / math.sqrt(20000)
  assert np.all(mean <= upper + 4 * err + 1e-6)


def test_the_optimisation_compiles_once_per_function_and_shapes():
  fn, layer = _features(3), _layer(3)
  sizes = []
  for seed in (3, 4, 5):
    upper = np.asarray(fl.functional_lagrangian(fn, _box(seed, n=2), layer, steps=5))
    assert np.all((upper > 0) & (upper <= 1))
    gc.collect()  # programs of collected functions leave the cache; fn stays alive
    sizes.append(fl._optimised_multipliers.cache_size())
  assert sizes[2] == sizes[1] == sizes[0], sizes


def test_bad_input_is_refused():
  fn, layer, box = _features(), _layer(), _box()
  with pytest.raises(InputError, match="closed-form moments"):
    fl.functional_lagrangian(fn, box, lambda key: 0.0)
  with pytest.raises(InputError, match="inputs but the features"):
    fl.functional_lagrangian(
        fn, box, fl.GaussianLinear(np.ones((3, C)), np.ones((3, C)), np.zeros(C), np.zeros(C)))
  with pytest.raises(InputError, match=">= 0"):
    fl.functional_lagrangian(
        fn, box, fl.GaussianLinear(layer.mean_w, -layer.std_w, layer.mean_b, layer.std_b))
  with pytest.raises(InputError, match="std must be"):
    fl.functional_lagrangian(fn, box, fl.GaussianNoise(std=0.0))
  with pytest.raises(InputError, match="steps"):
    fl.functional_lagrangian(fn, box, layer, steps=-1)
  with pytest.raises(InputError, match="grid"):
    fl.functional_lagrangian(fn, box, layer, grid=0)
  with pytest.raises(InputError, match="finite input box"):
    fl.functional_lagrangian(fn, Interval(box.lower - jnp.inf, box.upper), layer)
  with pytest.raises(InputError, match="tanh"):
    fl.functional_lagrangian(lambda x: jnp.tanh(fn(x)), box, layer)

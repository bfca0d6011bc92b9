"""Specifications beyond margins (Qin et al. 2019): a semantic one (probability mass on a
set of classes), output sets (a box, half-spaces) and conservation by a learned dynamics
model, each bound checked against sampled points, corners and (where it is ReLU-linear)
the MILP."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import verify
from robustlib.checks import InputError
from verify import specs

METHODS = ("ibp", "crown", "alpha_crown")


def _mlp(key, sizes):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b) + 0.1))
  return params


def _apply(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w + b
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _points(lo, hi, key, n=4000):
  """Random points of the box and all its corners (few dimensions)."""
  lo, hi = np.asarray(lo[0]), np.asarray(hi[0])
  u = np.asarray(jax.random.uniform(key, (n,) + lo.shape))
  corners = np.array(list(itertools.product(*zip(lo, hi))), np.float32)
  return np.concatenate([lo + u * (hi - lo), corners]).astype(np.float32)


def _assert_sound(fn, box, spec, key):
  """Every method's lower bounds lie below every sampled row; a verified spec holds on
  every sample."""
  x = _points(box.lower, box.upper, key)
  values = np.asarray(spec.of(fn)(jnp.asarray(x)))  # [P, S]
  for method in METHODS:
    lower = np.asarray(verify.spec_bounds(fn, box, spec, method))[0]
    assert np.all(values.min(axis=0) >= lower - 1e-5), (method, values.min(axis=0), lower)
    if bool(verify.certify_spec(fn, box, spec, method)[0]):
      assert np.all(values > 0), method
  return values


def test_probability_mass_is_bounded_soundly_and_verified_where_it_holds():
  params = _mlp(jax.random.key(0), [3, 16, 16, 4])
  fn = lambda x: _apply(params, x)  # pylint: disable=unnecessary-lambda-assignment
  x = jnp.array([[0.3, -0.2, 0.5]])
  probs = np.asarray(jax.nn.softmax(fn(x)))[0]
  chosen = [int(np.argmax(probs)), int(np.argsort(probs)[-2])]
  mass = float(probs[chosen].sum())
  box = verify.Interval(x - 0.05, x + 0.05)
  easy = specs.probability_mass(chosen, 4, mass / 2)
  values = _assert_sound(fn, box, easy, jax.random.key(1))
  assert bool(verify.certify_spec(fn, box, easy, "crown")[0])
  # Above the mass of some sampled point: never verified.
  sampled = np.asarray(
      jax.nn.softmax(fn(jnp.asarray(_points(box.lower, box.upper, jax.random.key(2))))))
  hard = specs.probability_mass(chosen, 4, float(sampled[:, chosen].sum(axis=1).min()) + 1e-3)
  _assert_sound(fn, box, hard, jax.random.key(3))
  assert not any(bool(verify.certify_spec(fn, box, hard, m)[0]) for m in METHODS)
  assert values.min() > 0


@pytest.mark.parametrize("kind", ["box", "halfspaces"])
def test_output_sets_of_a_relu_regressor_agree_with_the_milp(kind):
  params = _mlp(jax.random.key(4), [2, 12, 12, 2])
  fn = lambda x: _apply(params, x)  # pylint: disable=unnecessary-lambda-assignment
  x = jnp.array([[0.1, 0.2]])
  box = verify.Interval(x - 0.1, x + 0.1)
  center = np.asarray(fn(x))[0]
  if kind == "box":
    spec = specs.output_box(center - 1.0, center + 1.0)
    a = np.concatenate([np.eye(2), -np.eye(2)])  # rows out - lo, hi - out: a @ out + offset
    offsets = np.concatenate([-(center - 1.0), center + 1.0])
  else:
    a_half = np.array([[1.0, 1.0], [1.0, -2.0]], np.float32)
    b = a_half @ center + 0.8
    spec = specs.halfspaces(a_half, b)
    a, offsets = -a_half, b
  _assert_sound(fn, box, spec, jax.random.key(5))
  lower = np.asarray(verify.spec_bounds(fn, box, spec, "crown"))[0]
  for s in range(a.shape[0]):
    value, bound, _ = verify.milp_minimum(fn, box.lower[0], box.upper[0], jnp.asarray(a[s]), 30.0)
    assert value - bound < 1e-4  # solved: value is the row's exact minimum
    exact = offsets[s] + value
    assert exact >= lower[s] - 1e-4  # CROWN never exceeds the exact minimum
    assert lower[s] >= exact - 1.0  # nor is it vacuous on this small box


def _pendulum_model():
  """A small MLP trained to step a pendulum (state w, h, omega: the bob at (w, h) on a unit
  rod, angular velocity omega), whose energy omega^2 / 2 + g (h + 1) the true step conserves
  up to the step's error."""
  g, dt = 9.81, 0.01
  theta = np.random.default_rng(0).uniform(-1.2, 1.2, 2048)
  omega = np.random.default_rng(1).uniform(-2, 2, 2048)
  state = np.stack([np.sin(theta), -np.cos(theta), omega], 1).astype(np.float32)
  omega2 = omega - g * np.sin(theta) * dt
  theta2 = theta + omega2 * dt
  target = np.stack([np.sin(theta2), -np.cos(theta2), omega2], 1).astype(np.float32)
  params = _mlp(jax.random.key(6), [3, 32, 32, 3])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(
        (state + _apply(p, state) * 0.1 - target)**2))(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(400):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 1e-3
  energy = lambda s: 0.5 * s[:, 2]**2 + g * (s[:, 1] + 1.0)  # pylint: disable=unnecessary-lambda-assignment
  return (lambda s: s + _apply(params, s) * 0.1), energy


def test_a_learned_pendulum_conserves_energy_within_what_is_verified():
  fn, energy = _pendulum_model()
  x = jnp.array([[np.sin(0.3), -np.cos(0.3), 0.5]], jnp.float32)
  box = verify.Interval(x - 0.01, x + 0.01)
  probe = specs.conserves(energy, 1.0)
  values = _assert_sound(fn, box, probe, jax.random.key(7))
  changes = 1.0 - values[:, 0]  # energy(out) - energy(x) at the samples
  lower = np.asarray(verify.spec_bounds(fn, box, probe, "crown"))[0]
  worst = max(1.0 - lower[0], 1.0 - lower[1])  # the largest |energy change| not excluded
  assert worst >= np.abs(changes).max() - 1e-5
  assert bool(verify.certify_spec(fn, box, specs.conserves(energy, worst + 0.05), "crown")[0])
  tight = specs.conserves(energy, float(np.abs(changes).max()) * 0.9)
  assert not any(bool(verify.certify_spec(fn, box, tight, m)[0]) for m in METHODS)


def test_a_specification_the_interpreter_cannot_bound_names_the_primitive():
  fn = lambda x: x * 2.0  # pylint: disable=unnecessary-lambda-assignment
  box = verify.Interval(jnp.zeros((1, 2)), jnp.ones((1, 2)))
  spec = specs.Specification(lambda x, out: jnp.cos(out), "cosine")
  with pytest.raises(verify.UnsupportedPrimitiveError, match="cos"):
    verify.spec_bounds(fn, box, spec)


@pytest.mark.parametrize("make,message", [
    (lambda: specs.probability_mass([0], 3, 1.5), "threshold must be a probability"),
    (lambda: specs.probability_mass([0, 1, 2], 3, 0.5), "proper subset"),
    (lambda: specs.probability_mass([], 3, 0.5), "proper subset"),
    (lambda: specs.probability_mass([5], 3, 0.5), "proper subset"),
    (lambda: specs.output_box([1.0], [0.0]), "lower < upper"),
    (lambda: specs.output_box([-np.inf], [np.inf]), "no finite side"),
    (lambda: specs.halfspaces(np.ones((2, 3)), np.ones(3)), "a must be"),
    (lambda: specs.conserves(lambda s: s[:, 0], 0.0), "tolerance must be > 0"),
    (lambda: verify.spec_bounds(lambda x: x, verify.Interval(jnp.zeros((1, 2)), jnp.ones(
        (1, 2))), "not a spec"), "must be a verify.specs.Specification"),
])
def test_bad_specifications_are_refused(make, message):
  with pytest.raises(InputError, match=message):
    make()


def test_a_specification_for_another_number_of_outputs_is_refused():
  fn = lambda x: x @ jnp.ones((2, 4))  # pylint: disable=unnecessary-lambda-assignment
  box = verify.Interval(jnp.zeros((1, 2)), jnp.ones((1, 2)))
  for spec in (specs.probability_mass([0], 3, 0.5), specs.output_box([0.0], [1.0]),
               specs.halfspaces(np.ones((1, 5)), np.ones(1))):
    with pytest.raises(InputError, match="is written for"):
      verify.spec_bounds(fn, box, spec)
  with pytest.raises(InputError, match="compares a state with the model's next state"):
    verify.spec_bounds(fn, box, specs.conserves(lambda s: s[:, 0], 1.0))


def test_a_specifications_arrays_are_its_own():
  lower = np.array([0.0, 0.0])
  spec = specs.output_box(lower, [1.0, 1.0])
  lower[0] = 0.5  # the caller's array changes; the spec (a compiled program's key) does not
  fn = lambda x: x  # pylint: disable=unnecessary-lambda-assignment
  box = verify.Interval(jnp.full((1, 2), 0.1), jnp.full((1, 2), 0.2))
  assert bool(verify.certify_spec(fn, box, spec, "ibp")[0])
  assert np.asarray(verify.spec_bounds(fn, box, spec, "ibp"))[0, 0] == pytest.approx(0.1)

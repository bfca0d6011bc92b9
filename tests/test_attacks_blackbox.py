"""Square Attack and SPSA: the gradient-free attacks.

Known optima on a linear classifier (the smallest L-inf / L2 perturbation that
changes the decision is ``min_t (z_y - z_t) / ||w_y - w_t||_{1 or 2}`` away from
the box faces) tell whether they break a model when they can and only then;
the query budget is counted; SPSA's gradient estimate is compared with the true
gradient; on a small trained MLP Square is about as strong as PGD.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attack_models
import attacks
from attacks import core
from attacks.square import p_selection
from robustlib.checks import InputError

NUM_CLASSES = attack_models.NUM_CLASSES

# ----------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def linear():
  """A 10-class linear model on 8x8x1 inputs, points far from the box faces and
  their exact minimum L-inf and L2 distances to a wrong decision."""
  logits_fn, x, y, pairwise = attack_models.linear()
  return logits_fn, x, y, {norm: d.min(axis=1) for norm, d in pairwise.items()}


@pytest.fixture(scope="module")
def digits_mlp():
  return attack_models.digits_mlp()


_accuracy = attack_models.accuracy
_norm = attack_models.lp_norm


def _pgd(logits_fn, x, y, eps, steps=40):
  """L-inf PGD on the cross-entropy from a random start."""
  return attacks.pgd(eps=eps, steps=steps)(logits_fn, x, y, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------
# Square.

SQUARE_MARGIN = {"linf": 1.5, "l2": 2.5}  # eps / minimum distance where it must succeed


@pytest.fixture(scope="module")
def square_attacks():
  return {norm: attacks.square(0.1, norm=norm, queries=1000) for norm in ("linf", "l2")}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_breaks_linear_model_when_eps_exceeds_the_minimum_distance(
    linear, square_attacks, norm):
  logits_fn, x, y, dist = linear
  eps = SQUARE_MARGIN[norm] * dist[norm]
  x_adv = square_attacks[norm](logits_fn, x, y, jax.random.PRNGKey(1), eps=eps)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) != y))
  assert bool(jnp.all(_norm(x_adv - x, norm) <= eps + 1e-6))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_reports_robust_below_the_minimum_distance(linear, square_attacks, norm):
  logits_fn, x, y, dist = linear
  eps = 0.95 * dist[norm]
  x_adv = square_attacks[norm](logits_fn, x, y, jax.random.PRNGKey(1), eps=eps)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) == y))
  assert bool(jnp.all(_norm(x_adv - x, norm) <= eps + 1e-6))
  # Never worse than x: the margin loss did not decrease.
  assert bool(jnp.all(core.margin_loss(logits_fn(x_adv), y) >= core.margin_loss(logits_fn(x), y)))


def test_square_targeted_reaches_the_target(linear):
  logits_fn, x, y, dist = linear
  target = (y + 1) % NUM_CLASSES
  attack = attacks.square(1.0, queries=1000, targeted=True)
  assert attack.targeted
  x_adv = attack(logits_fn, x, y, jax.random.PRNGKey(2), eps=0.25, target=target)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) == target))
  del dist


def test_square_query_counts_stay_within_budget(linear):
  logits_fn, x, y, dist = linear
  # Half the batch robust (eps below the minimum), half easy (eps far above).
  eps = jnp.where(jnp.arange(8) < 4, 0.9 * dist["linf"], 3.0 * dist["linf"])
  search = jax.jit(lambda x, y, key, eps: attacks.square_search(
      logits_fn, x, y, key, eps, queries=60, restarts=2))
  result = search(x, y, jax.random.PRNGKey(3), eps)
  queries = np.asarray(result.queries)
  # Robust points spend exactly the whole budget of both restarts ...
  np.testing.assert_array_equal(queries[:4], 120)
  assert not np.asarray(result.adversarial[:4]).any()
  # ... fooled ones stop early and are not searched again by the second restart.
  assert np.asarray(result.adversarial[4:]).all()
  assert (queries[4:] < 60).all()
  adversarial = jnp.argmax(logits_fn(result.x_adv), axis=1) != y
  np.testing.assert_array_equal(np.asarray(adversarial), np.asarray(result.adversarial))


def test_square_logits_calls_counted_on_the_host(linear):
  logits_fn, x, y, dist = linear
  calls = []

  def counted(z):
    jax.debug.callback(lambda: calls.append(1))  # runs on the host at every evaluation
    return logits_fn(z)

  budget, restarts = 12, 2
  result = jax.jit(lambda x, y: attacks.square_search(
      counted, x, y, jax.random.PRNGKey(4), 0.5 * dist["linf"], queries=budget, restarts=restarts))(
          x, y)
  jax.effects_barrier()
  # Every call evaluates the whole (robust) batch; the clean x counts against the budget.
  assert len(calls) == budget * restarts
  np.testing.assert_array_equal(np.asarray(result.queries), budget * restarts)


def test_square_already_misclassified_points_are_left_alone(linear):
  logits_fn, x, y, dist = linear
  wrong = (y + 3) % NUM_CLASSES
  result = jax.jit(
      lambda x, y: attacks.square_search(logits_fn, x, y, jax.random.PRNGKey(5), 0.2, queries=50))(
          x, wrong)
  np.testing.assert_array_equal(np.asarray(result.queries), 1)
  np.testing.assert_array_equal(np.asarray(result.x_adv), np.asarray(x))
  del dist


def test_square_p_schedule_halves_on_the_published_iterations():
  p = lambda i, queries: float(p_selection(i, queries, 0.8))
  approx = lambda v: pytest.approx(v, rel=1e-6)
  assert p(0, 10000) == p(10, 10000) == approx(0.8)
  assert p(11, 10000) == p(50, 10000) == approx(0.4)
  assert p(51, 10000) == approx(0.2)
  assert p(501, 10000) == approx(0.8 / 16)
  assert p(8001, 10000) == approx(0.8 / 512)
  # Rescaled to the budget: iteration 100 of 1000 is iteration 1000 of 10000.
  assert p(100, 1000) == p(1000, 10000) == approx(0.8 / 16)
  assert p(101, 1000) == approx(0.8 / 32)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_works_on_flat_inputs(norm):
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)

  def logits_fn(x):
    return x @ w

  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(4, 20)), jnp.float32)
  y = jnp.argmax(logits_fn(x), axis=1)
  eps = 0.3 if norm == "linf" else 1.5
  x_adv = attacks.square(eps, norm=norm, queries=200)(logits_fn, x, y, jax.random.PRNGKey(0))
  assert x_adv.shape == x.shape
  assert bool(jnp.all(_norm(x_adv - x, norm) <= eps + 1e-6))
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) != y))


def test_square_on_trained_mlp_is_close_to_pgd(digits_mlp):
  logits_fn, x, y = digits_mlp
  eps = 0.1
  clean = _accuracy(logits_fn, x, y)
  assert clean > 0.85
  square_acc = _accuracy(logits_fn,
                         attacks.square(eps, queries=1000)(logits_fn, x, y, jax.random.PRNGKey(0)),
                         y)
  pgd_acc = _accuracy(logits_fn, _pgd(logits_fn, x, y, eps), y)
  assert square_acc <= clean - 0.3  # a moderate eps that PGD uses well
  assert abs(square_acc - pgd_acc) <= 0.1, (square_acc, pgd_acc)


@pytest.mark.parametrize("kwargs", [
    dict(eps=-0.1),
    dict(eps=0.1, queries=0),
    dict(eps=0.1, p_init=0.0),
    dict(eps=0.1, p_init=1.5),
    dict(eps=0.1, restarts=0),
    dict(eps=0.1, loss="dlr"),
    dict(eps=0.1, norm="l1"),
])
def test_square_rejects_bad_hyper_parameters(kwargs):
  with pytest.raises(InputError):
    attacks.square(**kwargs)


# ----------------------------------------------------------------------------
# SPSA.


def _smooth_loss(z):
  v = z.reshape(z.shape[0], -1)
  weights = jnp.linspace(-1.0, 1.0, v.shape[1])
  return jnp.sum(jnp.sin(3.0 * v) * weights, axis=1) + jnp.sum(v * v, axis=1)


def test_spsa_gradient_estimate_approximates_the_true_gradient(linear):
  _, x, _, _ = linear
  true = jax.grad(lambda z: jnp.sum(_smooth_loss(z)))(x)
  estimate = jax.jit(lambda x: attacks.spsa_gradient(
      _smooth_loss, x, jax.random.PRNGKey(0), delta=1e-3, num_samples=2048, chunk_size=256))(x)
  a, b = estimate.reshape(8, -1), true.reshape(8, -1)
  cosine = jnp.sum(a * b, axis=1) / jnp.linalg.norm(a, axis=1) / jnp.linalg.norm(b, axis=1)
  assert float(cosine.min()) > 0.95
  # An unbiased estimate: the scale is right too.
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1), rtol=0.15)


def test_spsa_gradient_does_not_depend_on_the_chunking(linear):
  _, x, _, _ = linear

  def estimate(chunk_size):
    return attacks.spsa_gradient(_smooth_loss,
                                 x,
                                 jax.random.PRNGKey(1),
                                 num_samples=100,
                                 chunk_size=chunk_size)

  reference = estimate(100)  # one chunk
  for chunk_size in (7,):  # 100 is not a multiple of 7
    np.testing.assert_allclose(np.asarray(estimate(chunk_size)),
                               np.asarray(reference),
                               rtol=1e-4,
                               atol=1e-5)


def test_spsa_gradient_memory_is_bounded_by_the_chunk(linear):
  _, x, _, _ = linear

  def largest(num_samples, chunk_size):
    fn = lambda x: attacks.spsa_gradient(
        _smooth_loss, x, jax.random.PRNGKey(0), num_samples=num_samples, chunk_size=chunk_size)
    return attack_models.largest_intermediate(jax.make_jaxpr(fn)(x).jaxpr)

  per_direction = x.size  # one Rademacher direction for the whole batch
  assert largest(1024, 8) <= 2 * 8 * per_direction
  assert largest(4096, 8) == largest(1024, 8)
  assert largest(1024, 1024) >= 2 * 1024 * per_direction  # the bound above is not vacuous


@pytest.fixture(scope="module")
def spsa_attack():
  return attacks.spsa(0.1, steps=40, num_samples=64, chunk_size=16)


def test_spsa_breaks_linear_model_above_the_minimum_distance(linear, spsa_attack):
  logits_fn, x, y, dist = linear
  eps = 1.3 * dist["linf"]
  x_adv = spsa_attack(logits_fn, x, y, jax.random.PRNGKey(1), eps=eps)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) != y))
  assert bool(jnp.all(_norm(x_adv - x, "linf") <= eps + 1e-6))


def test_spsa_reports_robust_below_the_minimum_distance(linear, spsa_attack):
  logits_fn, x, y, dist = linear
  eps = 0.95 * dist["linf"]
  x_adv = spsa_attack(logits_fn, x, y, jax.random.PRNGKey(1), eps=eps)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) == y))
  assert bool(jnp.all(_norm(x_adv - x, "linf") <= eps + 1e-6))
  assert bool(jnp.all(core.margin_loss(logits_fn(x_adv), y) >= core.margin_loss(logits_fn(x), y)))


def test_spsa_on_trained_mlp_is_close_to_pgd(digits_mlp):
  logits_fn, x, y = digits_mlp
  eps = 0.1
  attack = attacks.spsa(eps, steps=30, num_samples=32, chunk_size=32)
  spsa_acc = _accuracy(logits_fn, attack(logits_fn, x, y, jax.random.PRNGKey(0)), y)
  pgd_acc = _accuracy(logits_fn, _pgd(logits_fn, x, y, eps), y)
  assert spsa_acc <= _accuracy(logits_fn, x, y) - 0.3
  assert spsa_acc <= pgd_acc + 0.15, (spsa_acc, pgd_acc)


@pytest.mark.parametrize("kwargs", [
    dict(eps=-0.1),
    dict(eps=0.1, chunk_size=0),
    dict(eps=0.1, num_samples=0),
    dict(eps=0.1, steps=0),
    dict(eps=0.1, delta=0.0),
    dict(eps=0.1, learning_rate=-1.0),
    dict(eps=0.1, norm="l1"),
])
def test_spsa_rejects_bad_hyper_parameters(kwargs):
  with pytest.raises(InputError):
    attacks.spsa(**kwargs)


def test_spsa_gradient_rejects_bad_sampling(linear):
  _, x, _, _ = linear
  with pytest.raises(InputError):
    attacks.spsa_gradient(_smooth_loss, x, jax.random.PRNGKey(0), num_samples=0)
  with pytest.raises(InputError):
    attacks.spsa_gradient(_smooth_loss, x, jax.random.PRNGKey(0), chunk_size=0)


def test_modules_name_their_attacks():
  assert attacks.square(0.1).name == "square-linf"
  assert attacks.spsa(0.1, norm="l2").name == "spsa-l2"

"""FAB: the box-constrained projection and minimum-norm adversarial points.

On a linear classifier the smallest perturbation that changes the decision has
a closed form (``min_t (z_y - z_t) / ||w_y - w_t||``, dual norm: L1 for L-inf,
L2 for L2); FAB must find a point at that distance (slightly above: the
overshoot ``eta``), return it when ``eps`` allows and a non-adversarial point
inside the ball otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attack_models
import attacks
from attacks import core
from attacks.fab import project_onto_hyperplane as _project
from robustlib.checks import InputError

project_onto_hyperplane = jax.jit(_project, static_argnums=(3, 4))

_norm = attack_models.lp_norm

# ----------------------------------------------------------------------------
# The projection onto a hyperplane inside the box.


def _projection_by_bisection(p, w, b, norm, lo=0.0, hi=1.0):
  """An independent solution: bisection on the multiplier of the KKT conditions.

  The minimizer of ``||d||`` subject to ``<w, p + d> = b`` and the box is
  ``d_i = clip(-lam * s_i, lo - p_i, hi - p_i)`` with ``s = sign(w)`` (L-inf)
  or ``s = w`` (L2), for the ``lam`` that meets the constraint.
  """
  p, w = np.asarray(p, np.float64), np.asarray(w, np.float64)
  direction = np.sign(w) if norm == "linf" else w
  if w @ p < b:
    direction = -direction

  def step(lam):
    return np.clip(-lam * direction, lo - p, hi - p)

  need = w @ p - b
  low, high = 0.0, 1e6
  for _ in range(200):
    mid = 0.5 * (low + high)
    if abs(w @ step(mid)) < abs(need):
      low = mid
    else:
      high = mid
  return step(high)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_an_independent_solution(norm):
  rng = np.random.default_rng(0)
  n, dim = 32, 12
  points = rng.uniform(0, 1, (n, dim))
  w = rng.normal(size=(n, dim))
  w[0, :4] = 0.0  # zero weights do not move
  # Offsets near and far: some hyperplanes are reached only with box faces active.
  b = np.sum(w * points, axis=1) + rng.normal(size=n) * np.linspace(0.05, 1.5, n)
  d = np.asarray(
      project_onto_hyperplane(jnp.asarray(points, jnp.float32), jnp.asarray(w, jnp.float32),
                              jnp.asarray(b, jnp.float32), norm, (0.0, 1.0)))
  assert (points + d >= -1e-6).all() and (points + d <= 1 + 1e-6).all()
  assert (d[0, :4] == 0).all()
  feasible_and_checked = 0
  for i in range(n):
    expected = _projection_by_bisection(points[i], w[i], b[i], norm)
    on_plane = abs(w[i] @ (points[i] + expected) - b[i]) < 1e-6
    if not on_plane:  # the box does not reach the hyperplane: the closest corner
      corner = np.where(w[i] * np.sign(w[i] @ points[i] - b[i]) > 0, 0.0, 1.0) - points[i]
      np.testing.assert_allclose(d[i], np.where(w[i] != 0, corner, 0.0), atol=1e-5)
      continue
    feasible_and_checked += 1
    assert abs(w[i] @ (points[i] + d[i]) - b[i]) < 1e-4
    ord_ = np.inf if norm == "linf" else 2
    np.testing.assert_allclose(np.linalg.norm(d[i], ord_),
                               np.linalg.norm(expected, ord_),
                               rtol=1e-4,
                               atol=1e-6)
  assert feasible_and_checked >= n // 2


def test_projection_without_active_box_is_the_textbook_formula():
  rng = np.random.default_rng(1)
  points = jnp.full((4, 50), 0.5)
  w = jnp.asarray(rng.normal(size=(4, 50)), jnp.float32)
  gap = jnp.asarray([0.1, -0.2, 0.05, 0.3], jnp.float32)  # <w, p> - b
  b = jnp.sum(w * points, axis=1) - gap
  d_inf = project_onto_hyperplane(points, w, b, "linf", (0.0, 1.0))
  np.testing.assert_allclose(d_inf,
                             -(gap / jnp.sum(jnp.abs(w), axis=1))[:, None] * jnp.sign(w),
                             rtol=1e-4)
  d_2 = project_onto_hyperplane(points, w, b, "l2", (0.0, 1.0))
  np.testing.assert_allclose(d_2,
                             -(gap / jnp.sum(w * w, axis=1))[:, None] * w,
                             rtol=1e-4,
                             atol=1e-7)


# ----------------------------------------------------------------------------
# Linear classifiers.


@pytest.fixture(scope="module")
def linear():
  return attack_models.linear()


@pytest.fixture(scope="module")
def fab_attacks():
  return {
      (norm, targets): attacks.fab(1.0, norm=norm, steps=60, num_targets=targets)
      for norm in ("linf", "l2") for targets in (9, None)
  }


@pytest.mark.parametrize("targets", [9, None], ids=["fab-t", "untargeted"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimum_distance_of_a_linear_model(linear, fab_attacks, norm, targets):
  logits_fn, x, y, pairwise = linear
  minimum = pairwise[norm].min(axis=1)
  attack = fab_attacks[norm, targets]
  assert not attack.targeted
  x_adv = attack(logits_fn, x, y, jax.random.PRNGKey(0), eps=10 * minimum)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) != y))
  ratio = np.asarray(_norm(x_adv - x, norm) / minimum)
  assert (ratio >= 1 - 1e-4).all(), ratio  # nothing is closer than the optimum
  assert (ratio <= 1.01).all(), ratio  # FAB reaches it up to its overshoot


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_returns_a_non_adversarial_point_when_eps_is_below_the_minimum(
    linear, fab_attacks, norm):
  logits_fn, x, y, pairwise = linear
  eps = 0.97 * pairwise[norm].min(axis=1)
  x_adv = fab_attacks[norm, 9](logits_fn, x, y, jax.random.PRNGKey(0), eps=eps)
  assert bool(jnp.all(jnp.argmax(logits_fn(x_adv), axis=1) == y))
  assert bool(jnp.all(_norm(x_adv - x, norm) <= eps + 1e-6))
  # The best non-adversarial candidate, not x: it moved toward the boundary.
  assert bool(jnp.all(core.margin_loss(logits_fn(x_adv), y) > core.margin_loss(logits_fn(x), y)))


def test_fab_eps_decides_per_example(linear, fab_attacks):
  logits_fn, x, y, pairwise = linear
  minimum = pairwise["linf"].min(axis=1)
  above = jnp.arange(8) % 2 == 0
  eps = jnp.where(above, 1.05 * minimum, 0.9 * minimum)
  x_adv = fab_attacks["linf", 9](logits_fn, x, y, jax.random.PRNGKey(0), eps=eps)
  adversarial = jnp.argmax(logits_fn(x_adv), axis=1) != y
  np.testing.assert_array_equal(np.asarray(adversarial), np.asarray(above))


@pytest.mark.parametrize("norm", ["l2"])
def test_fab_targeted_reaches_the_given_class(linear, norm):
  logits_fn, x, y, pairwise = linear
  # The farthest class: reaching it takes more than the untargeted minimum.
  target = jnp.argmax(jnp.where(jnp.isinf(pairwise[norm]), -1.0, pairwise[norm]), axis=1)
  attack = attacks.fab(1.0, norm=norm, steps=100, targeted=True)
  assert attack.targeted
  x_adv = attack(logits_fn, x, y, jax.random.PRNGKey(0), eps=5.0, target=target)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(x_adv), axis=1)),
                                np.asarray(target))
  to_target = jnp.take_along_axis(pairwise[norm], target[:, None], axis=1)[:, 0]
  assert bool(jnp.all(_norm(x_adv - x, norm) >= to_target * (1 - 1e-4)))
  assert bool(jnp.all(_norm(x_adv - x, norm) > 1.05 * pairwise[norm].min(axis=1)))
  with pytest.raises(InputError, match="target"):
    attack(logits_fn, x, y, jax.random.PRNGKey(0))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_respects_the_box(norm):
  """A binary linear model whose nearest boundary point lies outside the box: the
  minimum inside the box is the box-constrained projection."""
  rng = np.random.default_rng(2)
  dim = 16
  w = rng.normal(size=dim)
  # x sits near the faces the attack must move away from, so little room is left.
  room = rng.uniform(0.01, 0.3, dim)
  x = np.where(w > 0, room, 1 - room)
  score = 0.6 * np.sum(np.abs(w) * room)  # 60% of the largest decrease the box allows
  bias = score - w @ x
  w32 = jnp.asarray(w, jnp.float32)

  def logits_fn(z):
    s = z @ w32 + bias
    return jnp.stack([-s, s], axis=1)

  x = jnp.asarray(x[None], jnp.float32)
  y = jnp.ones((1,), jnp.int32)
  assert int(jnp.argmax(logits_fn(x), axis=1)[0]) == 1
  expected = _projection_by_bisection(x[0], w, -bias, norm)
  minimum = np.linalg.norm(expected, np.inf if norm == "linf" else 2)
  unconstrained = score / np.linalg.norm(w, 1 if norm == "linf" else 2)
  assert minimum > 1.05 * unconstrained  # the box matters here
  attack = attacks.fab(5.0, norm=norm, steps=100, num_targets=None)
  x_adv = attack(logits_fn, x, y, jax.random.PRNGKey(0))
  assert int(jnp.argmax(logits_fn(x_adv), axis=1)[0]) == 0
  assert bool(jnp.all((x_adv >= 0) & (x_adv <= 1)))
  ratio = float(_norm(x_adv - x, norm)[0]) / minimum
  assert 1 - 1e-4 <= ratio <= 1.01, ratio


def test_fab_restarts_never_do_worse(linear):
  logits_fn, x, y, pairwise = linear
  minimum = pairwise["l2"].min(axis=1)
  attack = attacks.fab(1.0, norm="l2", steps=30, restarts=3, num_targets=2)
  x_adv = attack(logits_fn, x, y, jax.random.PRNGKey(1), eps=10 * minimum)
  ratio = np.asarray(_norm(x_adv - x, "l2") / minimum)
  assert (ratio >= 1 - 1e-4).all() and (ratio <= 1.01).all(), ratio


# ----------------------------------------------------------------------------
# A trained model.


@pytest.fixture(scope="module")
def digits_mlp():
  return attack_models.digits_mlp()


def test_fab_t_on_trained_mlp_is_close_to_pgd(digits_mlp):
  logits_fn, x, y = digits_mlp
  accuracy = lambda z: float(jnp.mean(jnp.argmax(logits_fn(z), axis=1) == y))
  clean = accuracy(x)
  assert clean > 0.85
  attack = attacks.fab(0.1, steps=50, num_targets=9)
  fab_acc = accuracy(attack(logits_fn, x, y, jax.random.PRNGKey(0)))
  pgd_acc = accuracy(attacks.pgd(eps=0.1, steps=40)(logits_fn, x, y, jax.random.PRNGKey(0)))
  assert fab_acc <= clean - 0.3
  assert abs(fab_acc - pgd_acc) <= 0.1, (fab_acc, pgd_acc)


# ----------------------------------------------------------------------------
# Configuration.


def test_fab_modes_are_named():
  assert attacks.fab(0.1).name == "fab-t-linf"
  assert attacks.fab(0.1, norm="l2", num_targets=None).name == "fab-l2"
  assert attacks.fab(0.1, targeted=True).name == "fab-targeted-linf"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(eps=-0.1),
        dict(eps=0.1, steps=0),
        dict(eps=0.1, restarts=0),
        dict(eps=0.1, num_targets=0),
        dict(eps=0.1, eta=0.5),
        dict(eps=0.1, beta=0.0),
        dict(eps=0.1, alpha_max=2.0),
        dict(eps=0.1, norm="l0"),
        dict(eps=float("inf")),  # the restarts' radius: an unbounded FAB is a call with eps=inf
    ])
def test_fab_rejects_bad_hyper_parameters(kwargs):
  with pytest.raises(InputError):
    attacks.fab(**kwargs)

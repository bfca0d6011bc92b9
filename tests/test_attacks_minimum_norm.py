"""Minimum-norm attacks (FMN, FAB unbounded) and the robustness curves their distances give.

On a linear classifier the smallest adversarial perturbation has a closed form
(``min_t (z_y - z_t) / ||w_y - w_t||_*``; for L0 the fewest coordinates whose
moves to the box's faces close the gap); a minimum-norm attack must never
report less (a distance below the optimum is a wrong measurement) and should
reach it.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import attack_models
import attacks
from attacks import core
from attacks.fab import project_onto_hyperplane
from attacks.evaluation import robustness_curve
from robustlib.checks import InputError


@pytest.fixture(scope="module")
def linear():
  return attack_models.linear(32)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("num_targets", [9, None], ids=["fmn-t", "fmn"])
def test_fmn_finds_the_minimum_distance_of_a_linear_model(linear, norm, num_targets):
  logits_fn, x, y, pairwise = linear
  minimum = np.asarray(pairwise[norm].min(axis=1))
  found = np.asarray(
      attacks.fmn(norm=norm, num_targets=num_targets).distances(logits_fn, x, y, jax.random.key(0)))
  ratio = found / minimum
  assert (ratio >= 1 - 1e-4).all(), ratio  # nothing is closer than the optimum
  if norm == "l1" and num_targets is None:
    # The paper's untargeted run may settle on another class's boundary (one point: +7.8 %).
    assert (ratio <= 1.1).all() and np.median(ratio) <= 1.001, ratio
  else:
    assert (ratio <= (1.005 if norm == "l1" else 1.002)).all(), ratio


def _exact_l0(logits_fn, x, y):
  """The fewest coordinates to change (each to the box face that helps most) to make some
  class beat ``y`` on a linear model: per class, the largest gains first."""
  x = np.asarray(x).reshape(x.shape[0], -1)
  z = np.asarray(logits_fn(jnp.asarray(x)))
  eye = np.eye(x.shape[1], dtype=np.float32)
  w = np.asarray(logits_fn(jnp.asarray(eye))) - np.asarray(logits_fn(jnp.zeros((1, x.shape[1]))))
  exact = np.full(x.shape[0], np.inf)
  for i in range(x.shape[0]):
    for t in range(z.shape[1]):
      if t == y[i]:
        continue
      diff = w[:, t] - w[:, y[i]]
      gain = np.sort(np.maximum(diff * (1 - x[i]), -diff * x[i]))[::-1]
      reached = np.flatnonzero(np.cumsum(gain) > z[i, y[i]] - z[i, t])
      if reached.size:
        exact[i] = min(exact[i], reached[0] + 1)
  return exact


def test_fmn_l0_is_never_below_the_exact_count_and_rarely_above(linear):
  logits_fn, x, y, _ = linear
  x = x.reshape(x.shape[0], -1)
  fn = lambda v: logits_fn(v.reshape((-1,) + attack_models.SHAPE))
  exact = _exact_l0(fn, x, np.asarray(y))
  found = np.asarray(attacks.fmn(norm="l0").distances(fn, x, y, jax.random.key(0)))
  assert (found >= exact).all()
  assert (found <= exact + 1).all() and (found == exact).mean() >= 0.9


def test_fmn_with_eps_stays_in_the_ball_and_is_adversarial_exactly_when_eps_allows(linear):
  logits_fn, x, y, pairwise = linear
  minimum = pairwise["l2"].min(axis=1)
  above = jnp.arange(x.shape[0]) % 2 == 0
  eps = jnp.where(above, 1.02 * minimum, 0.95 * minimum)
  x_adv = attacks.fmn(norm="l2")(logits_fn, x, y, jax.random.key(0), eps=eps)
  assert bool(jnp.all(core.l2_norm(x_adv - x) <= eps * (1 + 1e-5) + 1e-6))
  adversarial = jnp.argmax(logits_fn(x_adv), axis=1) != y
  np.testing.assert_array_equal(np.asarray(adversarial), np.asarray(above))
  # Below the minimum, the best point of the ball moved toward the boundary.
  gain = core.margin_loss(logits_fn(x_adv), y) - core.margin_loss(logits_fn(x), y)
  assert bool(jnp.all(gain[~above] > 0))


def test_fmn_targeted_reaches_the_given_class(linear):
  logits_fn, x, y, pairwise = linear
  target = jnp.argmax(jnp.where(jnp.isinf(pairwise["l2"]), -1.0, pairwise["l2"]), axis=1)
  attack = attacks.fmn(norm="l2", targeted=True)
  found = np.asarray(attack.distances(logits_fn, x, y, jax.random.key(0), target=target))
  to_target = np.asarray(jnp.take_along_axis(pairwise["l2"], target[:, None], axis=1)[:, 0])
  # The closest point classified as the target is at least the pairwise distance.
  assert np.isfinite(found).all() and (found >= to_target * (1 - 1e-4)).all()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_unbounded_finds_the_minimum_distance(linear, norm):
  logits_fn, x, y, pairwise = linear
  minimum = np.asarray(pairwise[norm].min(axis=1))
  found = np.asarray(
      attacks.fab(eps=0.5, norm=norm, steps=60).distances(logits_fn, x, y, jax.random.key(0)))
  assert (found >= minimum * (1 - 1e-4)).all() and (found <= minimum * 1.01).all()


def test_fab_l1_projection_is_the_linear_programs_optimum():
  """``min ||d||_1`` over ``<w, p + d> = b`` and the box, against scipy's LP solver (ties in
  ``|w|`` included); where the box cannot reach the hyperplane, the nearest corner."""
  rng = np.random.default_rng(0)
  n, dim = 24, 10
  p = rng.uniform(0, 1, (n, dim))
  w = rng.normal(size=(n, dim))
  w[0] = 1.5  # every |w| tied
  w[1, :4] = 0.0
  b = np.sum(w * p, axis=1) + rng.normal(size=n) * np.linspace(0.1, 4.0, n)
  d = np.asarray(
      jax.jit(project_onto_hyperplane, static_argnums=(3, 4))(jnp.asarray(p, jnp.float32),
                                                              jnp.asarray(w, jnp.float32),
                                                              jnp.asarray(b, jnp.float32), "l1",
                                                              (0.0, 1.0)))
  assert (p + d >= -1e-6).all() and (p + d <= 1 + 1e-6).all()
  assert (d[1, :4] == 0).all()
  solved = 0
  for i in range(n):
    # d = u - v with u, v >= 0: min sum(u + v), <w, u - v> = b - <w, p>, 0 <= p + u - v <= 1.
    eye = np.eye(dim)
    lp = linprog(np.ones(2 * dim),
                 A_ub=np.block([[eye, -eye], [-eye, eye]]),
                 b_ub=np.concatenate([1 - p[i], p[i]]),
                 A_eq=np.concatenate([w[i], -w[i]])[None],
                 b_eq=[b[i] - w[i] @ p[i]],
                 bounds=(0, None))
    if lp.status == 2:  # infeasible: the corner nearest the hyperplane
      corner = np.where(w[i] * np.sign(w[i] @ p[i] - b[i]) > 0, 0.0, 1.0) - p[i]
      np.testing.assert_allclose(d[i], np.where(w[i] != 0, corner, 0.0), atol=1e-5)
      continue
    assert lp.status == 0
    solved += 1
    assert abs(w[i] @ (p[i] + d[i]) - b[i]) < 1e-4
    np.testing.assert_allclose(np.abs(d[i]).sum(), lp.fun, rtol=1e-4, atol=1e-6)
  assert solved >= n // 2


# ----------------------------------------------------------------------------
# Curves in attacks.evaluate.


def test_evaluate_reads_every_epsilon_from_one_unbounded_run(linear, tmp_path):
  logits_fn, x, y, pairwise = linear
  minimum = np.asarray(pairwise["l2"].min(axis=1))
  grid = [0.0] + sorted(np.quantile(minimum, [0.25, 0.5, 0.75]).tolist()) + [10.0]
  report = attacks.evaluate(logits_fn,
                            x,
                            y,
                            attacks.fmn(norm="l2"),
                            eps=grid,
                            key=jax.random.key(0),
                            batch_size=12,
                            progress=False,
                            plot_path=str(tmp_path / "curve.png"))
  np.testing.assert_allclose(report.distances, minimum, rtol=2e-3)
  expected = [np.mean(report.distances > e) for e in grid]
  np.testing.assert_allclose(report.robust_accuracy, expected)
  np.testing.assert_allclose(report.robust_accuracy, robustness_curve(report.distances, grid))
  assert report.robust_accuracy[0] == 1.0 and report.robust_accuracy[-1] == 0.0
  assert report.stage_flags.shape == (len(grid), 1, x.shape[0])
  assert os.path.getsize(tmp_path / "curve.png") > 1000
  content = json.loads(report.to_json())
  assert len(content["distances"]) == x.shape[0]
  # Unbounded is the default; at each epsilon instead, the same decisions on this model.
  fixed = attacks.evaluate(logits_fn,
                           x,
                           y,
                           attacks.fmn(norm="l2", steps=100),
                           eps=grid[1:4],
                           key=jax.random.key(0),
                           minimum_norm=False,
                           progress=False)
  assert fixed.distances is None
  np.testing.assert_array_equal(fixed.robust_flags, report.robust_flags[1:4])


def test_distances_mark_misclassified_points_zero_and_unbroken_ones_inf():
  # A model whose class 0 can never be left: no adversarial point exists for y = 0.
  def logits_fn(v):
    s = jnp.sum(v.reshape(v.shape[0], -1), axis=1)
    return jnp.stack([jnp.full_like(s, 100.0), s], axis=1)

  x = jnp.full((3, 4), 0.5)
  y = jnp.asarray([0, 1, 0])  # the second point is misclassified
  d = np.asarray(attacks.fmn(norm="linf", steps=10).distances(logits_fn, x, y, jax.random.key(0)))
  assert np.isinf(d[0]) and np.isinf(d[2]) and d[1] == 0
  report = attacks.evaluate(logits_fn,
                            x,
                            y,
                            attacks.fmn(norm="linf", steps=10),
                            eps=[0.1],
                            key=jax.random.key(0),
                            progress=False,
                            run_diagnostics=False)
  np.testing.assert_array_equal(report.robust_flags[0], [True, False, True])
  assert json.loads(report.to_json())["distances"][0] is None  # JSON has no infinity


def test_a_killed_curve_resumes(linear, tmp_path):
  logits_fn, x, y, _ = linear
  kwargs = dict(eps=[0.1, 0.2],
                key=jax.random.key(0),
                batch_size=8,
                progress=False,
                state_dir=str(tmp_path))

  class Killed(Exception):
    pass

  def kill(done, _):
    if done == 2:
      raise Killed

  with pytest.raises(Killed):
    attacks.evaluate(logits_fn, x, y, attacks.fmn(norm="linf"), callback=kill, **kwargs)
  resumed = attacks.evaluate(logits_fn, x, y, attacks.fmn(norm="linf"), **kwargs)
  fresh = attacks.evaluate(logits_fn, x, y, attacks.fmn(norm="linf"), **{
      **kwargs, "state_dir": None
  })
  assert resumed.resumed_from_batch == 2
  np.testing.assert_array_equal(resumed.distances, fresh.distances)


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs, match", [
    ({
        "norm": "l3"
    }, "norm"),
    ({
        "steps": 0
    }, "steps"),
    ({
        "num_targets": 0
    }, "num_targets"),
    ({
        "alpha_init": -1.0
    }, "alpha_init"),
    ({
        "gamma_init": 1.5
    }, "gamma_init"),
    ({
        "eps": -0.1
    }, "eps"),
    ({
        "eps": float("nan")
    }, "eps"),
])
def test_fmn_rejects_bad_settings(kwargs, match):
  with pytest.raises(InputError, match=match):
    attacks.fmn(**kwargs)


def test_minimum_norm_misuse_is_a_clear_error(linear):
  logits_fn, x, y, _ = linear
  with pytest.raises(InputError, match="not a minimum-norm attack"):
    attacks.pgd(eps=0.1).distances(logits_fn, x, y, jax.random.key(0))
  with pytest.raises(InputError, match="only minimum-norm attacks"):
    attacks.pgd(eps=0.1)(logits_fn, x, y, jax.random.key(0), eps=np.inf)
  with pytest.raises(InputError, match="pass eps="):
    attacks.evaluate(logits_fn, x, y, attacks.fmn(), key=0, progress=False)
  with pytest.raises(InputError, match="minimum_norm=True"):
    attacks.evaluate(logits_fn,
                     x,
                     y, [attacks.fgsm(eps=0.1), attacks.fab(eps=0.1)],
                     key=0,
                     minimum_norm=True,
                     progress=False)
  with pytest.raises(InputError, match="l0"):
    attacks.pgd(eps=1.0, norm="l0")
  with pytest.raises(InputError, match="norm"):
    attacks.autoattack(eps=1.0, norm="l0")

"""Gradient attacks: PGD, MultiTargeted, APGD, APGD-T, EOT, and the fast conv input-gradient.

Known optima on a linear classifier without a box: to push class ``t`` over
``y`` the best L-inf perturbation is ``-eps * sign(w_y - w_t)`` and the best L2
one ``eps * (w_t - w_y) / ||w_t - w_y||_2``, so the smallest margin
``z_y - max_{j != y} z_j`` reachable in the ball is
``min_t (z_y - z_t) - eps * ||w_y - w_t||_{1 or 2}``. APGD follows a NumPy port
of AutoAttack's loop step for step and its published checkpoints; on a trained
MLP it is at least as strong as PGD. EOT recovers the mean model's optimum on a
model with random weights, where single draws mislead the attack.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attack_models
import attacks
from attacks import core
from attacks.apgd import checkpoints, initial_point, run_once
from attacks.core import top_targets
from robustlib import fastgrad
from robustlib.checks import InputError

NO_BOX = (-math.inf, math.inf)

# ----------------------------------------------------------------------------
# A linear classifier and its closed forms.


class Linear:
  """``logits = x_flat @ w + b`` on inputs ``[N, 8, 8]`` with 6 classes, no box."""

  def __init__(self, seed=3, n=6, num_classes=6):
    rng = np.random.default_rng(seed)
    self.w = rng.normal(size=(64, num_classes)).astype(np.float32)
    self.b = (rng.normal(size=num_classes) * 0.1).astype(np.float32)
    self.x = rng.normal(size=(n, 8, 8)).astype(np.float32)
    self.y = np.argmax(self.logits(self.x), axis=1).astype(np.int32)
    self.num_classes = num_classes

  def __call__(self, x):
    return x.reshape(x.shape[0], -1) @ self.w + self.b

  def logits(self, x):
    return np.asarray(x, np.float64).reshape(len(x), -1) @ self.w + self.b

  def diff(self):
    """``w_y - w_t`` per example and class: ``[N, K, D]`` (float64)."""
    w = self.w.T.astype(np.float64)
    return w[self.y][:, None, :] - w[None, :, :]

  def gap(self):
    """``z_y - z_t`` at ``x``, inf at ``t = y``: ``[N, K]``."""
    z = self.logits(self.x)
    gap = np.take_along_axis(z, self.y[:, None], axis=1) - z
    return np.where(np.arange(self.num_classes)[None] == self.y[:, None], np.inf, gap)

  def dual(self, norm):
    """``||w_y - w_t||`` in the dual norm (L1 for L-inf, L2 for L2), 1 at ``t = y``: ``[N, K]``."""
    d = np.linalg.norm(self.diff(), ord=1 if norm == "linf" else 2, axis=-1)
    return np.where(np.arange(self.num_classes)[None] == self.y[:, None], 1.0, d)

  def margin(self, x):
    """``z_y - max_{j != y} z_j`` at ``x``: ``[N]``."""
    z = self.logits(x)
    own = np.take_along_axis(z, self.y[:, None], axis=1)[:, 0]
    z[np.arange(len(z)), self.y] = -np.inf
    return own - z.max(axis=1)


@pytest.fixture(scope="module")
def linear():
  return Linear()


def _second_class(model):
  z = model.logits(model.x)
  z[np.arange(len(z)), model.y] = -np.inf
  return np.argmax(z, axis=1).astype(np.int32)


def _corner(model, target, eps, norm):
  """The optimum of ``z_t - z_y`` in the ball: ``[N, 8, 8]``."""
  d = model.diff()[np.arange(len(target)), target]  # w_y - w_t: [N, D]
  if norm == "linf":
    step = -np.sign(d)
  else:
    step = -d / np.linalg.norm(d, axis=1, keepdims=True)
  return model.x + (eps[:, None] * step).reshape(model.x.shape)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_target_pgd_reaches_the_optimum_of_the_targeted_margin(linear, norm):
  target = _second_class(linear)
  to_target = linear.gap()[np.arange(6), target] / linear.dual(norm)[np.arange(6), target]
  eps = (0.5 * to_target).astype(np.float32)  # never classified as t: the best is the optimum
  attack = attacks.pgd(eps=1.0,
                       steps=10,
                       norm=norm,
                       loss="margin",
                       targeted=True,
                       random_start=norm == "linf",
                       bounds=NO_BOX)
  x_adv = np.asarray(attack(linear, linear.x, linear.y, jax.random.key(0), eps=eps, target=target))
  np.testing.assert_allclose(x_adv, _corner(linear, target, eps, norm), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def multitargeted_attacks():
  # 5 targets x 2 restarts = 10 pairs in chunks of 4: the last chunk is padded.
  return {
      norm:
          attacks.multitargeted(eps=1.0,
                                steps=10,
                                norm=norm,
                                restarts=2,
                                chunk_size=4,
                                random_start=norm == "linf",
                                bounds=NO_BOX) for norm in ("linf", "l2")
  }


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_multitargeted_best_margin_is_the_closed_form(linear, multitargeted_attacks, norm):
  distance = (linear.gap() / linear.dual(norm)).min(axis=1)
  # Half the examples stay robust, half are broken.
  eps = (distance * np.where(np.arange(6) % 2 == 0, 0.5, 1.5)).astype(np.float32)
  x_adv = multitargeted_attacks[norm](linear, linear.x, linear.y, jax.random.key(1), eps=eps)
  expected = np.min(linear.gap() - eps[:, None] * linear.dual(norm), axis=1)
  margin = linear.margin(np.asarray(x_adv))
  np.testing.assert_allclose(margin, expected, rtol=1e-4, atol=1e-4)
  assert (np.sign(margin) == np.where(np.arange(6) % 2 == 0, 1, -1)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_multitargeted_with_default_settings_reaches_the_closed_form(linear, norm):
  distance = (linear.gap() / linear.dual(norm)).min(axis=1)
  eps = (distance * np.where(np.arange(6) % 2 == 0, 0.5, 1.5)).astype(np.float32)
  attack = attacks.multitargeted(eps=1.0, norm=norm, bounds=NO_BOX)  # 40 steps, random starts
  x_adv = attack(linear, linear.x, linear.y, jax.random.key(2), eps=eps)
  expected = np.min(linear.gap() - eps[:, None] * linear.dual(norm), axis=1)
  np.testing.assert_allclose(linear.margin(np.asarray(x_adv)), expected, rtol=1e-4, atol=1e-4)


def test_top_targets_are_the_other_classes_by_clean_logit():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.5]])
  y = jnp.asarray([3, 1])
  np.testing.assert_array_equal(top_targets(logits, y, 2), [[1, 2], [0, 2]])
  np.testing.assert_array_equal(top_targets(logits, y, None), [[1, 2, 0], [0, 2, 3]])
  np.testing.assert_array_equal(top_targets(logits, y, 9), top_targets(logits, y, None))


def test_multitargeted_memory_is_bounded_by_the_chunk(linear):
  x, y = jnp.asarray(linear.x), jnp.asarray(linear.y)
  eps = jnp.full((6,), 0.1)

  def largest(chunk_size, restarts):
    attack = attacks.multitargeted(0.1, steps=2, restarts=restarts, chunk_size=chunk_size)
    jaxpr = jax.make_jaxpr(lambda x: attack.run(linear, x, y, jax.random.key(0), eps, None))(x)
    return attack_models.largest_intermediate(jaxpr.jaxpr)

  per_pair = x.size
  assert largest(2, 1) <= 2 * per_pair
  assert largest(2, 8) == largest(2, 1)  # 40 pairs cost what 5 do
  assert largest(10, 1) >= 5 * per_pair  # (5 pairs side by side): the bound is not vacuous


# ----------------------------------------------------------------------------
# APGD.


def test_apgd_checkpoints_follow_the_published_schedule():
  # p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06), in hundredths.
  p = [0, 22]
  while p[-1] + max(p[-1] - p[-2] - 3, 6) <= 100:
    p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
  assert p[1:] == [22, 41, 57, 70, 80, 87, 93, 99]
  assert checkpoints(100) == p[1:]
  assert checkpoints(1000) == [10 * v for v in p[1:]]
  assert checkpoints(3) == [1, 2, 3]  # intervals of at least one step


def _reference_apgd(loss_and_grad, x, x0, eps, steps):
  """AutoAttack's APGD loop (``autopgd_base.attack_single_run``: L-inf, one run from
  ``x0``, no box) in NumPy float32 on flat inputs ``[N, D]``; returns the highest-loss
  point, its loss and the number of halvings of each example's step. Where AutoAttack
  compares the first step's loss with an unset entry of its loss history (zero), this
  compares it with the loss at ``x0``."""
  eps = eps[:, None]
  n_iter_2, n_iter_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps),
                                                                   1), max(int(0.03 * steps), 1)
  x_adv = x0.copy()
  loss, grad = loss_and_grad(x_adv)
  x_best, grad_best, loss_best = x_adv.copy(), grad.copy(), loss.copy()
  history = [loss]
  step_size = np.float32(2.0) * eps
  x_adv_old = x_adv.copy()
  k, counter3 = n_iter_2, 0
  loss_best_last_check, reduced_last_check = loss_best.copy(), np.ones(len(x), bool)
  halvings = np.zeros(len(x), int)
  for i in range(steps):
    grad2 = x_adv - x_adv_old
    x_adv_old = x_adv.copy()
    a = np.float32(0.75 if i > 0 else 1.0)
    x_adv_1 = np.clip(x_adv + step_size * np.sign(grad), x - eps, x + eps)
    x_adv_1 = np.clip(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps, x + eps)
    x_adv = x_adv_1
    loss, grad = loss_and_grad(x_adv)
    history.append(loss)
    ind = loss > loss_best
    x_best[ind], grad_best[ind], loss_best[ind] = x_adv[ind], grad[ind], loss[ind]
    counter3 += 1
    if counter3 == k:
      t = sum((history[-1 - c] > history[-2 - c]).astype(np.float32) for c in range(k))
      fl_oscillation = t <= k * 0.75
      fl_oscillation |= ~reduced_last_check & (loss_best_last_check >= loss_best)
      reduced_last_check, loss_best_last_check = fl_oscillation.copy(), loss_best.copy()
      step_size[fl_oscillation] /= 2.0
      halvings += fl_oscillation
      x_adv[fl_oscillation] = x_best[fl_oscillation]
      grad[fl_oscillation] = grad_best[fl_oscillation]
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return x_best, loss_best, halvings


def test_apgd_follows_autoattacks_loop():
  rng = np.random.default_rng(7)
  w1 = jnp.asarray(rng.normal(size=(64, 16)) * 0.5, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  model = lambda v: jnp.tanh(v @ w1) @ w2
  x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
  y = jnp.argmax(model(x), axis=1)
  eps = np.full(8, 0.3, np.float32)
  steps, key = 25, jax.random.key(4)
  ce = lambda logits: attacks.core.cross_entropy_loss(logits, y)
  judge = lambda logits: (jnp.zeros(logits.shape[:1], bool), ce(logits))  # loss only

  @jax.jit
  def run(x, eps):
    best = attacks.core.init_best(x, *judge(model(x)))
    return run_once(model,
                    x,
                    eps,
                    key,
                    best,
                    loss=ce,
                    judge=judge,
                    steps=steps,
                    norm="linf",
                    bounds=NO_BOX)

  per_example = jax.jit(lambda v: (ce(model(v)), jax.grad(lambda u: ce(model(u)).sum())(v)))
  loss_and_grad = lambda v: tuple(np.array(a) for a in per_example(jnp.asarray(v)))
  start = np.array(initial_point(key, x, jnp.asarray(eps), "linf", NO_BOX))
  x_ref, loss_ref, halvings = _reference_apgd(loss_and_grad, np.asarray(x), start, eps, steps)
  assert halvings.min() >= 1 and halvings.max() >= 3  # the checkpoints acted
  best = run(x, jnp.asarray(eps))
  np.testing.assert_allclose(np.asarray(best.score), loss_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(best.x), x_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_targeted_margin_reaches_the_optimum(linear, norm):
  target = _second_class(linear)
  to_target = linear.gap()[np.arange(6), target] / linear.dual(norm)[np.arange(6), target]
  eps = (0.5 * to_target).astype(np.float32)
  attack = attacks.apgd(1.0, steps=40, norm=norm, loss="margin", targeted=True, bounds=NO_BOX)
  x_adv = np.asarray(attack(linear, linear.x, linear.y, jax.random.key(0), eps=eps, target=target))
  np.testing.assert_allclose(x_adv,
                             _corner(linear, target, eps, norm),
                             rtol=0,
                             atol=2e-6 if norm == "linf" else 1e-4)


# ----------------------------------------------------------------------------
# L1: the projection onto the ball and the box, and L1-APGD.


def _l1_box_projection_reference(v, x, eps, lo=0.0, hi=1.0):
  """Float64 bisection on the soft threshold of the KKT conditions, one row."""
  d = v - x
  room = np.where(d > 0, hi - x, x - lo)

  def step(tau):
    return np.sign(d) * np.minimum(np.maximum(np.abs(d) - tau, 0.0), room)

  if np.abs(step(0.0)).sum() <= eps:
    return x + step(0.0)
  low, high = 0.0, np.abs(d).max()
  for _ in range(200):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if np.abs(step(mid)).sum() > eps else (low, mid)
  return x + step(high)


def test_l1_box_projection_is_the_euclidean_projection():
  rng = np.random.default_rng(4)
  n, dim = 24, 40
  x = rng.uniform(0, 1, (n, dim))
  x[:, :10] = 0.0  # coordinates on a box face
  v = x + rng.normal(size=(n, dim)) * np.linspace(0.01, 1.0, n)[:, None]
  eps = rng.uniform(0.05, 3.0, n)
  p = np.asarray(
      core.project(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32),
                   jnp.asarray(eps, jnp.float32), "l1", (0.0, 1.0)), np.float64)
  assert (np.abs(p - x).sum(1) <= eps * (1 + 1e-5) + 1e-6).all()
  assert (p >= -1e-7).all() and (p <= 1 + 1e-7).all()
  for i in range(n):
    np.testing.assert_allclose(p[i], _l1_box_projection_reference(v[i], x[i], eps[i]), atol=2e-5)
    # Optimality: <v - p, z - p> <= 0 for feasible z (corners of the set on random supports).
    for _ in range(20):
      z = np.clip(x[i] + rng.laplace(size=dim), 0, 1)
      z = x[i] + (z - x[i]) * min(1.0, eps[i] / max(np.abs(z - x[i]).sum(), 1e-12))
      assert (v[i] - p[i]) @ (z - p[i]) <= 1e-4


def test_kth_smallest_is_the_sorted_value():
  kth_smallest = core.kth_smallest
  rng = np.random.default_rng(0)
  v = np.abs(rng.normal(size=(5, 300))).astype(np.float32)
  v[1, :50] = 0.0
  v[2] = 0.25  # all tied
  k = np.asarray([0, 10, 299, 150, 77])
  np.testing.assert_array_equal(np.asarray(kth_smallest(jnp.asarray(v), jnp.asarray(k))),
                                np.sort(v, axis=1)[np.arange(5), k])


def test_l1_apgd_nears_the_closed_form_of_a_linear_classifier(linear):
  """Without a box, the least margin in the L1 ball is ``min_t (z_y - z_t) - eps
  ||w_y - w_t||_inf``: all of the budget on the coordinate of largest weight gap. L1-APGD
  moves its chosen coordinates by equal amounts, so once two are left the projection
  keeps both: it gets most of the way, not to the optimum (measured: 76 % to 99.5 % of
  the optimal reduction of the margin)."""
  linf_dual = np.abs(linear.diff()).max(axis=-1)  # [N, K]
  own = np.arange(linear.num_classes)[None] == linear.y[:, None]
  distance = np.where(own, np.inf, linear.gap() / np.where(own, 1.0, linf_dual))
  eps = (0.6 * distance.min(axis=1)).astype(np.float32)  # robust: the margin stays positive
  attack = attacks.apgd(1.0, norm="l1", loss="margin", bounds=NO_BOX)
  x_adv = np.asarray(attack(linear, linear.x, linear.y, jax.random.key(0), eps=eps))
  assert (np.abs(x_adv - linear.x).reshape(6, -1).sum(1) <= eps * (1 + 1e-5)).all()
  optimum = np.min(np.where(own, np.inf, linear.gap() - eps[:, None] * linf_dual), axis=1)
  start = linear.gap().min(axis=1)
  reached = (start - linear.margin(x_adv)) / (start - optimum)
  assert (reached <= 1 + 1e-4).all()  # never past the optimum: the closed form is right
  assert reached.min() > 0.7 and reached.mean() > 0.9, reached


def test_l1_apgd_breaks_points_on_a_trained_mlp(digits_mlp):
  logits_fn, x, y = digits_mlp
  key = jax.random.key(0)
  accuracy = lambda attack: attack_models.accuracy(logits_fn, attack(logits_fn, x, y, key), y)
  clean = attack_models.accuracy(logits_fn, x, y)
  ce = accuracy(attacks.apgd(2.0, norm="l1", steps=40))
  targeted = accuracy(attacks.apgd_t(2.0, norm="l1", steps=40, num_targets=3))
  assert ce <= clean - 0.3 and targeted <= clean - 0.3, (clean, ce, targeted)


@pytest.fixture(scope="module")
def digits_mlp():
  return attack_models.digits_mlp()


def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_mlp(digits_mlp):
  logits_fn, x, y = digits_mlp
  eps, key = 0.1, jax.random.key(0)
  accuracy = lambda attack: attack_models.accuracy(logits_fn, attack(logits_fn, x, y, key), y)
  clean = attack_models.accuracy(logits_fn, x, y)
  pgd = accuracy(attacks.pgd(eps, steps=40))
  apgd = accuracy(attacks.apgd(eps, steps=40))
  assert pgd <= clean - 0.3  # a radius where the attacks matter
  assert apgd <= pgd, (clean, pgd, apgd)


def test_dlr_losses_need_enough_classes():
  x = jnp.zeros((2, 4))
  three = lambda v: v[:, :3]
  with pytest.raises(InputError, match="at least 4 classes"):
    attacks.apgd_t(0.1, steps=2)(three, x, jnp.asarray([0, 1]), jax.random.key(0))
  with pytest.raises(InputError, match="at least 3 classes"):
    attacks.apgd(0.1, steps=2, loss="dlr")(lambda v: v[:, :2], x, jnp.asarray([0, 1]),
                                           jax.random.key(0))


def test_attack_names():
  assert attacks.apgd(0.1).name == "apgd-ce"
  assert attacks.apgd(0.1, loss="dlr").name == "apgd-dlr"
  assert attacks.apgd_t(0.1).name == "apgd-t" and attacks.apgd_t(0.1).min_classes == 4
  assert attacks.multitargeted(0.1).name == "multitargeted"
  assert attacks.eot(attacks.apgd(0.1), samples=4).name == "eot-apgd-ce"


# ----------------------------------------------------------------------------
# EOT.


class NoisyLinear:
  """A randomized linear model: ``x @ (w + scale * noise) + b``, fresh Gaussian noise per draw.

  Class 0 leads by a bias of 5 on small inputs ``[6, 64]``; each example has a target
  class ``t``. Single draws' gradients are dominated by the noise; their mean is
  ``w_t - w_y``.
  """

  def __init__(self, scale):
    rng = np.random.default_rng(5)
    self.w = rng.normal(size=(64, 6)).astype(np.float32)
    self.b = np.eye(6, dtype=np.float32)[0] * 5
    self.scale = scale
    self.x = (0.1 * rng.normal(size=(6, 64))).astype(np.float32)
    self.y = np.zeros(6, np.int32)
    self.target = (np.arange(6) % 5 + 1).astype(np.int32)

  def __call__(self, x, key):
    return x @ (self.w + self.scale * jax.random.normal(key, self.w.shape)) + self.b


def test_a_randomized_model_draws_per_input_and_repeats_per_input():
  model = attacks.Randomized(NoisyLinear(1.0), jax.random.key(0))
  x = jnp.asarray(model.fn.x)
  first = np.asarray(model(x))
  np.testing.assert_array_equal(np.asarray(model(x)), first)  # pure: same input, same draw
  np.testing.assert_allclose(np.asarray(jax.jit(model)(x)), first, rtol=1e-5, atol=1e-5)
  moved = np.asarray(model(x.at[0, 0].add(1e-3)))
  assert np.abs(moved - first).max() > 0.1  # another input, another draw
  # The input's key does not block gradients.
  grad = jax.grad(lambda v: model(v).sum())(x)
  assert np.abs(np.asarray(grad)).max() > 0


def test_eot_recovers_the_mean_models_optimum():
  """Single draws point the sign steps in random directions; 64 draws per iterate
  point them at the mean model's optimum ``x - eps sign(w_y - w_t)``."""
  noisy = NoisyLinear(3.0)
  model = attacks.Randomized(noisy, jax.random.key(0))
  eps = np.full(6, 0.05, np.float32)  # the mean model keeps class 0 throughout
  pgd = attacks.pgd(1.0, steps=20, loss="margin", targeted=True, bounds=NO_BOX)
  d = noisy.w[:, 0][None] - noisy.w.T[noisy.target]  # w_y - w_t: [N, D]

  def gain(attack):
    """The mean model's gain in z_t - z_y, as a fraction of the optimum's."""
    x_adv = attack(model, noisy.x, noisy.y, jax.random.key(1), eps=eps, target=noisy.target)
    return np.sum(-d * (np.asarray(x_adv) - noisy.x), axis=1) / (eps * np.abs(d).sum(1))

  plain, averaged = gain(pgd), gain(attacks.eot(pgd, samples=64))
  assert averaged.min() > 0.85 and plain.mean() < averaged.mean() - 0.3, (plain, averaged)


def test_a_randomized_model_is_detected_by_the_diagnostics(linear):
  from attacks import diagnostics  # pylint: disable=import-outside-toplevel
  noisy = NoisyLinear(0.5)
  model = attacks.Randomized(noisy, jax.random.key(0))
  assert diagnostics.check_randomized(model, noisy.x)
  assert not diagnostics.check_randomized(attacks.Randomized(NoisyLinear(0.0), jax.random.key(0)),
                                          noisy.x)
  assert not diagnostics.check_randomized(linear, linear.x)


def test_eot_still_averages_draws_of_a_float16_model():
  noisy = NoisyLinear(3.0)
  model = attacks.Randomized(lambda v, k: noisy(v.astype(jnp.float32), k), jax.random.key(0))
  x16 = jnp.asarray(noisy.x, jnp.float16)
  pgd = attacks.pgd(0.05, steps=20, loss="margin", targeted=True, bounds=NO_BOX)
  d = noisy.w[:, 0][None] - noisy.w.T[noisy.target]
  x_adv = attacks.eot(pgd, samples=64)(model, x16, noisy.y, jax.random.key(1), target=noisy.target)
  assert x_adv.dtype == jnp.float16
  moved = np.asarray(x_adv, np.float32) - np.asarray(x16, np.float32)
  assert np.min(np.sum(-d * moved, axis=1) / (0.05 * np.abs(d).sum(1))) > 0.8


def test_eot_on_a_deterministic_model_is_the_attack_itself(linear):
  fgsm = attacks.fgsm(0.1, bounds=NO_BOX)
  wrapped = attacks.eot(fgsm, samples=3)
  assert (wrapped.eps, wrapped.norm, wrapped.bounds, wrapped.targeted) == (0.1, "linf", NO_BOX,
                                                                           False)
  args = (linear, linear.x, linear.y, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(wrapped(*args)), np.asarray(fgsm(*args)))


def test_eot_averages_loss_gradients_and_judges_on_one_draw():
  """AutoAttack's EOT: the mean over draws of the loss gradient (not the gradient of the
  loss of the mean logits: they differ for cross-entropy), the loss of the last draw."""
  noisy = NoisyLinear(3.0)
  model = attacks.Randomized(noisy, jax.random.key(0))
  view = attacks.eot.Expectation(model, jax.random.key(7), 5, judge_one_draw=True)
  ce = lambda logits: core.cross_entropy_loss(logits, jnp.asarray(noisy.y))
  x = jnp.asarray(noisy.x)
  grad, (value, logits) = core.loss_gradient(view, ce)(x)
  keys = jax.random.split(attacks.eot.input_key(jax.random.key(7), x), 5)
  per_draw = [jax.grad(lambda v, k=k: jnp.sum(ce(noisy(v, k))))(x) for k in keys]
  np.testing.assert_allclose(np.asarray(grad), np.mean(per_draw, axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(noisy(x, keys[-1])), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(value), np.asarray(ce(noisy(x, keys[-1]))), rtol=1e-5)
  of_mean = jax.grad(lambda v: jnp.sum(ce(view(v))))(x)  # what averaging logits would give
  assert np.abs(np.asarray(of_mean) - np.asarray(grad)).max() > 1e-2


def test_autoattack_rand_averages_apgd_over_draws():
  suite = attacks.autoattack(0.5, version="rand", bounds=NO_BOX, steps=3, eot_samples=2)
  assert [s.name for s in suite.stages] == ["eot-apgd-ce", "eot-apgd-dlr"]
  noisy = NoisyLinear(0.5)
  model = attacks.Randomized(noisy, jax.random.key(0))
  x_adv = np.asarray(suite.stages[0](model, noisy.x, noisy.y, jax.random.key(0)))
  assert np.abs(x_adv - noisy.x).max() == pytest.approx(0.5)  # APGD starts on the sphere


# ----------------------------------------------------------------------------
# Bad hyper-parameters.


@pytest.mark.parametrize("factory, kwargs", [
    ("multitargeted", dict(eps=-0.1)),
    ("multitargeted", dict(eps=0.1, steps=0)),
    ("multitargeted", dict(eps=0.1, restarts=0)),
    ("multitargeted", dict(eps=0.1, num_targets=0)),
    ("multitargeted", dict(eps=0.1, chunk_size=0)),
    ("multitargeted", dict(eps=0.1, step_size=-0.01)),
    ("multitargeted", dict(eps=0.1, step_size=0.01, optimizer=optax.adam(0.01))),
    ("multitargeted", dict(eps=0.1, norm="l1")),
    ("apgd", dict(eps=-0.1)),
    ("apgd", dict(eps=0.1, steps=0)),
    ("apgd", dict(eps=0.1, restarts=0)),
    ("apgd", dict(eps=0.1, loss="hinge")),
    ("apgd", dict(eps=0.1, momentum=0.0)),
    ("apgd", dict(eps=0.1, rho=1.5)),
    ("apgd", dict(eps=0.1, norm="l0")),
    ("apgd", dict(eps=0.1, norm="l1", large_eps=True, loss="dlr", restarts=0)),
    ("apgd_t", dict(eps=0.1, num_targets=0)),
    ("apgd_t", dict(eps=0.1, steps=2.5)),
    ("apgd_t", dict(eps=0.1, bounds=(1.0, 0.0))),
])
def test_bad_hyper_parameters_are_errors(factory, kwargs):
  with pytest.raises(InputError):
    getattr(attacks, factory)(**kwargs)


def test_eot_rejects_bad_arguments():
  with pytest.raises(InputError, match="samples"):
    attacks.eot(attacks.pgd(0.1), samples=0)
  with pytest.raises(InputError, match="wraps an attack"):
    attacks.eot(attacks.pgd, samples=4)


# ----------------------------------------------------------------------------
# fastgrad: the prepared convolution input-gradient.


def _conv_net():
  """A conv net with strides, padding, kernel and input dilation, feature groups and an
  NCHW layer; weights closed over (constant), input ``[N, 9, 9, 4]``."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(
      rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
  params = {
      "k1": normal(3, 3, 4, 8),
      "k2": normal(3, 3, 4, 8),  # 2 feature groups: 8 inputs as 2 x 4
      "k3": normal(2, 2, 8, 6),
      "k4": normal(5, 6, 3, 3),  # OIHW
      "dense": normal(5 * 5 * 5, 3),
  }
  nhwc = ("NHWC", "HWIO", "NHWC")

  def net(params, x):
    h = lax.conv_general_dilated(x, params["k1"], (2, 2), "SAME",
                                 dimension_numbers=nhwc)  # [N, 5, 5, 8]
    h = jnp.tanh(h)
    h = lax.conv_general_dilated(h,
                                 params["k2"], (1, 1), ((2, 1), (1, 2)),
                                 rhs_dilation=(2, 1),
                                 feature_group_count=2,
                                 dimension_numbers=nhwc)  # [N, 4, 6, 8]
    h = jax.nn.relu(h)
    h = lax.conv_general_dilated(h,
                                 params["k3"], (1, 1), ((0, 0), (0, 0)),
                                 lhs_dilation=(2, 1),
                                 dimension_numbers=nhwc)  # [N, 6, 5, 6]
    h = jnp.transpose(h, (0, 3, 1, 2))  # NCHW
    h = lax.conv_general_dilated(h,
                                 params["k4"], (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))  # [N, 6, 6, 5]
    h = jax.nn.softplus(h[:, :5, :5, :])
    return h.reshape(h.shape[0], -1) @ params["dense"]

  return net, params


def test_fastgrad_matches_plain_gradients_of_a_conv_net():
  net, params = _conv_net()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 9, 9, 4)), jnp.float32)
  y = jnp.asarray([0, 1, 2])
  logits_fn = lambda v: net(params, v)
  fast = fastgrad.prepare(logits_fn, x)
  assert fast is not logits_fn  # its convolutions were found
  np.testing.assert_array_equal(np.asarray(fast(x)), np.asarray(logits_fn(x)))

  def loss(fn, v):
    return jnp.sum(attacks.core.cross_entropy_loss(fn(v), y))

  # Input-gradients, prepared inside a jitted function as attacks do; weight gradients
  # through a prepared function (adversarial training) are JAX's.
  @jax.jit
  def grads(params, x):
    prepared = fastgrad.prepare(logits_fn, x)
    weight_loss = lambda p, prepare: loss(
        fastgrad.prepare(lambda v: net(p, v), x) if prepare else lambda v: net(p, v), x)
    return {
        "input":
            (jax.grad(lambda u: loss(prepared, u))(x), jax.grad(lambda u: loss(logits_fn, u))(x)),
        "weights": (jax.grad(weight_loss)(params, True), jax.grad(weight_loss)(params, False)),
    }

  found = grads(params, x)
  np.testing.assert_allclose(*found["input"], rtol=1e-5, atol=1e-7)
  for name in params:
    np.testing.assert_allclose(found["weights"][0][name],
                               found["weights"][1][name],
                               rtol=1e-5,
                               atol=1e-7,
                               err_msg=name)


TRANSPOSE_CASES = {
    # (lhs shape, kernel shape, lax.conv_general_dilated keywords, the input-gradient's
    # implementation); channels-last by default.
    "stride2_same": ((2, 9, 9, 3), (3, 3, 3, 5), dict(window_strides=(2, 2),
                                                      padding="SAME"), "convolution"),
    "asymmetric_pad_dilated": ((2, 8, 7, 4), (3, 2, 4, 6),
                               dict(window_strides=(1, 1),
                                    padding=((2, 0), (1, 3)),
                                    rhs_dilation=(2, 1)), "convolution"),
    "stride3_valid_nchw": ((2, 3, 11, 10), (5, 3, 4, 3),
                           dict(window_strides=(3, 2),
                                padding="VALID",
                                dimension_numbers=("NCHW", "OIHW", "NCHW")), "convolution"),
    "wide_channels": ((2, 5, 5, 80), (3, 3, 80, 64), dict(window_strides=(1, 1),
                                                          padding="SAME"), "convolution"),
    "input_dilated": ((2, 5, 5, 2), (2, 2, 2, 3),
                      dict(window_strides=(1, 1), padding=((1, 0), (0, 1)),
                           lhs_dilation=(2, 2)), "xla"),
    "grouped": ((2, 6, 6, 4), (3, 3, 2, 6),
                dict(window_strides=(1, 1), padding="SAME", feature_group_count=2), "xla"),
    # Few input channels (a first layer): a matrix product and a scatter.
    "first_layer_stride2": (
        (2, 12, 12, 1), (4, 4, 1, 16), dict(window_strides=(2, 2), padding="VALID"), "scatter"),
    "first_layer_padded_dilated_nchw": (
        (2, 2, 9, 8), (12, 2, 3, 2),
        dict(window_strides=(2, 1),
             padding=((2, 1), (0, 3)),
             rhs_dilation=(1, 2),
             dimension_numbers=("NCHW", "OIHW", "NCHW")), "scatter"),
    "first_layer_1d_cropped": ((2, 10, 2), (3, 2, 8), dict(window_strides=(3,),
                                                           padding=((1, -1),)), "scatter"),
}


@pytest.mark.parametrize("case", sorted(TRANSPOSE_CASES))
def test_fastgrad_input_gradient_is_differentiable_like_jax_own(case, monkeypatch):
  """Certified training differentiates a backward bound pass, i.e. the input-gradient
  convolution, with respect to the kernel and to the rows it is applied to."""
  lhs_shape, kernel_shape, keywords, implementation = TRANSPOSE_CASES[case]
  keywords = dict(keywords)
  if len(lhs_shape) == 4:
    keywords.setdefault("dimension_numbers", ("NHWC", "HWIO", "NHWC"))
  else:
    keywords.setdefault("dimension_numbers", ("NWC", "WIO", "NWC"))
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  lhs = jnp.zeros(lhs_shape, jnp.float32)
  plain = lambda x, k: lax.conv_general_dilated(x, k, **keywords)
  (eqn,) = [
      e for e in jax.make_jaxpr(plain)(lhs, kernel).eqns
      if e.primitive.name == "conv_general_dilated"
  ]
  out_shape = jax.eval_shape(plain, lhs, kernel).shape
  rows = jnp.asarray(rng.normal(size=(3,) + out_shape), jnp.float32)  # 3 rows, as in CROWN
  probe = jnp.asarray(rng.normal(size=(3,) + lhs_shape), jnp.float32)
  calls = []
  for name in ("_kernel_gradient", "_scatter_input_gradient"):
    original = getattr(fastgrad, name)
    monkeypatch.setattr(fastgrad,
                        name,
                        lambda *a, name=name, original=original: calls.append(name) or original(*a))

  def objective(kernel, rows, fast):
    conv = (fastgrad.conv_with_fast_transpose(kernel, eqn.params)
            if fast else lambda x: plain(x, kernel))
    _, vjp = jax.vjp(conv, lhs)
    transposed = jax.vmap(lambda r: vjp(r)[0])(rows)
    return jnp.sum(jnp.sin(transposed) * probe)

  np.testing.assert_allclose(objective(kernel, rows, True),
                             objective(kernel, rows, False),
                             rtol=1e-5,
                             atol=1e-5)
  # The forward convolution (a product of patches for a first layer) and its kernel gradient.
  inputs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
  fast_out, fast_vjp = jax.vjp(lambda k: fastgrad.conv_with_fast_transpose(k, eqn.params)(inputs),
                               kernel)
  plain_out, plain_vjp = jax.vjp(lambda k: plain(inputs, k), kernel)
  np.testing.assert_allclose(fast_out, plain_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast_vjp(rows[0])[0], plain_vjp(rows[0])[0], rtol=1e-4, atol=1e-4)
  got = jax.grad(objective, argnums=(0, 1))(kernel, rows, True)
  want = jax.grad(objective, argnums=(0, 1))(kernel, rows, False)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)
  # A first layer's input-gradient is a matrix product and a scatter (plain JAX operations,
  # differentiated by JAX); other one-group convolutions without input dilation use a
  # convolution whose kernel gradient is windowed; XLA's rules serve the rest.
  used = {
      "scatter": {"_scatter_input_gradient"},
      "convolution": {"_kernel_gradient"},
      "xla": set()
  }[implementation]
  assert set(calls) == used

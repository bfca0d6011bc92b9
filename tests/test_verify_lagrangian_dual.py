"""The Lagrangian dual with predicted multipliers (Dvijotham et al. 2018): CROWN-IBP's bound
at zero predictions, and sound whatever a verifier predicts (points, corners, the MILP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import verify
from robustlib import models
from robustlib.checks import InputError
from tests.bound_testing import assert_sound, relu_mlp
from verify import lagrangian_dual as ld
from verify.crown import lower_bounds


def _problem(seed=0, n=4, eps=0.15, sizes=(6, 16, 16, 4)):
  fn, _ = relu_mlp(seed, sizes)
  x = jnp.asarray(np.random.default_rng(seed + 7).uniform(size=(n, sizes[0])), jnp.float32)
  y = jnp.asarray(np.arange(n) % sizes[-1])
  return fn, x, verify.linf_ball(x, eps, None), verify.margin_spec(y, sizes[-1])


def _wild(scale):
  """A verifier whose predictions swing with its features by up to ``scale``."""
  mix = jnp.arange(1.0, 2 * ld.FEATURES + 1).reshape(ld.FEATURES, 2)
  return lambda f: scale * jnp.sin(3.0 * f @ mix)


def _conv_net(seed=0):
  rng = np.random.default_rng(seed)
  k1 = jnp.asarray(rng.normal(size=(3, 3, 1, 4)) / 3, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(4 * 4 * 4, 3)) / 8, jnp.float32)

  def fn(x):
    h = jax.lax.conv_general_dilated(x,
                                     k1, (2, 2),
                                     "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h + 0.05).reshape(x.shape[0], -1) @ w2

  return fn


def test_zero_predictions_give_crown_ibp_bound():
  fn, x, box, spec = _problem()
  np.testing.assert_allclose(ld.lagrangian_dual(fn, box, spec),
                             lower_bounds(fn, box, spec, "crown_ibp"),
                             rtol=1e-5,
                             atol=1e-5)
  conv = _conv_net()
  xc = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 8, 8, 1)), jnp.float32)
  cbox = verify.linf_ball(xc, 0.05)
  cspec = verify.margin_spec(jnp.array([0, 2]), 3)
  np.testing.assert_allclose(ld.lagrangian_dual(conv, cbox, cspec),
                             lower_bounds(conv, cbox, cspec, "crown_ibp"),
                             rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e6])
def test_any_prediction_is_sound_on_points_and_corners(scale):
  fn, x, box, spec = _problem(seed=1)
  sound = ld.certified_lower_bounds(fn, box, spec, _wild(scale), x)
  assert sound.dtype == jnp.float32 and np.all(np.isfinite(sound))
  assert_sound(fn, box, lower=sound, spec=spec, rtol=0, atol=0)
  traced = ld.lagrangian_dual(fn, box, spec, _wild(scale), x)
  np.testing.assert_allclose(sound, traced, rtol=1e-3, atol=1e-3 * (1 + scale))


def test_the_sound_bound_never_exceeds_the_exact_minimum():
  fn, x, box, spec = _problem(seed=2, n=2, eps=0.2, sizes=(4, 10, 10, 3))
  sound = np.asarray(ld.certified_lower_bounds(fn, box, spec, _wild(3.0), x))
  for i in range(2):
    for s in range(spec.shape[1]):
      _, exact, _ = verify.milp_minimum(fn, box.lower[i], box.upper[i], spec[i, s])
      assert sound[i, s] <= exact, (i, s, sound[i, s], exact)


def test_gradients_reach_the_verifier_from_its_zero_initialization():
  """The verifier starts at CROWN's slopes; the loss must move it from there."""
  fn, x, box, spec = _problem(seed=3)
  verifier = models.DualVerifier(8)
  params = verifier.init(jax.random.PRNGKey(0), jnp.zeros((1, ld.FEATURES)))
  loss = lambda p: -jnp.sum(ld.lagrangian_dual(fn, box, spec, lambda f: verifier.apply(p, f), x))
  grads = jax.grad(loss)(params)
  last = sorted(grads["params"])[-1]
  assert float(jnp.abs(grads["params"][last]["kernel"]).max()) > 0
  np.testing.assert_allclose(loss(params),
                             -jnp.sum(lower_bounds(fn, box, spec, "crown_ibp")),
                             rtol=1e-5)


def test_certify_proves_only_what_pgd_cannot_break():
  fn, x, box, spec = _problem(seed=4, n=16, eps=0.05)
  y = jnp.argmax(fn(x), axis=1)
  flags = np.asarray(ld.certify(fn, x, y, 0.05, bounds=None))
  same = np.asarray(verify.certify(fn, x, y, 0.05, "crown_ibp", bounds=None))
  assert flags.any() and np.array_equal(flags, same)
  import attacks  # pylint: disable=import-outside-toplevel
  adv = attacks.pgd(eps=0.05, steps=50)(fn, x, y, jax.random.key(0))
  broken = np.asarray(jnp.argmax(fn(adv), axis=1) != y)
  assert not np.any(flags & broken)


def test_networks_it_cannot_read_are_refused_naming_the_operation():
  _, x, box, spec = _problem()
  with pytest.raises(InputError, match="tanh"):
    ld.lagrangian_dual(lambda v: jnp.tanh(v[:, :4]), box, spec)
  with pytest.raises(InputError, match="Interval"):
    ld.lagrangian_dual(lambda v: v[:, :4], (box.lower, box.upper), spec)


def test_a_threshold_is_read_in_its_relus_dtype_whatever_the_boxs():
  """max(z, 0.3) in float32 over a bfloat16 box: read in bfloat16, 0.3 became 0.30078."""
  fn = lambda v: jnp.maximum(v.astype(jnp.float32), jnp.float32(0.3))
  lo = jnp.zeros((1, 1), jnp.bfloat16)
  box = verify.Interval(lo, jnp.full((1, 1), 0.125, jnp.bfloat16))
  bound = ld.certified_lower_bounds(fn, box, jnp.ones((1, 1, 1), jnp.float32))
  assert float(bound[0, 0]) <= float(fn(lo)[0, 0])


def test_sums_that_cancel_inside_one_affine_map_are_in_the_margin():
  """``((x - 1) + 1e30) - 1e30`` is ``x - 1`` in real arithmetic and ``0`` in float64: the
  margin must count the intermediate 1e30, not the cancelled result."""
  big = jnp.float32(1e30)
  fn = lambda v: jax.nn.relu((((v - 1.0) + big) - big) + 2.0)
  x = jnp.zeros((1, 1), jnp.float32)
  bound = ld.certified_lower_bounds(fn, verify.Interval(x - 0.1, x + 0.1), jnp.ones((1, 1, 1)))
  assert float(bound[0, 0]) <= 0.9

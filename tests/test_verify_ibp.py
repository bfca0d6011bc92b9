"""Specification of `verify.Interval`, `verify.linf_ball` and `verify.ibp`.

Every IBP rule is sound (random points and corners of the box land inside the
output bounds), exact where IBP is exact (affine maps, monotone functions), and
the propagation is jittable and differentiable with respect to parameters.
"""

import functools
import itertools

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import verify

RNG = np.random.default_rng(0)


def _box(shape, low=-1.0, high=1.0, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(low, high, shape).astype(np.float32)
  b = rng.uniform(low, high, shape).astype(np.float32)
  return verify.Interval(jnp.asarray(np.minimum(a, b)), jnp.asarray(np.maximum(a, b)))


def _samples(box, n=64, seed=1):
  """Random points and random corners of ``box``: [n, *shape]."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  t = rng.uniform(0, 1, (n,) + lo.shape).astype(np.float32)
  t[:n // 2] = np.round(t[:n // 2])  # corners
  return lo + t * (hi - lo)


def _assert_sound(fn, box, out, tol=1e-5, n=64):
  for x in _samples(box, n):
    y = np.asarray(fn(jnp.asarray(x)))
    lo, hi = np.asarray(out.lower), np.asarray(out.upper)
    scale = tol * (1 + np.abs(y))
    assert np.all(y >= lo - scale), (y - lo).min()
    assert np.all(y <= hi + scale), (hi - y).min()


# ---------------------------------------------------------------------------- Interval


def test_interval_is_a_pytree_that_crosses_jit():
  box = _box((2, 3))
  doubled = jax.jit(lambda b: verify.Interval(2 * b.lower, 2 * b.upper))(box)
  assert isinstance(doubled, verify.Interval)
  np.testing.assert_allclose(doubled.upper, 2 * np.asarray(box.upper))
  assert len(jax.tree_util.tree_leaves(box)) == 2
  with pytest.raises(dataclasses_frozen_error()):
    box.lower = box.upper


def dataclasses_frozen_error():
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.FrozenInstanceError


def test_interval_center_and_radius():
  box = verify.Interval(jnp.array([0.0, -2.0]), jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(box.center, [0.5, 0.0])
  np.testing.assert_allclose(box.radius, [0.5, 2.0])


def test_linf_ball_is_clipped_to_the_box_and_takes_per_example_eps():
  x = jnp.array([[0.0, 0.5, 1.0], [0.2, 0.3, 0.4]])
  box = verify.linf_ball(x, jnp.array([0.1, 0.0]))
  np.testing.assert_allclose(box.lower, [[0.0, 0.4, 0.9], [0.2, 0.3, 0.4]], atol=1e-7)
  np.testing.assert_allclose(box.upper, [[0.1, 0.6, 1.0], [0.2, 0.3, 0.4]], atol=1e-7)
  unclipped = verify.linf_ball(x, 0.5, bounds=None)
  np.testing.assert_allclose(unclipped.lower[0, 0], -0.5)


# ---------------------------------------------------------------------------- one rule each

W = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))
K = jnp.asarray(RNG.normal(size=(3, 2, 3, 3)).astype(np.float32))  # OIHW
C4 = jnp.asarray(RNG.normal(size=(2, 4)).astype(np.float32))
KG = jnp.asarray(RNG.normal(size=(4, 1, 3, 3)).astype(np.float32))  # 2 groups of 1 -> 2

UNARY = {
    "dot_general": (lambda x: x @ W, (2, 4)),
    "conv": (lambda x: lax.conv_general_dilated(x,
                                                K, (2, 1), [(1, 0), (1, 1)],
                                                rhs_dilation=(1, 2),
                                                dimension_numbers=("NCHW", "OIHW", "NCHW")),
             (2, 2, 6, 7)),
    "conv_groups": (lambda x: lax.conv_general_dilated(
        x, KG,
        (1, 1), "SAME", feature_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW")).sum(1),
                    (1, 2, 5, 5)),
    "add_sub_neg": (lambda x: -(x + 1.0) - 2.0 * x + C4, (2, 4)),
    "mul_div_const": (lambda x: x * C4 / 3.0 - x / C4, (2, 4)),
    "structure": (lambda x: jnp.concatenate([
        x.T.reshape(1, 8),
        jnp.pad(x, ((1, 0), (0, 2)))[None, :, 1:3].reshape(1, 6),
        jnp.expand_dims(x, 0).squeeze(0)[:, ::2].reshape(1, 4)
    ],
                                            axis=1), (2, 4)),
    "broadcast_reduce": (lambda x: jnp.broadcast_to(x[:, None, :],
                                                    (2, 3, 4)).sum(axis=(1, 2)), (2, 4)),
    "split_cumsum": (lambda x: jnp.split(x, 2, axis=1)[1] + jnp.cumsum(x, 1)[:, :2], (2, 4)),
    "relu_max_min": (lambda x: jax.nn.relu(x) + jnp.maximum(x, 0.3) - jnp.minimum(x, -0.2), (2, 4)),
    "max_of_two":
        (lambda x: jnp.maximum(x[:, :2], x[:, 2:]) + jnp.minimum(x[:, :2], x[:, 2:]), (2, 4)),
    "clip_clamp": (lambda x: jnp.clip(x, -0.5, 0.5) + lax.clamp(-0.2, x, 0.1), (2, 4)),
    "tanh_sigmoid": (lambda x: jnp.tanh(2 * x) - jax.nn.sigmoid(3 * x), (2, 4)),
    "exp_log": (lambda x: jnp.exp(x) + jnp.log(x + 1.5), (2, 4)),
    "abs_pow": (lambda x: jnp.abs(x) + x**2 - x**3 + jnp.square(x), (2, 4)),
    "max_pool": (lambda x: nn.max_pool(x, (2, 2), (2, 2), padding="SAME"), (1, 5, 5, 2)),
    "avg_pool": (lambda x: nn.avg_pool(x, (3, 3), (1, 1)), (1, 5, 5, 2)),
    "reduce_max": (lambda x: x.reshape(2, 2, 2).max(axis=2) - x.min(axis=1, keepdims=True), (2, 4)),
    "lax_reduce_window": (lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2),
                                                      (1, 1, 1, 2), "VALID"), (1, 2, 4, 4)),
    "convert_stop_gradient": (lambda x: lax.stop_gradient(x).astype(jnp.float32) * 2, (2, 4)),
    "product_of_bounded": (lambda x: x[:, :2] * x[:, 2:] + x @ x.T, (2, 4)),
    "div_by_bounded": (lambda x: x / (x**2 + 1.0), (2, 4)),
    "select_const": (lambda x: jnp.where(C4 > 0, x, -x), (2, 4)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_every_rule_is_sound(name):
  fn, shape = UNARY[name]
  box = _box(shape, seed=sum(map(ord, name)))
  _assert_sound(fn, box, verify.ibp(fn, box))


@pytest.mark.parametrize("name", ["exp_log", "max_pool", "clip_clamp", "structure", "avg_pool"])
def test_monotone_rules_are_tight(name):
  fn, shape = UNARY[name]
  box = _box(shape, seed=3)
  out = verify.ibp(fn, box)
  # These functions increase in every input: the bounds are the values at the two ends.
  lo_pt, hi_pt = fn(box.lower), fn(box.upper)
  np.testing.assert_allclose(out.lower, jnp.minimum(lo_pt, hi_pt), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.upper, jnp.maximum(lo_pt, hi_pt), rtol=1e-6, atol=1e-6)


def test_ibp_of_an_affine_map_is_the_exact_interval_hull():
  b = jnp.array([0.5, -1.0, 2.0])
  fn = lambda x: x @ W + b
  box = _box((1, 4), seed=7)
  out = verify.ibp(fn, box)
  corners = np.array(
      list(itertools.product(*zip(np.asarray(box.lower)[0],
                                  np.asarray(box.upper)[0]))))
  values = np.asarray(fn(jnp.asarray(corners, jnp.float32)))
  np.testing.assert_allclose(out.lower[0], values.min(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.upper[0], values.max(0), rtol=1e-5, atol=1e-5)


def test_hand_computed_relu_network():
  # x in [-1, 1]^2; h = relu([x1 + x2, x1 - x2 + 1]); y = h1 - 2 h2.
  w1 = jnp.array([[1.0, 1.0], [1.0, -1.0]])
  fn = lambda x: jax.nn.relu(x @ w1 + jnp.array([0.0, 1.0])) @ jnp.array([[1.0], [-2.0]])
  out = verify.ibp(fn, verify.Interval(-jnp.ones((1, 2)), jnp.ones((1, 2))))
  # h1 in [0, 2], h2 in [0, 3]: y in [0 - 6, 2 - 0].
  np.testing.assert_allclose(out.lower, [[-6.0]])
  np.testing.assert_allclose(out.upper, [[2.0]])


def test_constants_pytrees_and_several_outputs():
  params = {"w": W, "b": jnp.ones(3)}

  def fn(p, inputs):
    z = inputs["x"] @ p["w"] + p["b"]
    return {"z": z, "const": p["b"] * 2, "sum": z.sum()}

  box = _box((2, 4))
  out = verify.ibp(fn, params, {"x": box})
  assert set(out) == {"z", "const", "sum"}
  np.testing.assert_allclose(out["const"].lower, 2 * np.ones(3))
  np.testing.assert_allclose(out["const"].upper, 2 * np.ones(3))
  _assert_sound(lambda x: fn(params, {"x": x})["sum"], box, out["sum"])


def test_nested_calls_are_inlined():

  @jax.jit
  def inner(x):
    return jax.nn.relu(x) * 2

  @jax.custom_vjp
  def custom(x):
    return jnp.tanh(x)

  custom.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x)**2),))

  @jax.checkpoint
  def remat(x):
    return jnp.exp(x) - 1

  fn = lambda x: remat(custom(inner(x @ W)))
  box = _box((2, 4))
  _assert_sound(fn, box, verify.ibp(fn, box))


def test_flax_cnn_with_batchnorm_in_eval_mode():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.avg_pool(nn.Conv(4, (3, 3), padding="SAME")(x), (2, 2), (2, 2))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  net = Net()
  variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)  # non-trivial statistics
  fn = lambda x: net.apply(variables, x)
  box = verify.linf_ball(jnp.asarray(RNG.uniform(size=(2, 8, 8, 1)), jnp.float32), 0.05)
  _assert_sound(fn, box, verify.ibp(fn, box), n=32)


# ---------------------------------------------------------------------------- jit and grad


def _mlp(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"]


@pytest.fixture(scope="module")
def mlp_setup():
  params = {
      "w1": jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32),
      "b1": jnp.asarray(RNG.normal(size=(5,)) * 0.1, jnp.float32),
      "w2": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
  }
  x = jnp.asarray(RNG.uniform(size=(3, 4)), jnp.float32)
  return params, x


def test_ibp_jitted_equals_eager(mlp_setup):
  params, x = mlp_setup
  box = verify.linf_ball(x, 0.1)
  eager = verify.ibp(functools.partial(_mlp, params), box)
  jitted = jax.jit(lambda p, b: verify.ibp(functools.partial(_mlp, p), b))(params, box)
  np.testing.assert_allclose(eager.lower, jitted.lower, rtol=1e-6)
  np.testing.assert_allclose(eager.upper, jitted.upper, rtol=1e-6)


def test_ibp_gradient_wrt_weights_matches_finite_differences(mlp_setup):
  params, x = mlp_setup
  box = verify.linf_ball(x, 0.1)

  def objective(p):
    out = verify.ibp(functools.partial(_mlp, p), box)
    return jnp.sum(out.upper - 0.5 * out.lower)

  grad = jax.jit(jax.grad(objective))(params)
  obj = jax.jit(objective)
  h = 1e-2
  for name, idx in [("w1", (1, 2)), ("b1", (3,)), ("w2", (0, 1))]:
    plus = jax.tree_util.tree_map(lambda v: v, params)
    minus = jax.tree_util.tree_map(lambda v: v, params)
    plus[name] = params[name].at[idx].add(h)
    minus[name] = params[name].at[idx].add(-h)
    fd = (obj(plus) - obj(minus)) / (2 * h)
    np.testing.assert_allclose(grad[name][idx], fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("jit", [False, True])
def test_known_float64_bounds_round_outward_to_float32_below_the_smallest_normal(jit):
  # XLA on CPU flushes subnormal float32 results to zero: a bound of 1e-40 rounded "up" to the
  # next float32 came out 0, below the bound it had to contain.
  from verify.ibp import _outward  # pylint: disable=import-outside-toplevel,protected-access
  with jax.enable_x64(True):
    lower = jnp.asarray([-1e-40, 1e-40, -1e-39, 3e-39, -1.5e-38, -2.0, 0.0], jnp.float64)
    upper = jnp.asarray([-1e-41, 1e-40, 1e-39, 5e-39, -1.2e-38, 0.1, 0.0], jnp.float64)
    outward = functools.partial(_outward, dtype=jnp.float32)
    box = (jax.jit(outward) if jit else outward)(verify.Interval(lower, upper))
    assert box.lower.dtype == jnp.float32
    assert np.all(np.asarray(box.lower, np.float64) <= np.asarray(lower))
    assert np.all(np.asarray(box.upper, np.float64) >= np.asarray(upper))
    assert np.asarray(box.upper)[5] == np.float32(0.1)  # above 0.1 already: kept

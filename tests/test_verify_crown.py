"""Specification of `verify.crown`, `verify.crown_ibp`, `verify.alpha_crown` and `verify.certify`.

Every method is sound on random small networks (random points, random corners
and gradient-chosen corners of the input box land inside the bounds); CROWN is
exact on affine functions and on hand-computed ReLU cases; alpha-CROWN is never
looser than CROWN. CROWN is *not* always tighter than IBP output by output (a
hand-computed case below shows it); what is a theorem is tested instead.
"""

import functools
import inspect

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import attacks
import bound_testing
import verify
from robustlib.checks import InputError

METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")
THIS_FILE = "test_verify_crown.py"


def bound(method, fn, box, spec=None, **kwargs):
  """Bounds on ``spec @ fn(x)`` (``fn(x)`` without a spec) by ``method``, as an `Interval`."""
  if method == "ibp":
    return verify.ibp(bound_testing.spec_outputs(fn, spec), box)
  return {
      "crown_ibp": verify.crown_ibp,
      "crown": verify.crown,
      "alpha_crown": verify.alpha_crown
  }[method](fn, box, spec, **kwargs)


# ---------------------------------------------------------------------------- random networks


def _dense(rng, n_in, n_out):
  w = rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)
  return jnp.asarray(w, jnp.float32), jnp.asarray(rng.normal(size=n_out) * 0.1, jnp.float32)


def _conv(rng, c_in, c_out, k=3):
  w = rng.normal(size=(c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
  return jnp.asarray(w, jnp.float32), jnp.asarray(rng.normal(size=c_out) * 0.1, jnp.float32)


def _apply_conv(x, wb, stride=1, pad=1):
  w, b = wb
  out = lax.conv_general_dilated(x,
                                 w, (stride, stride), [(pad, pad)] * 2,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return out + b[None, :, None, None]


def _flat(h):
  return h.reshape(h.shape[0], -1)


def _mlp(rng):
  """ReLU, then a ReLU capped at 1 (a ``min`` with a constant)."""
  l1, l2, l3 = _dense(rng, 6, 10), _dense(rng, 10, 10), _dense(rng, 10, 4)
  relu = jax.nn.relu
  fn = lambda x: jnp.minimum(relu(relu(x @ l1[0] + l1[1]) @ l2[0] + l2[1]), 1.0) @ l3[0] + l3[1]
  return fn, (6,)


def _cnn_maxpool(rng):
  c1, c2, d = _conv(rng, 2, 3), _conv(rng, 3, 4), _dense(rng, 16, 4)

  def fn(x):  # NCHW [2, 8, 8]
    h = jax.nn.relu(_apply_conv(x, c1))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    h = jax.nn.relu(_apply_conv(h, c2, pad=0))
    return _flat(h) @ d[0] + d[1]

  return fn, (2, 8, 8)


class _OverlappingMaxPool(nn.Module):
  """Overlapping 3x3 windows with stride 2 and -inf padding (NHWC)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3))(x))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    return nn.Dense(4)(h.reshape(h.shape[0], -1))


class _BatchNormAvgPool(nn.Module):
  """Convolutions with BatchNorm in eval mode (running statistics), then average pooling."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(3, (3, 3))(x)))
    h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(3, (3, 3), strides=(2, 2))(h)))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    return nn.Dense(4)(h.reshape(h.shape[0], -1))


def _flax(module, input_shape):

  def make(rng):
    variables = module.init(jax.random.key(int(rng.integers(1 << 30))),
                            jnp.zeros((1,) + input_shape))
    # Random statistics and affine parameters: BatchNorm is not the identity.
    variables = jax.tree_util.tree_map(
        lambda v: jnp.asarray(v + rng.normal(size=v.shape) * 0.3, jnp.float32), variables)
    if "batch_stats" in variables:
      variables["batch_stats"] = jax.tree_util.tree_map(lambda v: jnp.abs(v) + 0.5
                                                        if v.ndim else v, variables["batch_stats"])
    return (lambda x: module.apply(variables, x)), input_shape

  return make


def _residual(rng):
  c1, c2, c3, d = _conv(rng, 1, 3), _conv(rng, 3, 3), _conv(rng, 3, 3), _dense(rng, 27, 4)

  def fn(x):  # NCHW [1, 6, 6]
    h = jax.nn.relu(_apply_conv(x, c1))
    h = jax.nn.relu(h + _apply_conv(jax.nn.relu(_apply_conv(h, c2)), c3))
    h = lax.reduce_window(h, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4
    return _flat(h) @ d[0] + d[1]

  return fn, (1, 6, 6)


def _smooth_nested(rng):
  """tanh and sigmoid, inside jit, custom_jvp (jax.nn.relu), custom_vjp and checkpoint calls."""
  l1, l2, l3 = _dense(rng, 5, 8), _dense(rng, 8, 8), _dense(rng, 8, 4)

  @jax.custom_vjp
  def clipped(x):
    return jnp.clip(x, -1.0, 2.0)

  clipped.defvjp(lambda x: (clipped(x), x), lambda x, g: (g * ((x > -1) & (x < 2)),))

  @jax.jit
  def layer(x):
    return jnp.tanh(x @ l1[0] + l1[1])

  @jax.checkpoint
  def head(h):
    return jax.nn.sigmoid(h @ l2[0] + l2[1]) @ l3[0] + l3[1]

  return (lambda x: head(jax.nn.relu(clipped(layer(x) * 3.0)))), (5,)


NETWORKS = {
    "mlp": _mlp,
    "cnn_maxpool": _cnn_maxpool,
    "cnn_overlapping_maxpool": _flax(_OverlappingMaxPool(), (7, 7, 2)),
    "cnn_batchnorm_avgpool": _flax(_BatchNormAvgPool(), (8, 8, 2)),
    "residual": _residual,
    "smooth_nested": _smooth_nested,
}


@functools.lru_cache(maxsize=None)
def random_problem(name, seed=0, n=3):
  """``(fn, box, y)``: the network with random weights, a random box of random radius."""
  rng = np.random.default_rng(seed + 1000 * list(NETWORKS).index(name))
  fn, shape = NETWORKS[name](rng)
  x = jnp.asarray(rng.uniform(0, 1, (n,) + shape), jnp.float32)
  eps = float(rng.uniform(0.02, 0.2))
  box = verify.linf_ball(x, eps, bounds=None if name in ("mlp", "smooth_nested") else (0, 1))
  y = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
  return fn, box, y


def logits_and_margins(y, num_classes=4):
  """``[N, K + K - 1, K]``: identity rows (the logits), then the margin rows."""
  n = y.shape[0]
  eye = jnp.broadcast_to(jnp.eye(num_classes), (n, num_classes, num_classes))
  return jnp.concatenate([eye, verify.margin_spec(y, num_classes)], axis=1)


@functools.lru_cache(maxsize=None)
def sampled_outputs(name):
  """Logits and margins ``[P, N, 7]`` at points of the network's box (shared by the methods)."""
  fn, box, y = random_problem(name)
  spec = logits_and_margins(y)
  points = bound_testing.box_points(box, bound_testing.spec_outputs(fn, spec), num=48)
  return np.einsum("nsk,pnk->pns", np.asarray(spec), bound_testing.outputs_at(fn, points))


def jitted_bound(method, fn, box, spec=None, **kwargs):
  """`bound` under `jax.jit`: one compilation is cheaper than running the interpreter eagerly.

  The spec is an argument: a constant one would let XLA fold the backward pass while compiling.
  """
  if spec is None:
    return jax.jit(lambda b: bound(method, fn, b, **kwargs))(box)
  return jax.jit(lambda b, s: bound(method, fn, b, s, **kwargs))(box, spec)


def assert_inside(name, out):
  """The sampled logits and margins of network ``name`` lie inside ``out`` (``[N, 7]``)."""
  values = sampled_outputs(name)
  tol = 1e-5 * (1 + np.abs(values))
  assert np.all(np.isfinite(out.lower)) and np.all(np.isfinite(out.upper))
  assert np.all(values >= np.asarray(out.lower)[None] - tol), "a point is below the lower bound"
  assert np.all(values <= np.asarray(out.upper)[None] + tol), "a point is above the upper bound"


@pytest.mark.parametrize("method", ["ibp", "crown_ibp", "crown"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_method_is_sound_on_random_networks(name, method):
  # alpha-CROWN: see test_alpha_crown_is_sound_and_never_looser_than_crown.
  fn, box, y = random_problem(name)
  assert_inside(name, jitted_bound(method, fn, box, logits_and_margins(y)))


# ---------------------------------------------------------------------------- exactness


def _affine(x):
  w = jnp.asarray(np.random.default_rng(5).normal(size=(2, 2, 3, 3)), jnp.float32)
  d = jnp.asarray(np.random.default_rng(6).normal(size=(2 * 3 * 3, 3)), jnp.float32)
  h = lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return (h + 0.5).reshape(x.shape[0], -1) @ d - 1.0


def _exact_hull(fn, box, spec=None):
  """Exact bounds of an affine ``spec @ fn`` over a box: value at the center +- |J| radius."""
  out_fn = bound_testing.spec_outputs(fn, spec)
  jac = jax.jacrev(lambda x: jnp.sum(out_fn(x), axis=0))(box.center)  # [S, N, ...]
  spread = jnp.sum(jnp.abs(jac) * box.radius[None], axis=tuple(range(2, jac.ndim))).T
  mid = out_fn(box.center)
  return mid - spread, mid + spread


@pytest.mark.parametrize("method", ["crown", "crown_ibp"])
def test_backward_bounds_of_an_affine_function_are_exact(method):
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 2, 7, 7)), jnp.float32)
  box = verify.linf_ball(x, 0.1)
  spec = verify.margin_spec(jnp.array([0, 2]), 3)
  for s in (None, spec):
    lower, upper = _exact_hull(_affine, box, s)
    out = jitted_bound(method, _affine, box, s)
    np.testing.assert_allclose(out.lower, lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.upper, upper, rtol=1e-5, atol=1e-5)
  # So, a theorem here: tighter than IBP of two affine layers followed by the spec.
  ibp = verify.ibp(bound_testing.spec_outputs(_affine, spec), box)
  assert np.all(out.lower >= ibp.lower - 1e-5) and np.all(out.upper <= ibp.upper + 1e-5)
  assert np.all(out.upper - out.lower < 0.9 * (ibp.upper - ibp.lower))


def _one_relu(x):
  return jax.nn.relu(x[:, :1] - x[:, 1:]) - 0.25 * x[:, :1]


def test_one_relu_by_hand():
  # f(x) = relu(x1 - x2) - x1 / 4 on [0, 1] x [0, 0.8]; z = x1 - x2 in [-0.8, 1]; true range
  # [-0.2, 0.75] (minimum at x1 = x2 = 0.8, maximum at (1, 0)).
  box = verify.Interval(jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.8]]))
  # IBP: relu(z) in [0, 1], -x1/4 in [-0.25, 0].
  ibp = verify.ibp(_one_relu, box)
  np.testing.assert_allclose([ibp.lower[0, 0], ibp.upper[0, 0]], [-0.25, 1.0], atol=1e-6)
  # CROWN: relu(z) <= (5/9)(z + 0.8) (the chord), so f <= x1/4 + 4/9 - 5 x2 / 9 <= 0.75 (exact);
  # u = 1 >= -l = 0.8 gives the lower line relu(z) >= z, so f >= 3 x1 / 4 - x2 >= -0.8.
  for method in ("crown", "crown_ibp"):
    for out in (bound(method, _one_relu, box), jitted_bound(method, _one_relu, box)):
      np.testing.assert_allclose([out.lower[0, 0], out.upper[0, 0]], [-0.8, 0.75], atol=1e-6)
  # So CROWN is not always tighter than IBP: here its lower bound is looser, its upper tighter.
  # alpha-CROWN: the lower slope a gives min(-0.8 a, 0.2 a - 0.25), best -0.2 at a = 1/4.
  alpha = verify.alpha_crown(_one_relu, box, steps=30, lr=0.05)
  assert -0.25 <= float(alpha.lower[0, 0]) <= -0.2 + 1e-6
  np.testing.assert_allclose(alpha.upper[0, 0], 0.75, atol=1e-6)


def test_one_inactive_leaning_relu_by_hand():
  # relu(x1 - x2) on [0, 0.8] x [0, 1]: z in [-1, 0.8], u < -l gives the lower line 0; the
  # chord (4/9)(z + 1) is at most 0.8. Both bounds are exact.
  box = verify.Interval(jnp.array([[0.0, 0.0]]), jnp.array([[0.8, 1.0]]))
  out = verify.crown(lambda x: jax.nn.relu(x[:, :1] - x[:, 1:]), box)
  np.testing.assert_allclose([out.lower[0, 0], out.upper[0, 0]], [0.0, 0.8], atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn_maxpool"])
def test_alpha_crown_is_sound_and_never_looser_than_crown(name):
  fn, box, y = random_problem(name)
  spec = logits_and_margins(y)
  crown = jitted_bound("crown", fn, box, spec)
  alpha = jitted_bound("alpha_crown", fn, box, spec)
  assert_inside(name, alpha)
  assert np.all(alpha.lower >= crown.lower - 1e-6)
  assert np.all(alpha.upper <= crown.upper + 1e-6)
  assert float(jnp.sum(alpha.lower - crown.lower)) > 1e-4  # and it does optimise something


def test_one_hidden_layer_theorems():
  # With one layer of ReLUs fed by an affine map of the box, IBP's intermediate bounds are exact:
  # CROWN-IBP equals CROWN; and the margin bounded directly is never looser than the difference of
  # the two logits' bounds (the relaxed bound is superadditive in the specification row).
  rng = np.random.default_rng(3)
  (w1, b1), (w2, b2) = _dense(rng, 6, 12), _dense(rng, 12, 4)
  fn = lambda x: jax.nn.relu(x @ w1 + b1) @ w2 + b2
  x = jnp.asarray(rng.uniform(size=(8, 6)), jnp.float32)
  box = verify.linf_ball(x, 0.15)
  y = jnp.asarray(rng.integers(0, 4, 8))
  spec = verify.margin_spec(y, 4)
  crown, crown_ibp = jitted_bound("crown", fn, box, spec), jitted_bound("crown_ibp", fn, box, spec)
  np.testing.assert_allclose(crown.lower, crown_ibp.lower, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(crown.upper, crown_ibp.upper, rtol=1e-6, atol=1e-6)
  logits = jitted_bound("crown", fn, box)
  # lower(z_y - z_j) >= lower(z_y) - upper(z_j), row by row as margin_spec orders them.
  others = np.array([[j for j in range(4) if j != int(c)] for c in y])
  rows = np.arange(8)[:, None]
  difference = np.asarray(logits.lower)[rows, np.asarray(y)[:, None]] - np.asarray(
      logits.upper)[rows, others]
  assert np.all(np.asarray(crown.lower) >= difference - 1e-5)
  assert np.mean(np.asarray(crown.lower) > difference + 1e-3) > 0.5


# ---------------------------------------------------------------------------- specifications


def test_a_spec_bounds_spec_times_the_output():
  method = "crown"  # CROWN-IBP and alpha-CROWN read the spec the same way
  fn, box, _ = random_problem("mlp", seed=2)
  spec = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
  out = jitted_bound(method, fn, box, spec)
  assert out.lower.shape == out.upper.shape == (3, 5)
  bound_testing.assert_sound(fn, box, out.lower, out.upper, spec=spec)
  # The same as bounding the function C @ fn: the spec is where the backward pass starts.
  composed = jitted_bound(method, bound_testing.spec_outputs(fn, spec), box)
  np.testing.assert_allclose(out.lower, composed.lower, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.upper, composed.upper, rtol=1e-4, atol=1e-5)
  # The identity spec gives the bounds on the logits.
  plain = jitted_bound(method, fn, box)
  eye = jitted_bound(method, fn, box, jnp.broadcast_to(jnp.eye(4), (3, 4, 4)))
  np.testing.assert_allclose(plain.lower, eye.lower, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain.upper, eye.upper, rtol=1e-5, atol=1e-6)


def test_chunked_backward_passes_give_the_same_bounds():
  fn, box, y = random_problem("residual", seed=3)
  spec = verify.margin_spec(y, 4)
  # Per backward pass: two neurons of an intermediate node, or two of the six output rows.
  whole = jitted_bound("crown", fn, box, spec)
  chunked = jitted_bound("crown", fn, box, spec, chunk_size=2)
  np.testing.assert_allclose(chunked.lower, whole.lower, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked.upper, whole.upper, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- jit and grad


def _tiny_net(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return jnp.tanh(h @ params["w2"] + params["b2"]) @ params["w3"]


def _tiny_problem(dtype=jnp.float32):
  rng = np.random.default_rng(7)
  params = {
      "w1": rng.normal(size=(4, 6)),
      "b1": rng.normal(size=6) * 0.1,
      "w2": rng.normal(size=(6, 5)) * 0.5,
      "b2": rng.normal(size=5) * 0.1,
      "w3": rng.normal(size=(5, 3)),
  }
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)
  x = jnp.asarray(rng.uniform(size=(4, 4)), dtype)
  y = jnp.asarray([0, 1, 2, 1])
  return params, x, y


@pytest.mark.parametrize("method", ["crown", "alpha_crown"])  # IBP: see test_verify_ibp.py
def test_gradient_wrt_parameters_matches_finite_differences(method):
  # In float64, so that central differences are accurate. The bound is smooth where no neuron
  # changes between stable and unstable and no adaptive slope flips; tanh's relaxation uses a
  # tangent point found by bisection, differentiated implicitly. alpha-CROWN's gradient holds
  # its optimised slopes fixed; here they end at 0 or 1 and stay there under a small change.
  with jax.enable_x64(True):
    params, x, y = _tiny_problem(jnp.float64)

    def objective(p):
      return jnp.sum(verify.margin_bounds(functools.partial(_tiny_net, p), x, y, 0.1, method))

    value_and_grad = jax.jit(jax.value_and_grad(objective))  # compiled once, used 3 times
    grad = value_and_grad(params)[1]
    leaves = jax.tree_util.tree_leaves(grad)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    rng = np.random.default_rng(0)
    direction = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=v.shape)), params)
    h = 1e-5
    shifted = lambda s: jax.tree_util.tree_map(lambda v, d: v + s * d, params, direction)
    fd = (value_and_grad(shifted(h))[0] - value_and_grad(shifted(-h))[0]) / (2 * h)
    analytic = sum(jnp.sum(g * d) for g, d in zip(leaves, jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-6)


def test_alpha_crown_without_steps_is_crown_gradient_included():
  params, x, y = _tiny_problem()
  box = verify.linf_ball(x, 0.1)
  spec = verify.margin_spec(y, 3)

  def objective(p, method, **kwargs):
    return jnp.sum(bound(method, functools.partial(_tiny_net, p), box, spec, **kwargs).lower)

  crown = jax.jit(jax.value_and_grad(functools.partial(objective, method="crown")))(params)
  alpha = jax.jit(jax.value_and_grad(functools.partial(objective, method="alpha_crown",
                                                       steps=0)))(params)
  np.testing.assert_allclose(alpha[0], crown[0], rtol=1e-6)
  for a, c in zip(jax.tree_util.tree_leaves(alpha[1]), jax.tree_util.tree_leaves(crown[1])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_negative_eps_is_an_error():
  x = jnp.zeros((2, 3))
  with pytest.raises(InputError, match="eps must be >= 0"):
    verify.linf_ball(x, -0.1)
  fn = lambda v: v @ jnp.ones((3, 2))
  with pytest.raises(InputError, match="eps must be >= 0"):
    verify.certify(fn, x, jnp.array([0, 1]), -0.1)
  with pytest.raises(InputError, match="eps must be >= 0"):
    verify.margin_bounds(fn, x, jnp.array([0, 1]), jnp.array([0.1, -0.1]), "crown")


def test_lower_above_upper_is_an_error():
  with pytest.raises(InputError, match="lower <= upper"):
    verify.Interval(jnp.array([0.0, 1.0]), jnp.array([1.0, 0.5]))


def test_mismatched_shapes_are_errors():
  with pytest.raises(InputError, match="equal shapes"):
    verify.Interval(jnp.zeros((2, 3)), jnp.ones((2, 4)))
  fn = lambda v: v @ jnp.ones((3, 2))
  x = jnp.zeros((2, 3))
  with pytest.raises(InputError, match="eps must be a scalar or one value per example"):
    verify.linf_ball(x, jnp.array([0.1, 0.1, 0.1]))
  with pytest.raises(InputError):
    verify.certify(fn, x, jnp.array([0, 1, 1]), 0.1)  # three labels for two examples
  with pytest.raises(InputError, match="batch"):
    verify.crown(lambda v: jnp.sum(v, axis=0), verify.linf_ball(x, 0.1))  # batch axis lost


@pytest.mark.parametrize("method", ["crown", "crown_ibp", "alpha_crown"])
@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 1, 2, 1), (1, 1, 2), (1, 2)])
def test_a_spec_of_the_wrong_shape_is_an_error(method, shape):
  fn = lambda v: v @ jnp.ones((3, 2))
  box = verify.linf_ball(jnp.zeros((2, 3)), 0.1)
  with pytest.raises(InputError, match="spec must have shape"):
    bound(method, fn, box, jnp.ones(shape))


def _line_of(marker: str) -> int:
  lines, start = inspect.getsourcelines(_uses_sine)
  return start + next(i for i, line in enumerate(lines) if marker in line)


def _uses_sine(x):
  h = x @ jnp.ones((3, 3))
  return jnp.sin(h)  # unsupported: sin


def _squares(x):
  return x * x  # CROWN-unsupported: a product of two bounded values


@pytest.mark.parametrize("method", METHODS)
def test_an_unsupported_primitive_is_named_with_the_source_line(method):
  box = verify.linf_ball(jnp.zeros((2, 3)), 0.1)
  line = _line_of("unsupported: sin")
  with pytest.raises(verify.UnsupportedPrimitiveError, match=rf"'sin'.*{THIS_FILE}:{line}"):
    bound(method, _uses_sine, box)
  with pytest.raises(verify.UnsupportedPrimitiveError, match="'sin'"):
    verify.certify(_uses_sine, jnp.zeros((2, 3)), jnp.array([0, 1]), 0.1, method=method)


@pytest.mark.parametrize("method", ["crown", "crown_ibp", "alpha_crown"])
def test_a_product_of_two_bounded_values_takes_mccormick_planes(method):
  box = verify.linf_ball(jnp.asarray([[0.3, -0.2, 0.05]] * 2), 0.1)
  out = bound(method, _squares, box)
  bound_testing.assert_sound(_squares, box, out.lower, out.upper)
  # x * x for x in [0.2, 0.4]: the planes give 0.04 - 0.04 ... at the ends, tight at a corner.
  assert float(out.lower[0, 0]) <= 0.04 + 1e-6 and float(out.upper[0, 0]) >= 0.16 - 1e-6


def _reciprocal_cube(x):
  return (x @ jnp.ones((3, 3)))**-3  # CROWN-unsupported: a negative power


@pytest.mark.parametrize("method", ["crown", "crown_ibp", "alpha_crown"])
def test_a_primitive_without_a_linear_relaxation_is_named_with_the_source_line(method):
  box = verify.linf_ball(jnp.zeros((2, 3)), 0.1)
  line = inspect.getsourcelines(_reciprocal_cube)[1] + 1
  with pytest.raises(verify.UnsupportedPrimitiveError, match=rf"'integer_pow'.*{THIS_FILE}:{line}"):
    bound(method, _reciprocal_cube, box)


def test_an_unknown_method_is_an_error():
  with pytest.raises(InputError, match="method"):
    verify.certify(lambda v: v, jnp.zeros((2, 3)), jnp.array([0, 1]), 0.1, method="lp")


# ---------------------------------------------------------------------------- certify


@functools.lru_cache(maxsize=None)
def _certify_problem():  # cached: the same logits_fn lets verify.certify reuse its compilation
  rng = np.random.default_rng(11)
  (w1, b1), (w2, b2), (w3, b3) = _dense(rng, 12, 16), _dense(rng, 16, 16), _dense(rng, 16, 3)
  fn = lambda x: jax.nn.relu(jax.nn.relu(x @ w1 + b1) @ w2 + b2) @ w3 + b3
  x = jnp.asarray(rng.uniform(size=(64, 12)), jnp.float32)
  y = np.array(jnp.argmax(fn(x), axis=1))
  y[:8] = (y[:8] + 1) % 3  # a few misclassified points
  return fn, x, jnp.asarray(y)


CERTIFY_EPS = 0.04


@functools.lru_cache(maxsize=None)
def _broken_by_pgd():
  """Which points of `_certify_problem` a strong PGD fools at ``CERTIFY_EPS`` (bool ``[64]``)."""
  fn, x, y = _certify_problem()
  attack = attacks.pgd(eps=CERTIFY_EPS, steps=50, restarts=4, loss="margin", bounds=(0.0, 1.0))
  x_adv = attack(fn, x, y, jax.random.key(0))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= CERTIFY_EPS + 1e-6
  return np.asarray(jnp.argmax(fn(x_adv), axis=1) != y)


@pytest.mark.parametrize("method", METHODS)
def test_certify(method):
  fn, x, y = _certify_problem()
  n = x.shape[0]
  # One radius per example throughout: every call below reuses one compilation.
  certify = lambda eps: np.asarray(verify.certify(fn, x, y, eps, method=method))
  flags = certify(jnp.zeros(n))
  assert flags.shape == (n,) and flags.dtype == np.bool_
  # At radius 0, exactly the points whose every margin is positive.
  logits = np.asarray(fn(x))
  margins = logits[np.arange(n), np.asarray(y)][:, None] - logits
  margins[np.arange(n), np.asarray(y)] = np.inf
  np.testing.assert_array_equal(flags, margins.min(axis=1) > 0)
  # A huge radius certifies nothing; radii mix freely across the batch.
  mixed = certify(jnp.where(jnp.arange(n) % 2 == 0, 0.0, 10.0))
  np.testing.assert_array_equal(mixed[::2], flags[::2])
  assert not np.any(mixed[1::2])
  # Certified points are correctly classified and never broken by a strong PGD.
  certified = certify(jnp.full(n, CERTIFY_EPS))
  broken = _broken_by_pgd()
  correct = margins.min(axis=1) > 0
  assert broken[correct].any()  # the attack is strong enough to matter at this radius
  assert not np.any(certified & broken)
  assert np.all(correct[certified])
  if method != "ibp":
    assert certified.any()


def _sqrt_of_relu(x):
  w1 = jnp.asarray([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0]])
  z = jnp.sqrt(jax.nn.relu(x @ w1) + 0.01)
  return z @ jnp.asarray([[1.0, -2.0], [-1.0, 1.0], [0.5, 0.5]]) + z[:, :2] * 0.1


@pytest.mark.parametrize("method", ["crown", "alpha_crown"])
def test_a_relaxation_stays_inside_its_functions_domain(method):
  # A backward bound of relu(z) + 0.01 reaches below 0 (the ReLU's lower line of slope 1):
  # without IBP's lower bound 0.01 the square root's relaxation would be NaN.
  box = verify.linf_ball(jnp.asarray([[0.1, 0.05], [-0.2, 0.3]]), 0.5)
  out = bound(method, _sqrt_of_relu, box)
  assert np.all(np.isfinite(out.lower)) and np.all(np.isfinite(out.upper))
  bound_testing.assert_sound(_sqrt_of_relu, box, out.lower, out.upper)


@pytest.mark.parametrize("method", ["crown", "alpha_crown", "ibp"])
@pytest.mark.parametrize("window", ["cumsum", "reduce_window_sum"])
def test_compiled_bounds_through_a_windowed_sum_of_a_slice_equal_op_by_op_ones(method, window):
  # XLA's CPU simplifier folds the slice's transpose (a pad) into the windowed sum's transpose
  # wrongly when an axis has size 1: compiled, the bounds of column 2 were those of column 4.
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  sums = {
      "cumsum":
          lambda h: lax.cumsum(h, 1),
      "reduce_window_sum":
          lambda h: lax.reduce_window(h, 0.0, lax.add, (1, 2), (1, 1), ((0, 0), (1, 1)))[:, 1:],
  }
  fn = lambda x: sums[window](x @ w)[:, 2:3]
  box = verify.linf_ball(jnp.asarray([[0.3, -0.2, 0.5, 0.1]]), 0.5)
  eager = bound(method, fn, box)
  compiled = jax.jit(lambda b: bound(method, fn, b))(box)
  np.testing.assert_allclose(compiled.lower, eager.lower, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(compiled.upper, eager.upper, rtol=1e-5, atol=1e-5)
  bound_testing.assert_sound(fn, box, compiled.lower, compiled.upper)

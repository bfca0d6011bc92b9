"""Exact verification by mixed-integer programming: optima, decisions and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustlib.checks import InputError
from verify import alpha_crown
from verify import milp
from verify import UnsupportedPrimitiveError
from verify.interval import Interval
from verify.unsafe import UnsafeSet


def _layers(rng, sizes):
  return [(jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a),
                       jnp.float32), jnp.asarray(rng.normal(size=b) * 0.3, jnp.float32))
          for a, b in zip(sizes, sizes[1:])]


def _mlp(seed, sizes=(2, 16, 16, 3)):
  layers = _layers(np.random.default_rng(seed), sizes)

  def fn(x):
    x = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(layers):
      x = x @ w + b
      if i + 1 < len(layers):
        x = jax.nn.relu(x)
    return x

  return fn


def _residual_cnn(seed):
  """``[N, 6, 6, 1]``: a convolution, a residual ReLU block with a clamp, a dense head."""
  rng = np.random.default_rng(seed)
  k1 = jnp.asarray(rng.normal(size=(3, 3, 1, 4)) / 3, jnp.float32)
  k2 = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.float32)
  (w, b), = _layers(rng, (144, 5))

  def conv(x, k):
    return jax.lax.conv_general_dilated(x,
                                        k, (1, 1),
                                        "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def fn(x):
    h = jax.nn.relu(conv(x, k1) + 0.1)
    h = h + jnp.minimum(jax.nn.relu(conv(h, k2)), 0.6)
    return h.reshape(h.shape[0], -1) @ w + b

  return fn


def _grid(lo, hi, n=801):
  g = [np.linspace(a, b, n, dtype=np.float32) for a, b in zip(lo, hi)]
  return np.stack(np.meshgrid(*g, indexing="ij"), -1).reshape(-1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minimum_of_a_2d_network_is_the_grid_minimum(seed):
  fn = _mlp(seed)
  lo, hi = np.array([-0.4, 0.1], np.float32), np.array([0.6, 0.9], np.float32)
  c = np.array([1.0, -1.0, 0.5])
  bound, value, x = milp.milp_minimum(fn, lo, hi, c)
  assert bound == pytest.approx(value, abs=1e-6)  # solved to optimality
  assert np.all(x >= lo) and np.all(x <= hi)
  assert float(fn(jnp.asarray(x)[None])[0] @ c) == pytest.approx(value, abs=1e-5)
  grid = np.asarray(jax.jit(fn)(_grid(lo, hi))) @ c
  assert value <= grid.min() + 1e-5  # exact: no grid point is lower
  assert value >= grid.min() - 0.01  # and the grid comes close (spacing 1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_minimum_is_attained_and_never_looser_than_alpha_crown(seed):
  fn = _residual_cnn(seed)
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(0.2, 0.8, size=(6, 6, 1)).astype(np.float32)
  lo, hi = x0 - 0.06, x0 + 0.06
  c = np.eye(5)[0] - np.eye(5)[3]
  bound, value, x = milp.milp_minimum(fn, lo, hi, c)
  relaxed = float(
      alpha_crown(fn, Interval(lo[None], hi[None]), jnp.asarray(c)[None, None], lower_only=True)[0,
                                                                                                 0])
  assert bound >= relaxed - 1e-4
  assert float(fn(jnp.asarray(x)[None])[0] @ c) == pytest.approx(value, abs=1e-4)
  samples = rng.uniform(lo, hi, size=(2000,) + lo.shape).astype(np.float32)
  assert float((fn(jnp.asarray(samples)) @ c).min()) >= bound - 1e-4


def test_decisions_follow_the_exact_minimum():
  fn = _mlp(3)
  outcomes = set()
  for x0, radius in [((0.3, -0.2), 0.05), ((0.3, -0.2), 0.6), ((-0.5, 0.4), 0.1),
                     ((0.8, 0.8), 0.3)]:
    x0 = np.asarray(x0, np.float32)
    lo, hi = x0 - radius, x0 + radius
    label = int(jnp.argmax(fn(jnp.asarray(x0)[None])[0]))
    margin = min(
        milp.milp_minimum(fn, lo, hi,
                          np.eye(3)[label] - np.eye(3)[t])[1] for t in range(3) if t != label)
    result = milp.milp_verify(fn, lo, hi, UnsafeSet.misclassified(label, 3))
    assert result.status == ("verified" if margin > 1e-3 else "falsified"), (x0, radius, margin)
    outcomes.add(result.status)
    if result.status == "falsified":
      x = result.counterexample
      assert np.all(x >= lo) and np.all(x <= hi)
      logits = np.asarray(fn(jnp.asarray(x)[None]))[0]
      assert logits[label] <= np.delete(logits, label).max()
  assert outcomes == {"verified", "falsified"}


def test_counterexamples_lie_in_the_callers_box_and_hold_in_its_precision():
  relu = lambda x: jnp.maximum(x, 0.0) * 1.0
  # [0.1, 0.2] rounded outward to float32 reaches below 0.1, where y <= 0.1 - 1 ulp holds.
  below = float(np.nextafter(np.float32(0.1), np.float32(0)))
  unsafe = UnsafeSet.of([(np.ones((1, 1)), np.array([below]))], 1)
  assert milp.milp_verify(relu, np.array([0.1]), np.array([0.2]), unsafe,
                          time_limit=10).status != "falsified"
  with jax.enable_x64(True):
    # y = 1 + 1e-8 > 1 in float64, though float32 rounds it to 1.
    plus_one = lambda x: jnp.maximum(x, 0.0) + 1.0
    at = np.array([1e-8])
    unsafe = UnsafeSet.of([(np.ones((1, 1)), np.ones(1))], 1, np.float64)
    assert milp.milp_verify(plus_one, at, at, unsafe, time_limit=10,
                            precision="float64").status != "falsified"
    # A float32 row of 0.1 misses the boundary point (1e6, 1e5) of 0.1 y_0 - y_1 <= 0.
    const = lambda x: jnp.array([1e6, 1e5], x.dtype) + 0.0 * x
    unsafe = UnsafeSet.of([(np.array([[0.1, -1.0]]), np.zeros(1))], 2)
    assert milp.milp_verify(const,
                            np.zeros(2),
                            np.ones(2),
                            unsafe,
                            time_limit=10,
                            precision="float64").status != "verified"


def test_an_affine_network_needs_no_binaries():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  fn = lambda x: x @ w  # pylint: disable=unnecessary-lambda-assignment
  lo, hi = -np.ones(4, np.float32), np.ones(4, np.float32)
  bound, value, _ = milp.milp_minimum(fn, lo, hi, np.array([1.0, 0.0, 0.0]))
  assert value == pytest.approx(-float(jnp.abs(w[:, 0]).sum()), rel=1e-6)
  assert bound == pytest.approx(value)
  assert milp.milp_verify(fn, lo, hi, UnsafeSet.misclassified(0, 3)).binaries == 0


def test_unsupported_operations_and_bad_boxes_are_named():
  lo, hi = np.zeros(2, np.float32), np.ones(2, np.float32)
  unsafe = UnsafeSet.misclassified(0, 2)
  with pytest.raises(UnsupportedPrimitiveError, match="tanh"):
    milp.milp_verify(lambda x: jnp.tanh(x), lo, hi, unsafe)
  with pytest.raises(InputError, match="lower <= upper"):
    milp.milp_verify(_mlp(0, (2, 4, 2)), hi, lo, unsafe)
  with pytest.raises(InputError, match="same shape"):
    milp.milp_verify(_mlp(0, (2, 4, 2)), lo, np.ones(3, np.float32), unsafe)
  with pytest.raises(InputError, match="rows over 3 outputs"):
    milp.milp_verify(_mlp(0, (2, 4, 2)), lo, hi, UnsafeSet.misclassified(0, 3))
  with pytest.raises(InputError, match="label"):
    UnsafeSet.misclassified(3, 3)


def test_a_value_feeding_two_relus_and_fixed_signs_are_encoded_exactly():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  m = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)

  def fn(x):
    z = x @ w
    return (jnp.minimum(z, 0.2) + jnp.maximum(jnp.maximum(z, 0.0) @ m, 0.0)) @ v

  lo, hi = -np.ones(3, np.float32), np.ones(3, np.float32)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 41)] * 3), -1).reshape(-1, 3).astype(np.float32)
  out = np.asarray(fn(jnp.asarray(g)))
  for c in ([1.0, -1.0], [-1.0, 2.0]):
    bound, value, x = milp.milp_minimum(fn, lo, hi, np.array(c))
    grid = float((out @ np.array(c)).min())
    assert bound <= grid + 1e-4 and value <= grid + 1e-4
    assert abs(float(np.asarray(fn(jnp.asarray(x)[None]))[0] @ np.array(c)) - value) < 1e-3
  # Fixed signs: the program over the part of the box where z_0 >= 0, which holds outputs
  # below the threshold (grid points), finds one there.
  z0 = (g @ np.asarray(w))[:, 0]
  threshold = float((out[z0 >= 0] @ np.array([1.0, -1.0])).min()) + 0.05
  unsafe = UnsafeSet.of([(np.array([[1.0, -1.0]]), np.array([threshold]))], 2)
  free = milp.milp_verify(fn, lo, hi, unsafe)
  restricted = milp.milp_verify(fn, lo, hi, unsafe, fixed={0: np.array([1, 0, 0, 0, 0, 0])})
  assert restricted.binaries < free.binaries
  assert restricted.status == "falsified"
  assert (np.asarray(restricted.counterexample) @ np.asarray(w))[0] >= -1e-4

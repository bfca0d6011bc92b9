"""Unsafe sets, falsification in a box and branch and bound on the input box."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustlib.checks import InputError
from verify.bab import branch_and_bound
from verify.bab import bound_safety
from verify.interval import round_outward
from verify.falsification import falsify
from verify.unsafe import UnsafeSet


def _mlp(seed: int, sizes=(2, 16, 16, 1)):
  rng = np.random.default_rng(seed)
  layers = [(jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a),
                         jnp.float32), jnp.asarray(rng.normal(size=b) * 0.3, jnp.float32))
            for a, b in zip(sizes, sizes[1:])]

  def fn(x):
    for i, (w, b) in enumerate(layers):
      x = x @ w + b
      if i + 1 < len(layers):
        x = jnp.maximum(x, 0.0)
    return x

  return fn


def _grid_min(fn, n=801):
  """Minimum of the single output over a grid of [-1, 1]^2 and the grid's spacing."""
  g = np.linspace(-1, 1, n, dtype=np.float32)
  pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  y = np.asarray(jax.jit(fn)(pts))[:, 0]
  return float(y.min()), pts[int(y.argmin())], float(g[1] - g[0])


def _below(c: float) -> UnsafeSet:
  """Unsafe: the single output y_0 <= c."""
  return UnsafeSet.of([(np.array([[1.0]]), np.array([c]))], num_outputs=1)


def _confirm(fn, unsafe):
  return lambda x: bool(unsafe.safety(fn(jnp.asarray(x)[None]))[0] <= 0)


class TestUnsafeSet:

  def test_safety_is_min_over_polytopes_of_max_over_rows(self):
    # Polytope 0: y0 <= 1 and y1 <= 0; polytope 1: y0 - y1 <= -2.
    unsafe = UnsafeSet.of([(np.eye(2), np.array([1.0, 0.0])), (np.array([[1.0, -1.0]]), [-2.0])],
                          num_outputs=2)
    y = jnp.array([[0.5, -1.0], [3.0, 0.5], [0.0, 3.0]])
    np.testing.assert_allclose(unsafe.distance(y), [[-0.5, 3.5], [2.0, 4.5], [3.0, -1.0]])
    np.testing.assert_allclose(unsafe.safety(y), [-0.5, 2.0, -1.0])
    np.testing.assert_allclose(unsafe.proven(jnp.array([[2.0, -1.0, -1.0]])), [1.0])

  def test_a_polytope_without_rows_contains_everything(self):
    unsafe = UnsafeSet.of([(np.zeros((0, 3)), np.zeros(0))], num_outputs=3)
    assert float(unsafe.safety(jnp.ones((1, 3)))[0]) == -np.inf

  def test_mismatched_rows_are_rejected(self):
    with pytest.raises(InputError, match="rows"):
      UnsafeSet.of([(np.eye(2), np.zeros(3))], num_outputs=2)


def test_round_outward_contains_the_float64_box():
  lo, hi = np.array([0.1, -0.3, 0.5]), np.array([0.2, 1 / 3, 0.5])
  lo32, hi32 = round_outward(lo, hi)
  assert lo32.dtype == np.float32 and np.all(lo32 <= lo) and np.all(hi32 >= hi)
  assert lo32[2] == 0.5 and hi32[2] == 0.5  # representable ends stay put


def test_falsify_reaches_the_minimum_of_a_linear_function():
  w = jnp.array([[2.0], [-3.0], [0.5]])
  fn = lambda x: x @ w
  lo, hi = jnp.array([-1.0, 0.0, 0.2]), jnp.array([1.0, 2.0, 0.4])
  minimum = -2.0 - 6.0 + 0.1  # at (-1, 2, 0.2)
  x, s = falsify(fn, lo, hi, _below(minimum + 1e-3), jax.random.key(0))
  np.testing.assert_allclose(x, [-1.0, 2.0, 0.2], atol=1e-6)
  assert float(s) <= 0
  _, s = falsify(fn, lo, hi, _below(minimum - 1e-3), jax.random.key(0))
  assert float(s) == pytest.approx(1e-3, abs=1e-5)


def test_falsify_tries_every_polytope():
  # y = x on [0, 1]^2; unsafe: y0 >= 0.99 and y1 >= 0.99 (a corner) or y0 + y1 <= 0.01.
  unsafe = UnsafeSet.of([(-np.eye(2), np.array([-0.99, -0.99])), (np.ones((1, 2)), [0.01])],
                        num_outputs=2)
  x, s = falsify(lambda x: x, jnp.zeros(2), jnp.ones(2), unsafe, jax.random.key(1), steps=30)
  assert float(s) <= 0 and float(unsafe.safety(x[None])[0]) <= 0


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha_crown"])
def test_bound_safety_is_sound(method):
  fn = _mlp(3)
  lo, hi = jnp.array([[-0.5, -0.2]]), jnp.array([[0.1, 0.6]])
  minimum = float(
      jnp.min(fn(jax.random.uniform(jax.random.key(0), (4000, 2), minval=lo, maxval=hi))))
  bound = float(bound_safety(fn, lo, hi, _below(0.0), method)[0])
  assert bound <= minimum + 1e-5  # safety of y <= 0 is y itself


def test_bound_safety_rejects_unknown_methods():
  with pytest.raises(InputError, match="method"):
    bound_safety(lambda x: x, jnp.zeros((1, 1)), jnp.ones((1, 1)), _below(0.0), "lp")


def test_bound_safety_allows_for_rows_rounded_to_their_dtype():
  # y = (1e6, 1e5) everywhere is on the boundary of 0.1 y_0 - y_1 <= 0, which the float32 row
  # (0.1 rounded up by 1.5e-9) misses by 1.5e-3: far above float64 bounds' own rounding.
  fn = lambda x: jnp.array([1e6, 1e5], x.dtype) + 0.0 * x
  unsafe = UnsafeSet.of([(np.array([[0.1, -1.0]]), np.zeros(1))], 2)
  assert unsafe.C.dtype == jnp.float32 and float(unsafe.C[0, 0]) * 1e6 - 1e5 > 1e-3
  with jax.enable_x64(True):
    lo, hi = jnp.zeros((1, 2), jnp.float64), jnp.ones((1, 2), jnp.float64)
    for method in ("ibp", "crown"):
      assert float(bound_safety(fn, lo, hi, unsafe, method)[0]) <= 0, method


@pytest.fixture(scope="module")
def net():
  fn = _mlp(0)
  minimum, argmin, spacing = _grid_min(fn)
  return fn, minimum, argmin, spacing


@pytest.fixture(params=["input", "relu"])
def split(request):
  return request.param


def _search(fn, unsafe, seconds=60.0, confirm=None, **options):
  """Branch and bound on [-1, 1]^2."""
  return branch_and_bound(fn,
                          -np.ones(2, np.float32),
                          np.ones(2, np.float32),
                          unsafe,
                          deadline=time.monotonic() + seconds,
                          confirm=confirm or _confirm(fn, unsafe),
                          **options)


class TestBranchAndBound:

  def test_proves_a_threshold_just_below_the_minimum(self, net, split):
    fn, minimum, _, spacing = net
    lipschitz = 20.0  # far above this net's; the grid's error is at most L * spacing
    unsafe = _below(minimum - lipschitz * spacing)
    lo, hi = -np.ones(2, np.float32), np.ones(2, np.float32)
    root = float(bound_safety(fn, jnp.asarray(lo)[None], jnp.asarray(hi)[None], unsafe, "crown")[0])
    assert root < 0, "the root box must need splitting for this test to mean anything"
    result = _search(fn, unsafe, batch_size=64, split=split)
    assert result.status == "verified", result
    assert result.boxes > 1 and result.counterexample is None

  def test_finds_a_counterexample_just_above_the_minimum(self, net, split):
    fn, minimum, _, _ = net
    unsafe = _below(minimum + 0.02)
    result = _search(fn, unsafe, batch_size=64, split=split)
    assert result.status == "falsified"
    x = result.counterexample
    assert np.all(np.abs(x) <= 1) and float(fn(jnp.asarray(x)[None])[0, 0]) <= minimum + 0.02

  def test_reports_a_timeout(self, net, split):
    fn, minimum, _, _ = net
    unsafe = _below(minimum)  # the boundary case cannot be decided by splitting
    result = _search(fn, unsafe, seconds=-1.0, confirm=lambda x: False, split=split)
    assert result.status == "timeout" and result.boxes == 0

  def test_only_confirmed_counterexamples_end_the_search(self, net, split):
    fn, minimum, _, _ = net
    unsafe = _below(minimum + 0.02)
    result = _search(fn,
                     unsafe,
                     seconds=5.0,
                     confirm=lambda x: False,
                     max_boxes=2000,
                     batch_size=64,
                     split=split)
    assert result.status in ("unknown", "timeout") and result.counterexample is None

  def test_bad_boxes_are_rejected(self, net):
    fn = net[0]
    with pytest.raises(InputError, match="lower <= upper"):
      branch_and_bound(fn,
                       np.ones(2),
                       np.zeros(2),
                       _below(0.0),
                       deadline=time.monotonic() + 1,
                       confirm=lambda x: True)

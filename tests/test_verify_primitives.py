"""The primitive registry and the interpreter's structural rules: loops, conditionals,
generic reductions, casts and narrow floats, refusals, and one fact in one place."""

import ast
import pathlib

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from robustlib.checks import InputError
import verify
from verify import primitives

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUNDS = {"ibp": verify.ibp, "crown_ibp": verify.crown_ibp, "crown": verify.crown}


def _points(box, rng, count=64):
  """Random points of ``box`` and its corners along each example (float32)."""
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  u = rng.uniform(size=(count,) + lo.shape).astype(np.float32)
  corners = rng.integers(0, 2, size=(count,) + lo.shape).astype(np.float32)
  inside = lo + u * (hi - lo)
  return np.concatenate([inside, lo + corners * (hi - lo), lo[None], hi[None]])


def _assert_contains(fn, box, methods, seed=0, tol=1e-5):
  rng = np.random.default_rng(seed)
  pts = _points(box, rng)
  values = np.stack([np.asarray(fn(jnp.asarray(p)), np.float32) for p in pts])
  for m in methods:
    b = BOUNDS[m](fn, box)
    lo, hi = np.asarray(b.lower), np.asarray(b.upper)
    assert lo.shape == values.shape[1:], (m, lo.shape, values.shape)
    scale = tol * (1 + np.abs(values).max())
    assert np.all(values >= lo - scale), (m, (lo - values).max())
    assert np.all(values <= hi + scale), (m, (values - hi).max())


def _box(shape, seed=0, eps=0.1):
  x = jax.random.uniform(jax.random.key(seed), shape, minval=0.2, maxval=0.8)
  return verify.linf_ball(x, eps)


# ----------------------------------------------------------------------------------------------
# Loops.


def test_fori_loop_body_is_bounded_every_step():
  # Doubling six times: the value is 64 x, not 2 x.
  box = _box((2, 3))
  fn = lambda x: lax.fori_loop(0, 6, lambda i, v: v * 2, x)
  for m in BOUNDS:
    b = BOUNDS[m](fn, box)
    np.testing.assert_allclose(b.upper, 64 * box.upper, rtol=1e-6)
    np.testing.assert_allclose(b.lower, 64 * box.lower, rtol=1e-6)


def test_weight_tied_loop_equals_its_unrolled_python_loop():
  w = jax.random.normal(jax.random.key(1), (4, 4)) * 0.7
  step = lambda i, v: jax.nn.relu(v @ w + 0.1)
  looped = lambda x: lax.fori_loop(0, 5, step, x)

  def unrolled(x):
    for i in range(5):
      x = step(i, x)
    return x

  box = _box((3, 4))
  for m in BOUNDS:
    a, b = BOUNDS[m](looped, box), BOUNDS[m](unrolled, box)
    np.testing.assert_allclose(a.lower, b.lower, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.upper, b.upper, rtol=1e-6, atol=1e-6)
  _assert_contains(looped, box, BOUNDS)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_over_bounded_xs_with_stacked_outputs(reverse):
  k = jnp.asarray([0.5, -1.0, 2.0])

  def fn(x):  # x [N, 3]; scan over the feature axis (time first) with a carry and outputs

    def body(c, xi):
      c = jnp.tanh(c * 0.9 + xi)
      return c, c * 2 - xi

    c, ys = lax.scan(body, x[:, 0] * 0, (x * k).T, reverse=reverse)
    return jnp.concatenate([ys.T, c[:, None]], axis=1)

  box = _box((3, 3))
  _assert_contains(fn, box, ["ibp"])
  # Time first means the batch axis is not first inside the loop: backward passes refuse it
  # (with 3 examples and 3 features a wrong axis would not even show in the shapes).
  with pytest.raises(InputError, match="batch axis first"):
    verify.crown(fn, box)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_over_constant_xs_with_a_bounded_carry(reverse):
  ws = jax.random.normal(jax.random.key(2), (4, 3, 3)) * 0.8

  def fn(x):  # an RNN-like cell over a constant sequence of weights, batch first throughout

    def body(h, w):
      h = jnp.tanh(h @ w + 0.1)
      return h, None

    h, _ = lax.scan(body, x, ws, reverse=reverse)
    return h

  _assert_contains(fn, _box((2, 3)), BOUNDS)


def test_scan_longer_than_the_unroll_limit_is_refused():
  fn = lambda x: lax.fori_loop(0, primitives.MAX_UNROLL + 1, lambda i, v: v * 0.5, x)
  with pytest.raises(verify.UnsupportedPrimitiveError, match="MAX_UNROLL"):
    verify.ibp(fn, _box((1, 2)))


def test_loop_counter_and_constants_stay_constant():
  # A loop that only reads a bounded value through its constants unrolls too.
  fn = lambda x: lax.fori_loop(0, 3, lambda i, v: v + x * i, jnp.zeros_like(x))
  box = _box((2, 2))
  b = verify.crown(fn, box)
  np.testing.assert_allclose(b.upper, 3 * box.upper, rtol=1e-6)


def test_while_loop_is_refused_with_the_users_line():
  fn = lambda x: lax.while_loop(lambda v: v.sum() < 10, lambda v: v * 2, x)
  with pytest.raises(verify.UnsupportedPrimitiveError, match=r"'while'.*test_verify_primitives"):
    verify.ibp(fn, _box((1, 2)))


def test_cond_on_a_bounded_predicate_is_refused_and_a_constant_one_is_taken():
  bounded = lambda x: lax.cond(x.sum() > 0, lambda v: v, lambda v: -v, x)
  with pytest.raises(verify.UnsupportedPrimitiveError, match="cond"):
    verify.ibp(bounded, _box((1, 2)))
  for flag, sign in ((True, 1.0), (False, -1.0)):
    fn = lambda x, flag=flag: lax.cond(flag, lambda v: v * 3, lambda v: -v * 3, x)
    box = _box((1, 2))
    b = verify.crown(fn, box)
    want = 3 * sign * np.asarray(box.upper if sign > 0 else box.lower)
    np.testing.assert_allclose(b.upper, want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Generic reductions.


@pytest.mark.parametrize("init,op,padding", [(-jnp.inf, lax.max, "VALID"), (1.0, lax.max, "SAME"),
                                             (0.55, lax.max, "VALID"), (0.0, lax.add, "SAME"),
                                             (jnp.inf, lax.min, "VALID"), (0.3, lax.min, "SAME")])
def test_reduce_window_with_a_monoid_body_has_the_outputs_shape(init, op, padding):
  fn = lambda x: lax.reduce_window(x, init, op, (1, 2), (1, 2), padding).reshape(x.shape[0], -1)
  box = _box((2, 6), eps=0.2)
  methods = ["ibp"] + (["crown"] if op is not lax.min else [])
  _assert_contains(fn, box, methods)


@pytest.mark.parametrize("init,op", [(-jnp.inf, lax.max), (0.5, lax.max), (0.0, lax.add)])
def test_reduce_with_a_monoid_body(init, op):
  fn = lambda x: lax.reduce(x, init, op, (1,))[:, None]
  _assert_contains(fn, _box((3, 5), eps=0.2), ["ibp", "crown"])


@pytest.mark.parametrize("fn,what", [
    (lambda x: lax.reduce(x, 0.0, lambda a, b: a + 2 * b, (1,)), "body other than"),
    (lambda x: lax.reduce(x, 1.0, lax.mul, (1,)), "'reduce_prod'"),
    (lambda x: lax.reduce_window(x, 1.0, lax.add, (1, 2), (1, 1), "VALID"), "initial value"),
    (lambda x: lax.reduce(x, 1.0, lax.add, (1,)), "initial value"),
])
def test_other_reductions_are_refused(fn, what):
  with pytest.raises(verify.UnsupportedPrimitiveError, match=what):
    verify.ibp(fn, _box((2, 4)))


# ----------------------------------------------------------------------------------------------
# Casts, narrow floats and gathers.


def test_bool_cast_is_a_sound_step():
  fn = lambda x: x.astype(bool).astype(jnp.float32)
  box = verify.Interval(jnp.asarray([[-1.0, 0.0, 0.5, -2.0]]), jnp.asarray([[1.0, 0.0, 1.0, -1.0]]))
  b = verify.ibp(fn, box)
  np.testing.assert_array_equal(b.lower, [[0, 0, 1, 1]])
  np.testing.assert_array_equal(b.upper, [[1, 0, 1, 1]])
  # Backward passes take the step's interval, as if it were an input.
  c = verify.crown(fn, box)
  np.testing.assert_array_equal(c.lower, b.lower)
  np.testing.assert_array_equal(c.upper, b.upper)


def test_int_cast_is_a_sound_step():
  fn = lambda x: (x * 10).astype(jnp.int32).astype(jnp.float32) * 0.5 + x
  _assert_contains(fn, _box((2, 3), eps=0.3), BOUNDS)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_float_hidden_layer_is_sound(dtype):
  k = jax.random.split(jax.random.key(3), 2)
  w1 = jax.random.normal(k[0], (6, 16))
  w2 = jax.random.normal(k[1], (16, 3))

  def fn(x):
    h = jax.nn.relu(x.astype(dtype) @ w1.astype(dtype))
    return (h @ w2.astype(dtype)).astype(jnp.float32)

  _assert_contains(fn, _box((2, 6), eps=0.05), BOUNDS, tol=0)


def test_reduce_precision_is_sound():
  fn = lambda x: lax.reduce_precision(x * 3.1, exponent_bits=5, mantissa_bits=3) * 1.7
  _assert_contains(fn, _box((2, 5), eps=0.05), BOUNDS, tol=0)


def test_gather_fill_keeps_its_fill_value():
  idx = jnp.asarray([0, 2, 7])  # 7 is out of bounds: filled
  fn = lambda x: jnp.take(x, idx, axis=1, mode="fill", fill_value=3.0)
  box = _box((2, 4))
  _assert_contains(fn, box, BOUNDS)
  np.testing.assert_allclose(verify.crown(fn, box).lower[:, 2], 3.0)


def test_select_with_a_bounded_predicate_takes_the_hull_in_ibp():
  # leaky_relu is select_n(x >= 0, 0.01 x, x): where the comparison is decided the case it
  # picks, elsewhere the hull of both cases.
  fn = jax.nn.leaky_relu
  box = verify.Interval(jnp.asarray([[-1.0, 0.5, -2.0]]), jnp.asarray([[1.0, 1.0, -1.0]]))
  b = verify.ibp(fn, box)
  np.testing.assert_allclose(b.lower, [[-1.0, 0.5, -0.02]], rtol=1e-6)
  np.testing.assert_allclose(b.upper, [[1.0, 1.0, -0.01]], rtol=1e-6)
  _assert_contains(fn, box, ["ibp"])


# ----------------------------------------------------------------------------------------------
# Refusals and precision.


def test_errors_inside_library_functions_name_the_users_line():
  # jnp.sinc applies sin inside a custom_jvp of jax's own code: the user's line is the call.
  with pytest.raises(verify.UnsupportedPrimitiveError,
                     match=r"'sin'.*test_verify_primitives\.py:\d+"):
    verify.crown(lambda x: jnp.sinc(x), _box((1, 3)))


_W6 = jax.random.normal(jax.random.key(0), (6, 6))


def _layer_norm(h):
  mean = jnp.mean(h, axis=1, keepdims=True)
  var = jnp.mean((h - mean)**2, axis=1, keepdims=True)
  return (h - mean) * lax.rsqrt(var + 1e-5)


EVERYDAY = {
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "hard_tanh": jax.nn.hard_tanh,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "gelu_tanh": jax.nn.gelu,
    "gelu_exact": lambda h: jax.nn.gelu(h, approximate=False),
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "layer_norm": _layer_norm,
    "stack": lambda h: jnp.stack([h, -h], axis=1).reshape(h.shape[0], -1),
    "flip": lambda h: jnp.flip(h, axis=1),
    "reflect_pad": lambda h: jnp.pad(h, ((0, 0), (2, 2)), mode="reflect"),
    "reduce_min": lambda h: jnp.min(h, axis=1, keepdims=True),
    "square": lambda h: h * h,
}


@pytest.mark.parametrize("name", sorted(EVERYDAY))
def test_everyday_functions_are_bounded_by_every_method(name):
  act = EVERYDAY[name]
  fn = lambda x: act(x @ _W6)
  _assert_contains(fn, _box((2, 6), eps=0.1), BOUNDS)


def test_unknown_primitive_is_refused_naming_it():
  with pytest.raises(verify.UnsupportedPrimitiveError, match="'sin'.*test_verify_primitives"):
    verify.ibp(lambda x: jnp.sin(x), _box((1, 3)))


def test_bound_passes_run_products_at_highest_precision():
  w = jnp.ones((3, 4))
  k = jnp.ones((2, 2, 1, 2))

  def fn(x):
    h = jax.nn.relu(
        lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return h.reshape(h.shape[0], -1)[:, :3] @ w

  x = jnp.full((2, 4, 4, 1), 0.5)
  for method in (verify.ibp, verify.crown):
    jaxpr = jax.make_jaxpr(lambda x, m=method: m(fn, verify.linf_ball(x, 0.1)).lower)(x)
    precisions = []

    def collect(j):
      for eqn in j.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
          precisions.append(eqn.params["precision"])
        for sub in jax.core.jaxprs_in_params(eqn.params):
          collect(sub)

    collect(jaxpr.jaxpr)
    assert precisions, "no product was traced"
    highest = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    assert all(p == highest for p in precisions), set(map(str, precisions))


def _string_constants(path: pathlib.Path):
  """String literals of a module that are not docstrings."""
  tree = ast.parse(path.read_text())
  docs = set()
  for node in ast.walk(tree):
    if (isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body and
        isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)):
      docs.add(id(node.body[0].value))
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
      yield node.lineno, node.value


def test_no_primitive_is_named_outside_the_registry():
  names = set(primitives.REGISTRY) | set(primitives.CALLS) | set(primitives.EXPANSIONS)
  found = []
  for path in sorted((ROOT / "verify").glob("*.py")):
    if path.name == "primitives.py":
      continue
    # VNNLIB's own connectives ("and", "or") are words of that language, not primitives.
    allowed = {"and", "or"} if path.name == "vnnlib.py" else set()
    found += [(path.name, line, s) for line, s in _string_constants(path) if s in names - allowed]
  assert not found, found


def test_every_record_is_consistent():
  kinds = {"identity", "linear", "affine", "relu", "elementwise", "pool", "unsupported"}
  for name, rec in primitives.REGISTRY.items():
    assert rec.name == name
    assert callable(rec.ibp) and callable(rec.kind)
    if rec.relaxation is not None:
      assert rec.one_to_one, name
  assert verify.SUPPORTED_PRIMITIVES == tuple(sorted(primitives.REGISTRY))
  assert all(k in kinds for k in ("linear", "affine"))


def test_float16_subnormals_are_inside_the_bounds():
  # A cast keeps float16 subnormals that XLA's reduce_precision flushes to zero.
  x = jnp.full((1, 1), 1e-5, jnp.float32)
  fn = lambda v: v.astype(jnp.float16).astype(jnp.float32)
  value = float(fn(x)[0, 0])
  for m in BOUNDS:
    b = BOUNDS[m](fn, verify.Interval(x, x))
    assert float(b.lower[0, 0]) <= value <= float(b.upper[0, 0]), m


def test_sqrt_of_a_dead_relu_is_zero_not_nan():
  fn = lambda x: jnp.sqrt(jax.nn.relu(x))
  box = verify.Interval(jnp.full((1, 1), -1.0), jnp.full((1, 1), -0.5))
  for m in BOUNDS:
    b = jax.jit(lambda b, m=m: BOUNDS[m](fn, b))(box)
    np.testing.assert_array_equal(b.lower, [[0.0]])
    np.testing.assert_array_equal(b.upper, [[0.0]])

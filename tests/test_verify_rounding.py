"""Floating point: bounds less the rounding allowance hold for float32 evaluations, and
"verified" survives near ties and one-ulp boxes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import verify
from robustlib.checks import InputError
from verify import certification
from verify import error_rules
from verify import interval
from verify import primitives
from verify import rounding
from verify.graph import build_graph
import importlib

crown_module = importlib.import_module("verify.crown")
ibp_module = importlib.import_module("verify.ibp")


def _mlp(seed, sizes=(8, 16, 16, 3), act=jax.nn.relu):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  ws = [jax.random.normal(k, (a, b)) / np.sqrt(a) for k, a, b in zip(keys, sizes, sizes[1:])]
  bs = [jax.random.normal(k, (b,)) * 0.1 for k, b in zip(keys[1:], sizes[1:])]

  def fn(x):
    h = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(zip(ws, bs)):
      h = h @ w + b
      if i < len(ws) - 1:
        h = act(h)
    return h

  fn.weights = ws, bs
  return fn


def _corners(lo, hi):
  """Every corner of the box ``[lo, hi]`` (one example, flat ``[d]``): ``[2^d, d]``."""
  bits = np.array(list(itertools.product([0, 1], repeat=lo.size)), np.float32)
  return np.where(bits > 0, hi, lo)


def _near_ties(fn, count, seed):
  """``count`` inputs in [0, 1]^8 whose two largest logits differ by less than 1e-5."""
  rng = np.random.default_rng(seed)
  f = jax.jit(lambda x: jax.lax.top_k(fn(x), 2)[0])
  found = []
  while len(found) < count:
    a, b = rng.uniform(0.1, 0.9, size=(2, 64, 8)).astype(np.float32)
    ta, tb = np.zeros(64, np.float32), np.ones(64, np.float32)
    # Bisection along a -> b on the gap between the top class at a and the runner-up changing.
    cls = lambda t: np.argmax(np.asarray(fn(a + t[:, None] * (b - a))), axis=1)
    ca, cb = cls(ta), cls(tb)
    ok = ca != cb
    for _ in range(40):
      tm = (ta + tb) / 2
      same = cls(tm) == ca
      ta, tb = np.where(same, tm, ta), np.where(same, tb, tm)
    x = (a + ta[:, None] * (b - a)).astype(np.float32)
    top = np.asarray(f(jnp.asarray(x)))
    ok &= (top[:, 0] - top[:, 1]) < 1e-5
    found += list(x[ok])
  return np.stack(found[:count])


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_near_ties_are_never_certified_where_a_float32_corner_is_misclassified(method):
  fn = _mlp(0)
  x = _near_ties(fn, 200, seed=1)
  logits = np.asarray(fn(jnp.asarray(x)))
  y = np.argmax(logits, axis=1).astype(np.int32)
  eps = 1e-7
  verified = np.asarray(verify.certify(fn, x, y, eps, method=method))
  box = verify.linf_ball(x, eps)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  f = jax.jit(fn)
  broken = []
  for i in np.flatnonzero(verified):
    z = np.asarray(f(jnp.asarray(_corners(lo[i], hi[i]))))
    if np.any(np.argmax(z, axis=1) != y[i]) or np.any(
        np.sort(z, axis=1)[:, -1] == np.sort(z, axis=1)[:, -2]):
      broken.append(i)
  # Without the allowance, CROWN's margin bounds are positive on some of these examples
  # although a corner of their box is misclassified.
  assert not broken, f"{len(broken)} certified examples have a misclassified corner"


def test_the_allowance_is_what_certify_subtracts():
  fn = _mlp(2)
  x = jax.random.uniform(jax.random.key(0), (16, 8))
  y = jnp.argmax(fn(x), axis=1).astype(jnp.int32)
  eps = 1e-3
  spec = verify.margin_spec(y, 3)
  box = verify.linf_ball(x, eps)
  lower = certification.margin_bounds(fn, x, y, eps, "crown")
  lower = jnp.maximum(lower, certification.margin_bounds(fn, x, y, eps, "ibp"))
  allow = verify.rounding_allowance(fn, box, spec)
  assert np.all(np.asarray(allow) > 0) and np.all(np.isfinite(np.asarray(allow)))
  # Small next to ordinary margins: relative to the logits' scale, a few 1e-6.
  assert float(jnp.max(allow)) < 1e-4 * (1 + float(jnp.max(jnp.abs(fn(x)))))
  want = np.all(np.asarray(lower - allow) > 0, axis=1)
  np.testing.assert_array_equal(verify.certify(fn, x, y, eps, method="crown"), want)


@pytest.mark.parametrize("act", [jax.nn.relu, jnp.tanh, jax.nn.sigmoid])
@pytest.mark.parametrize("method,magnitudes,errors", [("ibp", "ibp", "forward"),
                                                      ("crown_ibp", "ibp", "forward"),
                                                      ("crown", "ibp", "forward"),
                                                      ("crown", "crown", "forward"),
                                                      ("crown", "crown", "backward")])
def test_one_ulp_boxes_hold_float32_evaluations_within_the_allowance(act, method, magnitudes,
                                                                     errors):
  fn = _mlp(3, sizes=(8, 32, 32, 4), act=act)
  rng = np.random.default_rng(0)
  lo = rng.uniform(0, 1, size=(8, 8)).astype(np.float32)
  hi = np.nextafter(lo, np.float32(np.inf))
  box = verify.Interval(jnp.asarray(lo), jnp.asarray(hi))
  b = getattr(verify, method)(fn, box)
  allow = np.asarray(verify.rounding_allowance(fn, box, magnitudes=magnitudes, errors=errors))
  f = jax.jit(fn)
  for i in range(lo.shape[0]):
    z = np.asarray(f(jnp.asarray(_corners(lo[i], hi[i]))))  # [256, 4]
    assert np.all(z >= np.asarray(b.lower)[i] - allow[i]), (z.min(0) - np.asarray(b.lower)[i])
    assert np.all(z <= np.asarray(b.upper)[i] + allow[i]), (z.max(0) - np.asarray(b.upper)[i])


def test_crown_magnitudes_shrink_a_deep_networks_allowance_and_it_still_holds():
  fn = _mlp(4, sizes=(8, 64, 64, 64, 64, 3))
  rng = np.random.default_rng(2)
  lo = rng.uniform(0, 1, size=(4, 8)).astype(np.float32)
  hi = lo + np.float32(0.05)
  box = verify.Interval(jnp.asarray(lo), jnp.asarray(hi))
  spec = verify.margin_spec(jnp.zeros(4, jnp.int32), 3)
  ibp = np.asarray(verify.rounding_allowance(fn, box, spec))
  crown = np.asarray(verify.rounding_allowance(fn, box, spec, magnitudes="crown"))
  assert np.all(crown <= ibp) and np.all(crown < 0.5 * ibp), (crown, ibp)
  lower = np.asarray(verify.crown(fn, box, spec).lower)
  f = jax.jit(lambda x: jnp.einsum("sk,nk->ns", spec[0], fn(x)))
  for i in range(lo.shape[0]):
    pts = lo[i] + rng.uniform(size=(4096, 8)).astype(np.float32) * np.float32(0.05)
    assert np.all(np.asarray(f(jnp.asarray(pts))) >= lower[i] - crown[i])
  with pytest.raises(InputError, match="magnitudes"):
    verify.rounding_allowance(fn, box, spec, magnitudes="exact")


def test_backward_errors_bound_the_float32_error_and_shrink_a_deep_networks_allowance():
  fn = _mlp(4, sizes=(8, 64, 64, 64, 64, 3))
  rng = np.random.default_rng(3)
  lo = rng.uniform(0, 1, size=(4, 8)).astype(np.float32)
  hi = lo + np.float32(0.02)
  box = verify.Interval(jnp.asarray(lo), jnp.asarray(hi))
  spec = verify.margin_spec(jnp.zeros(4, jnp.int32), 3)
  forward = np.asarray(verify.rounding_allowance(fn, box, spec, "crown"))
  backward = np.asarray(verify.rounding_allowance(fn, box, spec, "crown", errors="backward"))
  assert np.all(backward <= forward) and np.all(backward < 0.5 * forward), (backward, forward)
  # The evaluation part alone bounds float32 against float64 evaluations.
  graph, boxes = build_graph(fn, [box])
  out = graph.outputs[0]
  known = crown_module.intermediate_bounds(graph, boxes, "crown")
  bounds = ibp_module.propagate(graph, boxes, known)
  passes = rounding.PassBounds(ibp_module.propagate(graph, boxes), known)
  model = rounding.ErrorModel.refined(graph, bounds, passes)
  rows = jnp.swapaxes(spec, 0, 1).astype(jnp.float32)
  evaluation = np.asarray(rounding.sensitivity_errors(graph, passes, model, out, rows)).T
  plain = rounding.ErrorModel.forward(graph, bounds)
  for x in rounding._relu_inputs(graph):  # tighter, never looser, than the forward model
    assert np.all(np.asarray(model.errs[x.index]) <= np.asarray(plain.errs[x.index]))
  lower = np.asarray(verify.crown(fn, box, spec).lower)
  f32 = jax.jit(lambda x: jnp.einsum("sk,nk->ns", spec[0], fn(x)))
  ws, bs = [[np.asarray(a, np.float64) for a in group] for group in fn.weights]
  c = np.asarray(spec[0], np.float64)

  def f64(h):  # the real-valued network, to float64's precision
    for k, (w, b) in enumerate(zip(ws, bs)):
      h = h @ w + b
      h = np.maximum(h, 0.0) if k < len(ws) - 1 else h
    return h @ c.T

  for i in range(lo.shape[0]):
    pts = lo[i] + rng.uniform(size=(2048, 8)).astype(np.float32) * np.float32(0.02)
    z32 = np.asarray(f32(jnp.asarray(pts)), np.float64)
    z64 = f64(pts.astype(np.float64))
    assert np.all(np.abs(z32 - z64) <= evaluation[i])
    assert np.all(z32 >= lower[i] - backward[i]) and np.all(z64 >= lower[i] - backward[i])
  with pytest.raises(InputError, match="errors"):
    verify.rounding_allowance(fn, box, spec, errors="exact")


@pytest.mark.parametrize("op", [
    lambda x: x @ jnp.asarray([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]]),
    lambda x: -x,
    lambda x: 2.0 - 3.0 * x,
    lambda x: jnp.transpose(x.reshape(2, 3, 1), (2, 0, 1)).reshape(2, 3),
    lambda x: jnp.pad(x, ((0, 0), (1, 2)), constant_values=0.5),
    lambda x: jnp.concatenate([x[:, 1:], -x[:, :1]], axis=1),
    lambda x: jnp.sum(x * jnp.asarray([1.0, -1.0, 2.0]), axis=1, keepdims=True),
    lambda x: jnp.cumsum(-x, axis=1),
    lambda x: jnp.where(jnp.asarray([True, False, True]), x, -2.0 * x),
    lambda x: x[:, jnp.asarray([2, 0, 0])],
    lambda x: jax.lax.conv_general_dilated(x[:, None, :], jnp.asarray([[[1.0, -2.0]]]),
                                           (1,), "VALID")[:, 0],
])
def test_the_absolute_map_is_the_absolute_jacobian(op):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  graph, _ = build_graph(op, [verify.Interval(x, x)])
  nodes = [n for n in graph.nodes if n.primitive is not None]
  assert nodes and all(primitives.kind(n) in ("identity", "linear", "affine") for n in nodes)
  for n in nodes:
    ins = [jnp.ones(n.inputs[p].shape, jnp.float32) for p in n.bounded_inputs]
    out, vjp = jax.vjp(error_rules.absolute_map(n, primitives.kind(n) == "affine"), *ins)
    ct = jnp.asarray(rng.uniform(0.5, 2.0, size=out.shape), jnp.float32)
    for k, got in enumerate(vjp(ct)):  # |L_k|^T ct, for each bounded operand
      jac = jax.jacobian(lambda *v, n=n: n.apply_bounded(*v), argnums=k)(*ins)
      want = jnp.tensordot(ct, jnp.abs(jac), axes=ct.ndim)
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=n.describe())


def _backward_allowance(fn, box):
  return np.asarray(verify.rounding_allowance(fn, box, magnitudes="crown", errors="backward"))


def test_errors_and_bounds_pass_through_stop_gradient_and_barriers():
  rng = np.random.default_rng(3)
  w0 = jnp.asarray(rng.uniform(0.1, 1.0, size=(4, 6)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  lo = jnp.zeros((2, 4), jnp.float32)
  box = verify.Interval(lo, lo + 1.0)
  plain = _backward_allowance(lambda x: (x @ w0) @ w1, box)
  assert np.all(plain > 0)
  # stop_gradient's VJP is zero; the rounding before it still reaches the output.
  stopped = _backward_allowance(lambda x: jax.lax.stop_gradient(x @ w0) @ w1, box)
  np.testing.assert_allclose(stopped, plain, rtol=1e-6)
  # An optimization barrier's second result is its second operand, in every pass.
  barrier = lambda x: jax.lax.optimization_barrier((x @ jnp.zeros_like(w0), x @ w0))[1] @ w1
  np.testing.assert_allclose(_backward_allowance(barrier, box), plain, rtol=1e-6)
  want = verify.crown(lambda x: (x @ w0) @ w1, box)
  got = verify.crown(barrier, box)
  np.testing.assert_allclose(got.lower, want.lower, rtol=1e-6)
  np.testing.assert_allclose(got.upper, want.upper, rtol=1e-6)


def test_predicates_keep_their_dtype_when_their_bounds_are_widened():
  box = verify.Interval(jnp.full((1, 3), -1.0), jnp.full((1, 3), 2.0))
  leaky = lambda x: jnp.where(jnp.logical_not(x > 0), 0.1 * x, x)
  assert np.all(np.isfinite(np.asarray(verify.rounding_allowance(leaky, box))))
  step = np.asarray(verify.rounding_allowance(lambda x: x + (x > 0).astype(jnp.float32), box))
  assert np.all(step <= 3.0 + 1e-3), step  # the step moves by at most 1, x by rounding


def test_a_relu_whose_computed_bound_is_within_twice_its_error_of_the_threshold_is_not_flat():
  # The real value lies within the computed bound's error of it, the float value within
  # its own error of the real one: a ReLU is flat only when both stay on the flat side.
  w = jnp.asarray([[0.7], [0.3], [-0.2]], jnp.float32)
  box = verify.Interval(jnp.zeros((1, 3), jnp.float32), jnp.ones((1, 3), jnp.float32))

  def errors(b):
    graph, boxes = build_graph(lambda x: jax.nn.relu(x @ w + b), [box])
    bounds = ibp_module.propagate(graph, boxes)
    errs = rounding.error_bounds(graph, bounds)
    out = graph.outputs[0]
    x = out.inputs[out.bounded_inputs[0]]
    return float(bounds[x.index].upper[0, 0]), float(errs[x.index][0, 0]), errs[out.index]

  upper, e, _ = errors(jnp.float32(0.0))
  upper, e, relu = errors(jnp.float32(-(upper + 1.5 * e)))
  assert -2 * e < upper <= -e, (upper, e)
  assert float(relu[0, 0]) >= e


def test_narrow_float_network_is_within_its_allowance():
  w1 = jax.random.normal(jax.random.key(5), (8, 32))
  w2 = jax.random.normal(jax.random.key(6), (32, 3))
  fn = lambda x: (jax.nn.relu(x.astype(jnp.bfloat16) @ w1.astype(jnp.bfloat16)) @ w2.astype(
      jnp.bfloat16)).astype(jnp.float32)
  rng = np.random.default_rng(1)
  lo = rng.uniform(0, 1, size=(4, 8)).astype(np.float32)
  hi = lo + np.float32(1e-3)
  box = verify.Interval(jnp.asarray(lo), jnp.asarray(hi))
  b = verify.crown(fn, box)
  allow = np.asarray(verify.rounding_allowance(fn, box))
  f = jax.jit(fn)
  for i in range(lo.shape[0]):
    pts = np.concatenate([_corners(lo[i], hi[i]), lo[i] + rng.uniform(size=(256, 8)) * 1e-3])
    z = np.asarray(f(jnp.asarray(pts.astype(np.float32))))
    assert np.all(z >= np.asarray(b.lower)[i] - allow[i])
    assert np.all(z <= np.asarray(b.upper)[i] + allow[i])


def test_values_are_rounded_up_and_down_to_float32():
  eps = 0.1 + 1e-12  # rounds down to float32's 0.1 by round to nearest
  got = interval.round_up(eps)
  assert got.dtype == np.float32 and float(got) >= eps
  assert float(interval.round_up(0.5)) == float(interval.round_down(0.5)) == 0.5
  v = np.random.default_rng(0).normal(size=1000) * 10.0**np.arange(-20, 20, 0.04)
  down, up = interval.round_down(v), interval.round_up(v)
  assert np.all(down <= v) and np.all(np.nextafter(down, np.float32(np.inf)) > v)  # tight
  assert np.all(up >= v) and np.all(np.nextafter(up, np.float32(-np.inf)) < v)


def test_a_division_by_an_interval_around_zero_has_no_finite_allowance():
  fn = lambda x: 1.0 / (x - 0.5)
  box = verify.Interval(jnp.asarray([[0.4, 0.6]]), jnp.asarray([[0.6, 0.7]]))
  allow = np.asarray(verify.rounding_allowance(fn, box))
  assert np.isinf(allow[0, 0]) and np.isfinite(allow[0, 1])


def test_a_crossed_box_has_radius_zero_not_negative():
  # Bounds computed apart inside one compilation may cross by an ulp; centre-radius rules
  # read the radius, so it must not go negative (or the rule's bounds cross more).
  lower = jnp.asarray([1.0, 0.0, -2.0], jnp.float32)
  upper = jnp.asarray([np.nextafter(np.float32(1.0), np.float32(0.0)), 0.5, -2.0], jnp.float32)
  radius = jax.jit(lambda l, u: verify.Interval(l, u).radius)(lower, upper)
  np.testing.assert_array_equal(radius, [0.0, 0.25, 0.0])

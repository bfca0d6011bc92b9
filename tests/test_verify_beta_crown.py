"""β-CROWN: sound over every subdomain of ReLU splits, exact where every neuron is split."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import bound_testing
import verify
from robustlib.checks import InputError
from verify.alpha_crown import relu_nodes
from verify.graph import build_graph
from verify.graph import evaluate
from verify.crown import intermediate_bounds

_mlp = bound_testing.relu_mlp


def _pre_activations(fn, points):
  """``[M, L, width]`` the inputs of each ReLU layer at ``points [M, d]``."""
  graph, _ = build_graph(fn, [verify.Interval(points, points)])
  values = evaluate(graph, [points])
  relus = relu_nodes(graph.outputs[0])
  return [np.asarray(values[r.inputs[r.bounded_inputs[0]].index]) for r in relus]


def _unstable(fn, box):
  graph, boxes = build_graph(fn, [box])
  bounds = intermediate_bounds(graph, boxes, "crown")
  relus = relu_nodes(graph.outputs[0])
  out = []
  for r in relus:
    b = bounds[r.inputs[r.bounded_inputs[0]].index]
    out.append(np.asarray((b.lower < 0) & (b.upper > 0)))
  return out


def _splits_of(pre, unstable, rng, fraction):
  """Splits on a random part of the unstable neurons, on the side a point lies."""
  rows = []
  for layer, (z, u) in enumerate(zip(pre, unstable)):
    for j in np.flatnonzero(u[0]):
      if rng.random() < fraction:
        rows.append((layer, j, 1 if z[j] >= 0 else -1))
  return rows


def _pad(rows_per_domain):
  depth = max(1, max(len(r) for r in rows_per_domain))
  out = np.zeros((len(rows_per_domain), depth, 3), np.int32)
  for i, rows in enumerate(rows_per_domain):
    if rows:
      out[i, :len(rows)] = rows
  return out


def test_beta_crown_holds_on_points_that_satisfy_the_splits():
  fn, _ = _mlp()
  rng = np.random.default_rng(1)
  x0 = rng.uniform(size=(1, 6)).astype(np.float32)
  eps = 0.25
  box1 = verify.Interval(jnp.asarray(x0 - eps), jnp.asarray(x0 + eps))
  unstable = _unstable(fn, box1)
  assert sum(u.sum() for u in unstable) >= 8  # enough to split
  points = (x0 + rng.uniform(-eps, eps, size=(20000, 6))).astype(np.float32)
  pre = _pre_activations(fn, jnp.asarray(points))
  out = np.asarray(fn(jnp.asarray(points)))
  spec = np.asarray(verify.margin_spec(jnp.asarray([0]), 4))[0]  # [3, 4]
  values = out @ spec.T  # [M, 3]
  domains = [
      _splits_of([p[i]
                  for p in pre], unstable, rng, f)
      for i, f in zip(range(12), np.linspace(0.1, 1.0, 12))
  ]
  splits = _pad(domains)
  n = len(domains)
  box = verify.Interval(jnp.repeat(box1.lower, n, 0), jnp.repeat(box1.upper, n, 0))
  specs = jnp.broadcast_to(spec, (n,) + spec.shape)
  lower = np.asarray(verify.beta_crown(fn, box, specs, splits, steps=30))
  plain = np.asarray(verify.crown(fn, box1, specs[:1]).lower)[0]
  checked = 0
  for i, rows in enumerate(domains):
    inside = np.ones(len(points), bool)
    for layer, j, s in rows:
      inside &= s * pre[layer][:, j] >= 0
    assert inside.any()  # the point the splits came from, at least
    checked += inside.sum()
    assert np.all(values[inside] >= lower[i] - 1e-4), (i, values[inside].min(0), lower[i])
  assert checked > 1000
  # Splits tighten the bound: never looser than CROWN's over the whole box here, and much
  # tighter where most neurons are split.
  assert np.all(lower >= plain - 1e-4)
  assert np.mean(lower[-1] - plain) > 0.1


def _exact_minimum(params, x0, eps, pattern, c):
  """min c . f(x) over the box where the activation pattern holds: a linear program."""
  d = x0.shape[1]
  # Affine maps of x: z_l = W_l x + b_l through the fixed pattern.
  W, b = np.eye(d), np.zeros(d)
  a_ub, b_ub = [], []
  for (w, bias), signs in zip(params[:-1], pattern):
    w, bias = np.asarray(w, np.float64), np.asarray(bias, np.float64)
    zw, zb = W @ w, b @ w + bias  # z = x @ zw + zb
    # sign * z >= 0  ->  -sign * (x @ zw) <= sign * zb
    a_ub.append(-(signs[None, :] * zw).T)
    b_ub.append(signs * zb)
    on = (signs > 0).astype(np.float64)
    W, b = zw * on[None], zb * on
  w, bias = (np.asarray(v, np.float64) for v in params[-1])
  obj_w, obj_b = (W @ w) @ c, (b @ w + bias) @ c
  res = optimize.linprog(obj_w,
                         A_ub=np.concatenate(a_ub),
                         b_ub=np.concatenate(b_ub),
                         bounds=list(zip(x0[0] - eps, x0[0] + eps)),
                         method="highs")
  assert res.status == 0
  return res.fun + obj_b


def test_beta_crown_with_every_neuron_split_reaches_the_exact_minimum():
  """Every unstable neuron split: the function is affine on the subdomain, a polytope, and
  beta's optimum is the linear program's; without beta (steps=0) the bound ignores the
  polytope."""
  fn, params = _mlp(seed=3, sizes=(4, 8, 8, 3))
  rng = np.random.default_rng(0)
  x0 = rng.uniform(size=(1, 4)).astype(np.float32)
  eps = 0.3
  box = verify.Interval(jnp.asarray(x0 - eps), jnp.asarray(x0 + eps))
  unstable = _unstable(fn, box)
  point = (x0 + rng.uniform(-eps, eps, size=(1, 4))).astype(np.float32)
  pre = [p[0] for p in _pre_activations(fn, jnp.asarray(point))]
  rows = _splits_of(pre, unstable, rng, 1.0)
  assert len(rows) >= 3
  c = np.array([[1.0, -1.0, 0.0]], np.float32)
  pattern = [np.where(p >= 0, 1.0, -1.0) for p in pre]
  exact = _exact_minimum(params, x0, eps, pattern, c[0])
  splits = _pad([rows])
  cold = float(verify.beta_crown(fn, box, c[None], splits, steps=0)[0, 0])
  warm = float(verify.beta_crown(fn, box, c[None], splits, steps=300, lr_beta=0.2)[0, 0])
  assert warm <= exact + 1e-4
  assert warm > cold + 0.5 * (exact - cold)
  assert warm >= exact - 0.05 * max(abs(exact), 1.0)


def test_beta_crown_refuses_bad_splits():
  fn, _ = _mlp()
  x0 = jnp.full((1, 6), 0.5)
  box = verify.Interval(x0 - 0.25, x0 + 0.25)
  spec = verify.margin_spec(jnp.asarray([0]), 4)
  layers = verify.relu_layers(fn, box)
  assert [ly.size for ly in layers] == [16, 16] and "_mlp" in layers[0].where
  unstable = _unstable(fn, box)
  stable = int(np.flatnonzero(~unstable[0][0])[0])
  good = int(np.flatnonzero(unstable[0][0])[0])
  cases = [
      (np.zeros((1, 2), np.int32), "shape"),
      (np.zeros((2, 1, 3), np.int32), "shape"),
      (np.asarray([[[0, good, 1]]], np.float32), "integers"),
      (np.asarray([[[0, good, 2]]]), "sign"),
      (np.asarray([[[5, 0, 1]]]), "ReLU layer 5"),
      (np.asarray([[[1, 16, -1]]]), "neuron 16 of ReLU layer 1"),
      (np.asarray([[[0, stable, 1]]]), "stable neuron"),
  ]
  for splits, match in cases:
    with pytest.raises(InputError, match=match):
      verify.beta_crown(fn, box, spec, splits)
  with pytest.raises(InputError, match="steps"):
    verify.beta_crown(fn, box, spec, np.asarray([[[0, good, 1]]]), steps=-1)
  # Padding rows name nothing.
  np.testing.assert_allclose(verify.beta_crown(fn,
                                               box,
                                               spec,
                                               np.zeros((1, 3, 3), np.int32),
                                               steps=0),
                             verify.crown(fn, box, spec).lower,
                             rtol=1e-5,
                             atol=1e-5)

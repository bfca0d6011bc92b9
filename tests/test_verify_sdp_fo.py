"""SDP-FO (Dathathri et al. 2020): sound at every iterate, tighter than CROWN where it converges."""

from fractions import Fraction
import gc
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import verify
from robustlib.checks import InputError
from verify import sdp_fo as sdp

D, H, K = 6, 12, 3


def _mlp(seed=0, depth=2):
  rng = np.random.default_rng(seed)
  sizes = [D] + [H] * depth + [K]
  layers = [(rng.normal(size=(a, b)).astype(np.float32) / np.sqrt(a),
             (0.1 * rng.normal(size=b)).astype(np.float32)) for a, b in zip(sizes, sizes[1:])]

  def fn(x):
    for w, b in layers[:-1]:
      x = jax.nn.relu(x @ w + b)
    return x @ layers[-1][0] + layers[-1][1]

  return fn


def _problem(seed=0, eps=0.1, n=3, depth=2):
  fn = _mlp(seed, depth)
  x = np.random.default_rng(seed + 10).uniform(0.3, 0.7, size=(n, D)).astype(np.float32)
  y = np.argmax(np.asarray(fn(x)), axis=1)
  return fn, x, verify.margin_spec(y, K), verify.linf_ball(x, eps)


def _sampled_min(fn, box, spec, count=20000, seed=0):
  """Smallest ``spec @ fn`` over sampled points and box corners, ``[N, S]``."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  pts = rng.uniform(lo, hi, size=(count,) + lo.shape).astype(np.float32)
  corners = np.where(rng.random((count // 4,) + lo.shape) < 0.5, lo, hi).astype(np.float32)
  pts = np.concatenate([pts, corners])
  out = np.asarray(jax.vmap(fn)(jnp.asarray(pts)))
  return np.einsum("nsk,pnk->pns", np.asarray(spec), out).min(axis=0)


@pytest.mark.parametrize("seed,eps,depth,init", [(0, 0.1, 2, "box"), (1, 0.2, 2, "crown"),
                                                 (2, 0.05, 3, "alpha_crown")])
def test_bounds_hold_on_sampled_points_and_corners(seed, eps, depth, init):
  fn, _, spec, box = _problem(seed, eps, depth=depth)
  lower = np.asarray(verify.sdp_fo(fn, box, spec, steps=100, init=init))
  assert np.all(lower <= _sampled_min(fn, box, spec) + 1e-6)


def test_the_optimisation_compiles_once_per_function_and_shapes():
  fn, x, spec, _ = _problem(3, 0.1)
  sizes = []
  for shift in (0.0, 0.05, 0.1):
    lower = np.asarray(verify.sdp_fo(fn, verify.linf_ball(x + shift, 0.1), spec, steps=20))
    assert np.all(np.isfinite(lower))
    gc.collect()  # programs of collected functions leave the cache; fn stays alive
    sizes.append(sdp._optimised_duals.cache_size())
  assert sizes[2] == sizes[1] == sizes[0], sizes


def test_tighter_than_crown_and_alpha_crown_on_a_small_mlp():
  fn, _, spec, box = _problem(0, 0.1)
  lower = np.asarray(verify.sdp_fo(fn, box, spec, steps=1500, lr=0.03))
  crown = np.asarray(verify.crown(fn, box, spec).lower)
  alpha = np.asarray(verify.alpha_crown(fn, box, spec, steps=50, lower_only=True))
  assert np.all(lower >= crown)  # never looser: it returns the larger of the two
  assert np.mean(lower - crown) > 0.01, (lower, crown)
  assert np.mean(lower) > np.mean(alpha), (lower, alpha)


@pytest.mark.parametrize("init,steps", [("crown", 0), ("alpha_crown", 20)])
def test_the_linear_multipliers_start_the_dual_at_crowns_bound(init, steps):
  # The LP's multipliers multiply every hidden activation away: the sound dual value equals
  # the bound of CROWN (or alpha-CROWN) with the same slopes, up to float32.
  fn, _, spec, box = _problem(1, 0.2, depth=3)
  net, spec = sdp.layered_network(fn, box, spec)
  rows = jnp.transpose(spec, (1, 0, 2))
  slopes = sdp._linear_slopes(fn, box, rows, steps, None)
  start = np.stack([
      -sdp._certified_value(net, rows[s], sdp._initial_duals(net, rows[s], [a[s]
                                                                            for a in slopes]), 4096)
      for s in range(rows.shape[0])
  ], 1)
  linear = np.asarray(verify.alpha_crown(fn, box, spec, steps, lower_only=True))
  np.testing.assert_allclose(start, linear, atol=1e-5)
  assert np.all(linear > np.asarray(sdp.lower_bounds(fn, box, spec, "ibp")) + 1e-2)  # not IBP's


def test_the_chord_is_above_the_relu_over_its_input_box_in_float64():
  fn, _, spec, box = _problem(2, 0.3)
  net, _ = sdp.layered_network(fn, box, spec)
  with jax.enable_x64(True):
    for k, pre in enumerate(net.inputs):
      slope, offset = (np.asarray(v) for v in sdp._chord(net, k, jnp.float64))
      c = np.asarray(net.thresholds[k], np.float64)
      t = np.linspace(0, 1, 101)[:, None, None]
      z = np.asarray(pre.lower, np.float64) * (1 - t) + np.asarray(pre.upper, np.float64) * t
      assert np.all(slope * z + offset >= np.maximum(z, c))
      unstable = (np.asarray(pre.lower) < c) & (np.asarray(pre.upper) > c)
      assert unstable.any()


def test_warm_started_sdp_fo_is_never_looser_than_alpha_crown():
  fn, _, spec, box = _problem(1, 0.2)
  alpha = np.asarray(verify.alpha_crown(fn, box, spec, 20, lower_only=True))
  lower = np.asarray(verify.sdp_fo(fn, box, spec, steps=300, init="alpha_crown"))
  assert np.all(lower >= alpha)
  assert np.mean(lower - alpha) > 0.005, (lower, alpha)
  assert np.all(lower <= _sampled_min(fn, box, spec) + 1e-6)
  # Rows alpha-CROWN already bounds above a level keep its bound; the others improve alike.
  level = float(np.median(alpha))
  some = np.asarray(verify.sdp_fo(fn, box, spec, steps=300, init="alpha_crown", only_below=level))
  kept = ~np.any(alpha <= level, axis=0)
  assert kept.any() and not kept.all()
  np.testing.assert_array_equal(some[:, kept], alpha[:, kept])
  np.testing.assert_allclose(some[:, ~kept], lower[:, ~kept], atol=1e-3)


def test_fixed_activations_cost_nothing_whatever_their_kappa():
  # A stable inactive ReLU's output is a constant: its kappa enters neither the matrix's
  # smallest eigenvalue nor the dual's sum.
  fn, _, spec, box = _problem(0, 0.1)
  net, spec = sdp.layered_network(fn, box, spec)
  row = jnp.transpose(spec, (1, 0, 2))[0]
  fixed = [~np.asarray(f) for f in sdp._free(net)]
  assert any(f.any() for f in fixed[1:])
  duals = sdp._initial_duals(net, row)
  base = sdp._certified_value(net, row, duals, 4096)
  k0, kz = duals["kappa"]
  duals["kappa"] = (k0, [jnp.where(f, 1e3, k) for f, k in zip(fixed, kz)])
  np.testing.assert_allclose(sdp._certified_value(net, row, duals, 4096), base, rtol=1e-6)


def test_the_repaired_kappa_recovers_what_a_poor_eigenvalue_estimate_loses(monkeypatch):
  # Three Lanczos steps leave the iterate far from PSD: the uniform shift by |lambda_min|
  # costs much, the shift by the negative part's row sums little; both are sound.
  fn, _, spec, box = _problem(0, 0.1)
  net, spec = sdp.layered_network(fn, box, spec)
  rows = jnp.transpose(spec, (1, 0, 2))
  best, _ = sdp._optimise(net, rows, jax.random.PRNGKey(0), 200, 3, 0.03)
  duals = jax.tree_util.tree_map(lambda a: a[0], best)
  repaired = -sdp._certified_value(net, rows[0], duals, 4096)
  monkeypatch.setattr(sdp, "_repaired", lambda kappa, mats, free: (kappa, mats))
  uniform = -sdp._certified_value(net, rows[0], duals, 4096)
  assert np.all(repaired >= uniform) and np.mean(repaired - uniform) > 0.1, (repaired, uniform)
  assert np.all(repaired <= _sampled_min(fn, box, spec)[:, 0] + 1e-6)


def test_the_certified_value_is_sound_at_any_feasible_iterate():
  # Random multipliers and kappa, far from optimal: the value is an upper bound anyway.
  fn, _, spec, box = _problem(3, 0.15)
  net, spec = sdp.layered_network(fn, box, spec)
  rows = jnp.transpose(spec, (1, 0, 2))
  truth = _sampled_min(fn, box, spec)
  rng = np.random.default_rng(0)
  for trial in range(4):
    for s in range(rows.shape[0]):
      duals = sdp._initial_duals(net, rows[s])
      duals = jax.tree_util.tree_map(
          lambda v: v + jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) * 0.3, duals)
      duals = sdp._project(duals)
      upper = sdp._certified_value(net, rows[s], duals, 4096)
      assert np.all(-upper <= truth[:, s] + 1e-6), (trial, s)


def test_lanczos_finds_the_smallest_eigenvalue_from_above():
  rng = np.random.default_rng(0)
  n = 40
  a = rng.normal(size=(3, n, n)).astype(np.float32)
  a = (a + np.swapaxes(a, 1, 2)) / 2
  exact = np.linalg.eigvalsh(a.astype(np.float64))[:, 0]
  matvec = lambda v: jnp.einsum("bij,bj->bi", a, v)
  start = jax.random.normal(jax.random.PRNGKey(0), (3, n))
  few, vec = sdp.lanczos_min(matvec, start, 8)
  full, _ = sdp.lanczos_min(matvec, start, n)
  assert np.all(np.asarray(few) >= exact - 1e-4)  # a Ritz value: never below
  np.testing.assert_allclose(np.asarray(full), exact, atol=1e-3)
  rayleigh = np.einsum("bi,bi->b", vec, np.asarray(matvec(vec)))
  np.testing.assert_allclose(rayleigh, np.asarray(few), atol=1e-3)


def test_certify_with_sdp_fo_agrees_with_the_attack():
  fn, x, spec, box = _problem(0, 0.05, n=2)
  y = np.argmax(np.asarray(fn(x)), axis=1)
  got = np.asarray(verify.certify(fn, x, y, 0.05, method="sdp_fo"))
  crown = np.asarray(verify.certify(fn, x, y, 0.05, method="crown"))
  assert np.all(got >= crown)  # at least CROWN's certificates
  truth = _sampled_min(fn, box, spec)
  assert not np.any(got & (truth.min(axis=1) <= 0))


def test_bad_input_is_a_clear_error():
  fn, _, spec, box = _problem(0)
  with pytest.raises(InputError, match="lanczos_iterations must be at least 1"):
    verify.sdp_fo(fn, box, spec, lanczos_iterations=0)
  with pytest.raises(InputError, match="steps must be at least 0"):
    verify.sdp_fo(fn, box, spec, steps=-1)
  with pytest.raises(InputError, match="Lanczos iterations must be at least 1"):
    sdp.lanczos_min(lambda v: v, jnp.ones((1, 3)), 0)
  with pytest.raises(InputError, match="'tanh'"):
    verify.sdp_fo(lambda v: jnp.tanh(v @ jnp.ones((D, K))), box, spec, steps=1)
  skip = lambda v: jax.nn.relu(v @ jnp.ones((D, D))) @ jnp.ones((D, K)) + v @ jnp.ones((D, K))
  with pytest.raises(InputError, match="skip connection|previous ReLU"):
    verify.sdp_fo(skip, box, spec, steps=1)
  with pytest.raises(InputError, match="max_dense=10"):
    verify.sdp_fo(fn, box, spec, steps=1, max_dense=10)
  with pytest.raises(InputError, match="spec must have shape"):
    verify.sdp_fo(fn, box, jnp.ones((2, 2, K)), steps=1)
  with pytest.raises(InputError, match="init must be one of"):
    verify.sdp_fo(fn, box, spec, steps=1, init="lp")
  with pytest.raises(InputError, match="init_steps must be an integer >= 0"):
    verify.sdp_fo(fn, box, spec, steps=1, init_steps=-1)
  with pytest.raises(InputError, match="only_below must be a number or None"):
    verify.sdp_fo(fn, box, spec, steps=1, only_below="0")


def _exact_affine_min(fn_exact, box):
  """The exact minimum ``[N]`` over the box's corners of an affine ``fn_exact(corner)`` (a
  list of Fractions in, a Fraction out), as floats."""
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  out = []
  for n in range(lo.shape[0]):
    corners = itertools.product(*[(Fraction(a), Fraction(b)) for a, b in zip(lo[n], hi[n])])
    out.append(float(min(fn_exact(list(v)) for v in corners)))
  return np.asarray(out)


def test_the_certified_value_covers_sums_cancelled_inside_a_map():
  # 2^40 x0 + x1 - 2^40 x2 with x0 = x2 = 1: the value is x1, about 2^-12, but float64 rounds
  # the intermediate sum 2^40 + x1 by up to 2^-13, which a margin relative to the values
  # (|c|, the kappa part: some 1e-4) misses; the absolute sums the map adds up do not.
  big = 2.0**40
  w = np.array([[big], [1.0], [-big]], np.float32)
  fn = lambda x: jax.nn.relu(x) @ w  # every ReLU active on the box: affine there
  box = verify.Interval(jnp.asarray([[1.0, 2.0**-13, 1.0]]), jnp.asarray([[1.0, 2.0**-12, 1.0]]))
  spec = jnp.ones((1, 1, 1))
  truth = _exact_affine_min(lambda v: v[0] * Fraction(big) + v[1] - v[2] * Fraction(big), box)
  net, spec = sdp.layered_network(fn, box, spec)
  upper = sdp._certified_value(net, spec[:, 0], sdp._initial_duals(net, spec[:, 0]), 4096)
  assert np.all(-upper <= truth), (-upper, truth)
  lower = np.asarray(verify.sdp_fo(fn, box, spec, steps=0, init="box"))
  assert np.all(lower[:, 0] <= truth), (lower, truth)


def test_the_certified_value_reads_subnormal_boxes_and_thresholds_exactly():
  # XLA's float32 -> float64 conversion on a CPU flushes subnormals to 0: the box
  # [-2^-130, 2^-131] would become the point 0 and 2^120 max(x, 0) a constant 0. (The
  # float32 bound passes flush them too, so the ReLU's output box is set here exactly.)
  x = np.float32([[-2.0**-130], [2.0**-131]])
  fn = lambda v: jax.nn.relu(v) * np.float32(2.0**120)
  box = verify.Interval(jnp.asarray(x[:1]), jnp.asarray(x[1:]))
  spec = -jnp.ones((1, 1, 1))
  net, spec = sdp.layered_network(fn, box, spec)
  out = verify.Interval(jnp.asarray(np.maximum(x[:1], 0)), jnp.asarray(np.maximum(x[1:], 0)))
  net = sdp._Network(net.maps, net.thresholds, (box, out), (box,))
  truth = -float(Fraction(2)**120 * Fraction(float(x[1, 0])))  # min of -2^120 relu(x)
  upper = sdp._certified_value(net, spec[:, 0], sdp._initial_duals(net, spec[:, 0]), 4096)
  assert np.all(-upper <= truth), (-upper, truth)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_multiplier_gives_no_bound(bad):
  fn, _, spec, box = _problem(0, 0.1, n=2)
  net, spec = sdp.layered_network(fn, box, spec)
  row = jnp.transpose(spec, (1, 0, 2))[0]
  duals = sdp._initial_duals(net, row)
  duals["in_box"][1] = duals["in_box"][1].at[0, 0].set(bad)
  upper = sdp._certified_value(net, row, duals, 4096)
  assert upper[0] == np.inf and np.isfinite(upper[1]), upper

"""Specification of `verify.patches`: CROWN's intermediate bounds of convolutions, in patches.

Bounding a convolution's neurons with patches (each backward row kept only over
its receptive field) gives the same bounds as the dense backward pass, for any
layout, stride, padding and kernel dilation, with per-channel normalization,
nonlinearities other than ReLU and several convolutions in a chain; it is used
only where it applies, and the dense path takes over otherwise.
"""

import importlib

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import bound_testing
import verify
from verify import patches
from verify.graph import build_graph

crown_module = importlib.import_module("verify.crown")


def _kernel(rng, c_in, c_out, k, layout):
  w = rng.normal(size=(c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
  return jnp.asarray(w if layout == "NCHW" else np.transpose(w, (2, 3, 1, 0)), jnp.float32)


def _network(layout="NCHW",
             stride=2,
             padding="VALID",
             dilation=1,
             act=jax.nn.relu,
             seed=0,
             nchw_input=False,
             third_conv=False,
             pixel_std=False):
  """conv -> act -> conv -> act -> dense, with input normalization, on 12x12x2 images.

  ``nchw_input``: the function takes NCHW images and transposes them to ``layout``.
  ``third_conv``: one more conv -> act before the dense layer. ``pixel_std``: the
  normalization divides by one value per pixel instead of one per channel.
  """
  rng = np.random.default_rng(seed)
  dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
  w1, w2 = _kernel(rng, 2, 4, 3, layout), _kernel(rng, 4, 5, 3, layout)
  w_extra = _kernel(np.random.default_rng(seed + 1), 5, 5, 3, layout)
  shape = (1, 2, 1, 1) if layout == "NCHW" else (1, 1, 1, 2)
  mean = jnp.asarray(rng.uniform(0.2, 0.5, size=shape), jnp.float32)
  std_shape = (1,) + ((2, 12, 12) if layout == "NCHW" else (12, 12, 2)) if pixel_std else shape
  std = jnp.asarray(rng.uniform(0.5, 1.5, size=std_shape), jnp.float32)
  b1 = jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32)
  bshape = (1, 4, 1, 1) if layout == "NCHW" else (1, 1, 1, 4)

  def features(x):
    if nchw_input and layout == "NHWC":
      x = jnp.transpose(x, (0, 2, 3, 1))
    h = (x - mean) / std
    h = lax.conv_general_dilated(h,
                                 w1, (stride, stride),
                                 padding,
                                 rhs_dilation=(dilation,) * 2,
                                 dimension_numbers=dn)
    h = act(h + b1.reshape(bshape))
    h = lax.conv_general_dilated(h, w2, (1, 1), padding, dimension_numbers=dn)
    if third_conv:
      h = lax.conv_general_dilated(act(h), w_extra, (1, 1), padding, dimension_numbers=dn)
    return act(h).reshape(h.shape[0], -1)

  x_shape = (3, 2, 12, 12) if layout == "NCHW" or nchw_input else (3, 12, 12, 2)
  x = jnp.asarray(rng.uniform(0, 1, size=x_shape), jnp.float32)
  m = jax.eval_shape(features, x).shape[1]
  w3 = jnp.asarray(rng.normal(size=(m, 3)) / np.sqrt(m), jnp.float32)

  def fn(x):
    return features(x) @ w3

  return fn, x


def _dense_only(monkeypatch):
  monkeypatch.setattr(patches, "plan", lambda node: None)


def _spy_on_plans(monkeypatch) -> list:
  plans, original = [], patches.plan

  def spy(node):
    plans.append(original(node))
    return plans[-1]

  monkeypatch.setattr(patches, "plan", spy)
  return plans


CASES = {
    "nchw_valid_stride2": dict(),
    "nhwc_same_stride1": dict(layout="NHWC", stride=1, padding="SAME"),
    "nchw_explicit_pad_dilated": dict(padding=((1, 2), (2, 1)), dilation=2, stride=1),
    "nhwc_tanh_stride2_same": dict(layout="NHWC", padding="SAME", act=jnp.tanh),
    "nchw_input_transposed_to_nhwc": dict(layout="NHWC", nchw_input=True),
    "nhwc_three_convs": dict(layout="NHWC", stride=1, padding="SAME", third_conv=True),
    "nchw_per_pixel_std": dict(pixel_std=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_patches_equal_the_dense_backward_pass(case, monkeypatch):
  fn, x = _network(**CASES[case])
  box = verify.linf_ball(x, 0.05)
  plans = _spy_on_plans(monkeypatch)
  with_patches = jax.jit(lambda b: verify.crown(fn, b))(box)
  small_chunks = jax.jit(lambda b: verify.crown(fn, b, chunk_size=6))(box)
  assert any(p is not None for p in plans)  # the second convolution's neurons took patches
  _dense_only(monkeypatch)
  dense = jax.jit(lambda b: verify.crown(fn, b))(box)
  for got in (with_patches, small_chunks):
    np.testing.assert_allclose(got.lower, dense.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.upper, dense.upper, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(dense.upper - dense.lower)) > 0  # a real, non-degenerate case


@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_bounds_are_sound(case):
  fn, x = _network(**CASES[case])
  box = verify.linf_ball(x, 0.05)
  b = jax.jit(lambda b: verify.crown(fn, b))(box)
  out = bound_testing.outputs_at(fn, bound_testing.box_points(box, fn))
  assert np.all(out >= np.asarray(b.lower) - 1e-5)
  assert np.all(out <= np.asarray(b.upper) + 1e-5)


def test_patches_bound_float64_networks_as_the_dense_pass(monkeypatch):
  # Under x64 Python ints are int64 while the windows' starts are int32: one index dtype.
  with jax.enable_x64(True):
    fn32, x = _network(layout="NHWC", stride=1, padding="SAME")
    fn = lambda v: fn32(v.astype(jnp.float32)).astype(jnp.float64)
    box = verify.linf_ball(jnp.asarray(x, jnp.float64), 0.05)
    plans = _spy_on_plans(monkeypatch)
    got = verify.crown(fn, box)
    assert any(p is not None for p in plans)
    _dense_only(monkeypatch)
    dense = verify.crown(fn, box)
  np.testing.assert_allclose(got.lower, dense.lower, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.upper, dense.upper, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,expected", [("nchw_valid_stride2", [True]),
                                           ("nhwc_three_convs", [True, False]),
                                           ("nchw_per_pixel_std", [False])])
def test_static_sign_rows_only_behind_one_relaxation_of_a_position_independent_map(
    case, expected, monkeypatch):
  # Behind a convolution whose input is a relaxation of a map that is the same at every
  # position, rows take the static-sign matrix products; deeper convolutions (a second
  # relaxation on the way) and per-pixel constants keep the general patch pass. Both
  # agree with the dense pass (test above).
  taken, original = [], patches.static_sign_applies
  monkeypatch.setattr(patches, "static_sign_applies",
                      lambda pl: taken.append(original(pl)) or taken[-1])
  fn, x = _network(**CASES[case])
  jax.jit(lambda b: verify.crown(fn, b))(verify.linf_ball(x, 0.05))
  assert taken == expected


def test_plan_covers_the_chain_to_the_input():
  fn, x = _network()
  graph, _ = build_graph(fn, [verify.linf_ball(x, 0.1)])
  second_conv = [n for n in graph.nodes if n.name == "conv_general_dilated"][1]
  pl = patches.plan(second_conv)
  assert pl is not None
  names = [n.name for n in pl.chain]
  assert names[0] == "conv_general_dilated" and names[-1] == "input"
  assert names.count("conv_general_dilated") == 2
  assert "max" in names and "sub" in names and "div" in names
  # Window at the first ReLU: 4 channels x 3x3; at the input 2 channels x 7x7 (stride 2).
  assert pl.patch_elements == max(4 * 9, 2 * 49)


@pytest.mark.parametrize("pool,groups", [(True, 1), (False, 2)])
def test_no_plan_through_pooling_or_grouped_convolutions(pool, groups):
  rng = np.random.default_rng(0)
  w1, w2 = _kernel(rng, 2, 4, 3, "NCHW"), _kernel(rng, 4 // groups, 4, 3, "NCHW")
  x = jnp.asarray(rng.uniform(size=(2, 2, 16, 16)), jnp.float32)
  dn = ("NCHW", "OIHW", "NCHW")

  def fn(x):
    h = jax.nn.relu(lax.conv_general_dilated(x, w1, (1, 1), "VALID", dimension_numbers=dn))
    if pool:
      h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return lax.conv_general_dilated(h,
                                    w2, (1, 1),
                                    "VALID",
                                    dimension_numbers=dn,
                                    feature_group_count=groups)

  graph, _ = build_graph(fn, [verify.linf_ball(x, 0.1)])
  last = graph.nodes[-1]
  assert last.name == "conv_general_dilated"
  assert patches.plan(last) is None
  # Without the pooling and with one group, the same network takes patches.
  plain = lambda x: lax.conv_general_dilated(jax.nn.relu(
      lax.conv_general_dilated(x, w1, (1, 1), "VALID", dimension_numbers=dn)),
                                             _kernel(rng, 4, 4, 3, "NCHW"), (1, 1),
                                             "VALID",
                                             dimension_numbers=dn)
  graph, _ = build_graph(plain, [verify.linf_ball(x, 0.1)])
  assert patches.plan(graph.nodes[-1]) is not None


def test_no_plan_when_patches_would_not_be_smaller():
  rng = np.random.default_rng(0)
  w = _kernel(rng, 1, 3, 3, "NCHW")
  x = jnp.asarray(rng.uniform(size=(2, 1, 3, 3)), jnp.float32)  # the kernel covers the image
  fn = lambda x: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  graph, _ = build_graph(fn, [verify.linf_ball(x, 0.1)])
  assert patches.plan(graph.nodes[-1]) is None


def test_static_sign_rows_are_differentiable_like_the_general_pass(monkeypatch):
  # Certified training differentiates bounds with respect to the kernels (traced values).
  rng = np.random.default_rng(0)
  w1, w2 = _kernel(rng, 2, 4, 3, "NCHW"), _kernel(rng, 4, 5, 3, "NCHW")
  w3 = jnp.asarray(rng.normal(size=(5 * 3 * 3, 3)) * 0.2, jnp.float32)
  x = jnp.asarray(rng.uniform(size=(2, 2, 12, 12)), jnp.float32)
  dn = ("NCHW", "OIHW", "NCHW")

  def width(kernels):
    a, b = kernels

    def fn(z):
      h = jax.nn.relu(lax.conv_general_dilated(z, a, (2, 2), "VALID", dimension_numbers=dn))
      h = jax.nn.relu(lax.conv_general_dilated(h, b, (1, 1), "VALID", dimension_numbers=dn))
      return h.reshape(h.shape[0], -1) @ w3

    bounds = verify.crown(fn, verify.linf_ball(x, 0.05))
    return jnp.sum(bounds.upper - bounds.lower)

  taken, original = [], patches.static_sign_applies
  monkeypatch.setattr(patches, "static_sign_applies",
                      lambda pl: taken.append(original(pl)) or taken[-1])
  fast = jax.grad(width)((w1, w2))
  assert taken == [True]
  monkeypatch.setattr(patches, "static_sign_applies", lambda pl: False)
  general = jax.grad(width)((w1, w2))
  for got, want in zip(fast, general):
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

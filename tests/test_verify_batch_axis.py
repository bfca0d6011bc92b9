"""Bound passes read the first axis as the examples: programs that reorder or mix it are refused.

A function that keeps every shape while moving examples around (``h[::-1]``, a roll,
a cumulative sum over the batch, a product with an ``[N, N]`` matrix) would
otherwise be bounded as if row ``i`` were example ``i``'s: certify called a
misclassified centre verified. Each such program is refused with an error naming
the primitive and the user's line; programs that only index, broadcast, reduce or
transpose other axes keep working, with bounds that hold on sampled points.
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import verify
from robustlib.checks import InputError
from verify import primitives

N, D, K = 3, 4, 3
W = np.random.default_rng(0).normal(size=(D, K)).astype(np.float32)


def net(x):
  return jax.nn.relu(x @ W) - 0.5 * (x @ W)


def _x():
  # Each example far from the others, so that moving rows changes the classes.
  return np.random.default_rng(1).uniform(0.2, 0.8, size=(N, D)).astype(np.float32)


def _shift_down(h):
  return jnp.pad(h, ((1, 0), (0, 0)))[:-1]


def _window_over_batch(h):
  return lax.reduce_window(h, 0.0, lax.add, (2, 1), (1, 1), ((1, 0), (0, 0)))


def _scan_over_batch(h):
  return lax.scan(lambda c, r: (c + r, c + r), jnp.zeros(h.shape[1:]), h)[1]


def _conv_mixing_batch(x):
  # A convolution whose spatial axis is the examples (its own batch axis is last).
  kernel = jnp.ones((K, K, 2), jnp.float32)
  h = lax.conv_general_dilated(net(x)[:, :, None],
                               kernel, (1,),
                               "SAME",
                               dimension_numbers=("HCN", "OIH", "HCN"))
  return h[:, :, 0]


MIXING = {
    "reverse_output": (lambda x: net(x)[::-1], "rev"),
    "reverse_input": (lambda x: net(x[::-1]), "rev"),
    "flip": (lambda x: jnp.flip(net(x), axis=0), "rev"),
    "roll": (lambda x: jnp.roll(net(x), 1, axis=0), "slice"),
    "shift_by_pad_and_slice": (lambda x: _shift_down(net(x)), "pad"),
    "permuting_gather": (lambda x: net(x)[jnp.array([1, 2, 0])], "gather"),
    "cumsum_over_batch": (lambda x: jnp.cumsum(net(x), axis=0), "cumsum"),
    "cummax_over_batch": (lambda x: lax.cummax(net(x), axis=0), "cummax"),
    "window_over_batch": (lambda x: _window_over_batch(net(x)), "reduce_window_sum"),
    "scan_over_batch": (lambda x: _scan_over_batch(net(x)), "slice"),
    "batch_mean_broadcast":
        (lambda x: net(x) - jnp.mean(net(x), axis=0, keepdims=True), "reduce_sum"),
    "mixing_matrix": (lambda x: jnp.ones(
        (x.shape[0], x.shape[0])) / x.shape[0] @ net(x), "dot_general"),
    "square_transpose": (lambda x: (net(x).T @ jnp.eye(K, dtype=jnp.float32)).T, "transpose"),
    "batch_in_columns": (lambda x: jnp.einsum("nk,mk->mn", net(x), jnp.ones(
        (N, K))), "dot_general"),
    "conv_over_batch": (_conv_mixing_batch, "conv_general_dilated"),
}


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha_crown"])
@pytest.mark.parametrize("name", sorted(MIXING))
def test_a_program_that_moves_examples_is_refused_naming_its_line(name, method):
  fn, primitive = MIXING[name]
  x = _x()
  y = np.argmax(np.asarray(net(x)), axis=1)
  with pytest.raises(InputError, match="reorders, mixes or moves") as err:
    verify.certify(fn, x, y, 0.01, method=method)
  assert f"'{primitive}' at " in str(err.value), str(err.value)
  assert "test_verify_batch_axis.py:" in str(err.value), str(err.value)


def test_without_the_check_the_reversed_batch_would_be_wrong():
  # What the refusal protects: the reversed program misclassifies the first example's
  # centre, so no method may call it verified.
  fn, x = MIXING["reverse_output"][0], _x()
  y = np.argmax(np.asarray(net(x)), axis=1)
  assert np.any(np.argmax(np.asarray(fn(x)), axis=1) != y)
  for method in ("crown", "ibp"):
    with pytest.raises(InputError):
      verify.certify(fn, x, y, 0.0, method=method)


def _per_example_weights(x):
  v = jnp.asarray(np.random.default_rng(2).normal(size=(N, K, K)).astype(np.float32))
  return jnp.einsum("nk,nkj->nj", net(x), v)  # dot_general batched over the examples


def _conv_nhwc(x):
  img = x.reshape(x.shape[0], 2, 2, 1)
  kernel = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 1, K)).astype(np.float32))
  h = lax.conv_general_dilated(img,
                               kernel, (1, 1),
                               "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.max(jax.nn.relu(h), axis=(1, 2))


KEEPING = {
    "take_along_axis":
        lambda x: net(x) + jnp.take_along_axis(
            net(x), jnp.zeros((x.shape[0], K), jnp.int32), axis=1),
    "column_gather":
        lambda x: net(x)[:, jnp.array([2, 0, 1])],
    "vmapped_example":
        jax.vmap(lambda v: net(v[None])[0]),
    "inner_transpose":
        lambda x: jnp.swapaxes(net(x)[:, :, None] * jnp.ones((1, 1, 2)), 1, 2).sum(1),
    "pad_and_slice_columns":
        lambda x: jnp.pad(net(x), ((0, 0), (1, 1)))[:, 1:K + 1],
    "cumsum_over_classes":
        lambda x: jnp.cumsum(net(x), axis=1),
    "reverse_classes":
        lambda x: net(x)[:, ::-1],
    "per_example_weights":
        _per_example_weights,
    "conv_nhwc":
        _conv_nhwc,
    "concatenate_columns":
        lambda x: jnp.concatenate([net(x), x[:, :1]], axis=1),
}


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha_crown"])
@pytest.mark.parametrize("name", sorted(KEEPING))
def test_programs_that_keep_examples_apart_are_bounded_soundly(name, method):
  fn = KEEPING[name]
  x = _x()
  box = verify.linf_ball(x, 0.05)
  b = {
      "ibp": lambda: verify.ibp(fn, box),
      "crown": lambda: verify.crown(fn, box),
      "alpha_crown": lambda: verify.alpha_crown(fn, box, steps=5),
  }[method]()
  lo, hi = np.asarray(b.lower), np.asarray(b.upper)
  rng = np.random.default_rng(4)
  for _ in range(8):
    pts = rng.uniform(np.asarray(box.lower), np.asarray(box.upper)).astype(np.float32)
    out = np.asarray(fn(pts))
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5), name


def test_every_record_says_whether_it_keeps_rows():
  # A record without a rule is refused by every bound pass (fail closed); the registry's
  # own records all state one.
  missing = [r.name for r in primitives.REGISTRY.values() if r.rows is None]
  assert not missing, missing


def test_an_identity_gather_is_checked_on_its_values():
  # The same gather with a permutation instead of arange(n) moves examples.
  x = _x()
  y = np.argmax(np.asarray(net(x)), axis=1)
  fn = lambda x: net(x)[jnp.array([0, 2, 1])[:x.shape[0]]
                        if x.shape[0] == N else jnp.arange(x.shape[0])]
  with pytest.raises(InputError, match="'gather'"):
    verify.certify(fn, x, y, 0.01, method="crown")

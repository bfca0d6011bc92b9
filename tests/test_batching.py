"""Batched evaluation compiles once, pads the last batch and matches a direct call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustlib import batching, checks, parallel


def _linear(w):
  return lambda x: x.reshape(x.shape[0], -1) @ w


def test_batched_apply_matches_direct_call_with_padding():
  rng = np.random.default_rng(0)
  x = rng.random((37, 4, 4, 1), dtype=np.float32)
  w = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  out = batching.batched_apply(_linear(w), x, batch_size=8, progress=False)
  assert out.shape == (37, 5)
  np.testing.assert_allclose(out, _linear(w)(x), rtol=1e-5, atol=1e-6)


def test_compiles_once_across_batches_and_calls():
  traces = []

  def fn(params, x):
    traces.append(x.shape)
    return x.sum(axis=(1, 2, 3)) * params

  x = np.random.rand(50, 2, 2, 1).astype(np.float32)
  for scale in (1.0, 2.0):
    out = batching.batched_apply(fn, x, batch_size=16, params=jnp.float32(scale), progress=False)
    np.testing.assert_allclose(out, x.sum(axis=(1, 2, 3)) * scale, rtol=1e-5)
  assert traces == [(16, 2, 2, 1)]


def test_accuracy_counts_correct_predictions():
  x = np.eye(4, dtype=np.float32).reshape(4, 2, 2, 1)
  y = np.array([0, 1, 2, 0])  # the last one is wrong
  acc = batching.accuracy(lambda v: v.reshape(4 if v.shape[0] == 4 else -1, 4),
                            x,
                            y,
                            batch_size=3,
                            progress=False)
  assert acc == pytest.approx(0.75)


def test_accuracy_with_a_sharding_pads_to_the_batch():
  mesh = parallel.make_mesh(1)
  x = np.random.rand(10, 3).astype(np.float32)
  y = np.argmax(x, axis=1)
  acc = batching.accuracy(lambda v: v,
                            x,
                            y,
                            batch_size=4,
                            sharding=parallel.data_sharding(mesh),
                            progress=False)
  assert acc == 1.0


def test_accuracy_rejects_nan_inputs():
  x = np.zeros((4, 3), np.float32)
  x[2, 0] = np.nan
  with pytest.raises(checks.InputError, match="NaN"):
    batching.accuracy(lambda v: v, x, np.zeros(4, np.int32), progress=False)


def test_make_mesh_rejects_too_many_devices():
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(len(jax.devices()) + 1)

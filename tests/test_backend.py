"""The backend policy: CPU's fast paths on CPU only, plain XLA elsewhere, overridable, and every
setting gives the same attack results and bounds."""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import attacks
from attacks import core
from robustlib import backend
from robustlib import compilation
from robustlib.checks import InputError
import verify

SETTINGS = {
    "cpu": "cpu",
    "plain": "plain",
    "no fast gradients": "cpu,fast_gradients=off",
    "no fast transposes": "cpu,fast_conv_transpose=off",
    "parallel chunks, small budget": "cpu,parallel_chunks=on,chunk_budget=20000",
    "chunks in sequence, small budget": "plain,chunk_budget=20000",
}


def test_cpu_fast_paths_only_on_cpu_and_plain_xla_elsewhere(monkeypatch):
  monkeypatch.delenv(backend.ENV, raising=False)
  assert backend.fast_paths("cpu") == backend.CPU
  for platform in ("gpu", "cuda", "rocm", "tpu"):
    policy = backend.fast_paths(platform)
    assert policy == backend.PLAIN
    assert not (policy.fast_gradients or policy.fast_conv_transpose or policy.ynnpack_dots_only)
  assert backend.fast_paths() == (backend.CPU if jax.default_backend() == "cpu" else backend.PLAIN)


def test_the_environment_overrides_the_policy(monkeypatch):
  monkeypatch.setenv(backend.ENV, "plain")
  assert backend.fast_paths("cpu") == backend.PLAIN
  monkeypatch.setenv(backend.ENV, "cpu, chunk_budget=4096, parallel_chunks=ON")
  assert backend.fast_paths("gpu") == dataclasses.replace(backend.CPU,
                                                          chunk_budget=4096,
                                                          parallel_chunks=True)
  monkeypatch.setenv(backend.ENV, "fast_gradients=off")  # changes the backend's default
  assert backend.fast_paths("cpu") == dataclasses.replace(backend.CPU, fast_gradients=False)
  assert compilation.compiler_options() is not None or jax.default_backend() != "cpu" or (
      not compilation._accepted(tuple(compilation.CPU_OPTIONS.items())))  # pylint: disable=protected-access
  monkeypatch.setenv(backend.ENV, "plain")
  assert compilation.compiler_options() is None


@pytest.mark.parametrize("setting, message", [
    ("fast", "'fast' is not one of"),
    ("cpu,fastgrad=on", "'fastgrad=on' is not one of"),
    ("fast_gradients=maybe", "fast_gradients takes on or off"),
    ("chunk_budget=lots", "chunk_budget takes a whole number"),
    ("chunk_budget=0", "chunk_budget must be positive"),
    ("bab_batch_size=", "'bab_batch_size=' is not one of"),
])
def test_a_bad_setting_is_named(monkeypatch, setting, message):
  monkeypatch.setenv(backend.ENV, setting)
  with pytest.raises(InputError, match=message) as error:
    backend.fast_paths("cpu")
  assert backend.ENV in str(error.value)


def _cnn(seed=0):
  """A fresh ``[N, 1, 10, 10] -> [N, 4]`` CNN closure (a new function: no trace is reused)."""
  rng = np.random.default_rng(seed)
  k1 = jnp.asarray(rng.normal(0, 0.5, (4, 1, 3, 3)), jnp.float32)
  k2 = jnp.asarray(rng.normal(0, 0.3, (6, 4, 3, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(0, 0.2, (6 * 3 * 3, 4)), jnp.float32)

  def fn(x):
    h = jax.nn.relu(lax.conv(x, k1, (1, 1), "VALID"))
    h = jax.nn.relu(lax.conv(h, k2, (2, 2), "VALID"))
    return h.reshape(h.shape[0], -1) @ w

  return fn


def _results(monkeypatch, setting):
  monkeypatch.setenv(backend.ENV, setting)
  jax.clear_caches()
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (8, 1, 10, 10)), jnp.float32)
  y = jnp.asarray(np.arange(8) % 4)
  fn = _cnn()
  prepared = core.prepare(fn, x)
  assert (prepared is fn) == (not backend.fast_paths().fast_gradients)
  grad = core.loss_gradient(prepared, lambda logits: -logits[:, 0])(x)[0]
  x_adv = attacks.pgd(0.1, steps=5)(_cnn(), x, y, jax.random.key(0))
  box = verify.linf_ball(x, 0.02)
  crown = jax.jit(lambda b: verify.crown(_cnn(), b))(box)
  return dict(grad=grad, x_adv=x_adv, lower=crown.lower, upper=crown.upper)


def test_every_setting_gives_the_same_attack_results_and_bounds(monkeypatch):
  reference = _results(monkeypatch, "cpu")
  for name, setting in SETTINGS.items():
    results = _results(monkeypatch, setting)
    for key, value in results.items():
      np.testing.assert_allclose(value,
                                 reference[key],
                                 rtol=1e-5,
                                 atol=1e-5,
                                 err_msg=f"{name} {key}")
  jax.clear_caches()

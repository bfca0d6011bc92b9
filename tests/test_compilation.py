"""robustlib.jit: jax.jit with the compiler options robustlib's programs use."""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import robustlib
from robustlib import compilation


def _conv_net(x):
  """A small CNN's two convolutions, ``[N, 28, 28, 1] -> [N, 32]``."""
  rng = np.random.default_rng(0)
  k1 = jnp.asarray(rng.normal(size=(4, 4, 1, 16)) / 4, x.dtype)
  k2 = jnp.asarray(rng.normal(size=(4, 4, 16, 32)) / 16, x.dtype)
  nhwc = ("NHWC", "HWIO", "NHWC")
  h = jax.nn.relu(lax.conv_general_dilated(x, k1, (2, 2), "VALID", dimension_numbers=nhwc) + 0.1)
  h = jax.nn.relu(lax.conv_general_dilated(h, k2, (1, 1), "VALID", dimension_numbers=nhwc))
  return jnp.sum(h, axis=(1, 2))


def test_jit_computes_what_jax_jit_computes():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
  np.testing.assert_allclose(robustlib.jit(_conv_net)(x), jax.jit(_conv_net)(x), rtol=1e-6)
  grad = robustlib.jit(jax.grad(lambda v: jnp.sum(_conv_net(v))))
  np.testing.assert_allclose(grad(x), jax.grad(lambda v: jnp.sum(_conv_net(v)))(x), rtol=1e-5)


def test_jit_takes_jax_jit_arguments_and_decorator_forms():

  @robustlib.jit
  def plain(v):
    return v * 2

  @robustlib.jit(static_argnames=("power",))
  def raised(v, power):
    return v**power

  assert float(plain(3.0)) == 6.0
  assert float(raised(2.0, power=3)) == 8.0
  assert raised.__name__ == "raised"
  twice = robustlib.jit(lambda v, n: v * n, static_argnums=1)
  assert float(twice(2.0, 4)) == 8.0
  with pytest.raises(ValueError):  # a non-hashable static argument, as with jax.jit
    twice(2.0, np.ones(2))


def test_on_cpu_convolutions_are_left_to_xla_and_dots_to_ynnpack():
  if jax.default_backend() != "cpu":
    pytest.skip("the options are for XLA's CPU backend")
  options = compilation.compiler_options()
  if options is None:
    pytest.skip("this jaxlib does not know the YNNPACK fusion option")
  assert options == compilation.CPU_OPTIONS
  x = jnp.zeros((128, 28, 28, 1), jnp.float32)
  hlo = robustlib.jit(_conv_net).lower(x).compile().as_text()
  assert "convolution(" in hlo  # XLA's own convolution, not one inside a library fusion
  conv_fusions = [line for line in hlo.splitlines() if "__ynn_fusion" in line and "conv" in line]
  assert not conv_fusions


def test_xla_flags_that_choose_the_fusions_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert compilation.compiler_options() is None


def test_a_callers_own_compiler_options_are_kept():
  fn = robustlib.jit(lambda v: v + 1, compiler_options={"xla_backend_optimization_level": 0})
  assert float(fn(1.0)) == 2.0
  assert fn.lower(1.0).compile() is not None


def test_inside_a_callers_transformation_it_is_a_plain_jit():
  inner = robustlib.jit(lambda v: jnp.sin(v) * 2)
  outer = jax.jit(lambda v: inner(v) + 1)  # options only at the top level: no error here
  np.testing.assert_allclose(outer(0.5), np.sin(0.5) * 2 + 1, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(inner)(jnp.ones(3)), np.sin(1.0) * 2 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(inner)(0.5), np.cos(0.5) * 2, rtol=1e-6)

"""Models become pure logits functions; any JAX callable composes with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import robustlib
from robustlib import models

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def mlp():
  model = models.create("mlp",
                        num_classes=10,
                        input_shape=SHAPE,
                        hidden=(16,),
                        mean=(0.3,),
                        std=(0.4,))
  return model, models.init(model, jax.random.PRNGKey(0), SHAPE)


@pytest.fixture(scope="module")
def bn_model():
  model = models.create("cnn7", num_classes=3, input_shape=SHAPE)
  return model, models.init(model, jax.random.PRNGKey(1), SHAPE)


def test_logits_fn_is_pure_and_jittable(mlp):
  logits_fn = robustlib.as_logits_fn(*mlp, input_shape=SHAPE)
  x = jnp.asarray(np.random.default_rng(0).random((4, *SHAPE)), jnp.float32)
  eager = logits_fn(x)
  assert eager.shape == (4, 10)
  np.testing.assert_allclose(jax.jit(logits_fn)(x), eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda v: logits_fn(v[None])[0])(x),
                             eager,
                             rtol=1e-5,
                             atol=1e-6)


def test_logits_fn_uses_running_statistics_of_batchnorm(bn_model):
  model, variables = bn_model
  logits_fn = robustlib.as_logits_fn(model, variables)
  x = jnp.asarray(np.random.default_rng(1).random((6, *SHAPE)), jnp.float32)
  # In eval mode an example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(logits_fn(x)[:2], logits_fn(x[:2]), rtol=1e-5, atol=1e-5)


def test_input_gradients_flow_through_the_normalization(mlp):
  logits_fn = robustlib.as_logits_fn(*mlp)
  x = jnp.full((1, *SHAPE), 0.5, jnp.float32)
  grad = jax.grad(lambda v: logits_fn(v)[0, 3])(x)
  assert grad.shape == x.shape and float(jnp.abs(grad).sum()) > 0


def test_wrong_input_shape_is_named(mlp):
  logits_fn = robustlib.as_logits_fn(*mlp, input_shape=SHAPE)
  with pytest.raises(models.ModelInputError, match=r"\(8, 8, 1\)"):
    logits_fn(jnp.zeros((2, 28, 28, 1)))


def test_compose_applies_right_to_left():
  f = robustlib.compose(lambda v: v * 2, lambda v: v + 1)
  assert float(f(jnp.float32(3))) == 8.0
  assert float(robustlib.compose()(jnp.float32(3))) == 3.0


def test_normalize_then_model_equals_model_with_statistics_inside(mlp):
  model, variables = mlp
  raw = models.create("mlp", num_classes=10, input_shape=SHAPE, hidden=(16,))
  x = jnp.asarray(np.random.default_rng(2).random((3, *SHAPE)), jnp.float32)
  composed = robustlib.compose(robustlib.as_logits_fn(raw, variables),
                               robustlib.normalize((0.3,), (0.4,)))
  np.testing.assert_allclose(composed(x),
                             robustlib.as_logits_fn(model, variables)(x),
                             rtol=1e-5,
                             atol=1e-5)


def test_normalize_rejects_bad_statistics():
  with pytest.raises(robustlib.InputError, match="positive"):
    robustlib.normalize((0.5,), (0.0,))
  with pytest.raises(robustlib.InputError, match="equal length"):
    robustlib.normalize((0.5, 0.5), (1.0,))
  with pytest.raises(robustlib.InputError, match="3 channels"):
    robustlib.normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))(jnp.zeros((1, 4, 4, 2)))


def test_check_logits_fn_accepts_any_callable_of_the_right_shape():
  w = jnp.ones((64, 5))
  assert robustlib.check_logits_fn(lambda x: x.reshape(x.shape[0], -1) @ w, (7, *SHAPE)) == 5
  with pytest.raises(robustlib.InputError, match="logits"):
    robustlib.check_logits_fn(lambda x: x.sum(), (7, *SHAPE))
  with pytest.raises(robustlib.InputError, match="N=7"):
    robustlib.check_logits_fn(lambda x: x.reshape(-1, 8), (7, *SHAPE))

"""Training methods as their papers wrote them: bounds with the clean batch's BatchNorm
statistics (Shi et al. 2021, auto_LiRPA), the warm-up regularizer at the normalized input,
TRADES in one BatchNorm mode, and weight averaging with its warm-up and averaged
statistics (Gowal et al. 2020)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import verify
from robustlib import data, models
from robustlib.models.normalize import Normalize
from training import batch_statistics, methods, optim, state as state_lib, steps
from training.configs import default


class TinyBatchNormCNN(nn.Module):
  """Conv, BatchNorm, ReLU, dense, BatchNorm, ReLU, logits: BatchNorm on both kinds of layer."""
  mean: tuple = (0.0,)
  std: tuple = (1.0,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Normalize(self.mean, self.std)(x)
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    x = nn.Dense(32)(x.reshape(x.shape[0], -1))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", "train"), data.load("digits", "test")


def _robust(**fields):
  rc = default.get_config().robust
  rc.update(fields)
  return rc


def _bn_setup(train, seed=0):
  model = TinyBatchNormCNN(train.info.mean, train.info.std)
  variables = models.init(model, jax.random.PRNGKey(seed), train.info.input_shape)
  # Running statistics far from any batch's, as after training on other data.
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.7, variables["batch_stats"])
  x, y = next(data.batches(train, 64, seed=seed))
  return model, variables, jnp.asarray(x), jnp.asarray(y)


def _cross_entropy(logits, y):
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


def test_replayed_statistics_give_the_training_mode_network(digits):
  model, variables, x, _ = _bn_setup(digits[0])
  (logits, _), stats = batch_statistics.record(
      lambda: model.apply(variables, x, train=True, mutable=["batch_stats"]))
  assert len(stats) == 2
  replayed = batch_statistics.replay(lambda z: model.apply(variables, z, train=False), stats)
  np.testing.assert_allclose(replayed(x), logits, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(model.apply(variables, x, train=False) - logits).max()) > 0.1
  # Bounds of the replayed network hold for points of the ball, bound as the affine map.
  box = verify.linf_ball(x, 0.05)
  bounds = verify.crown(replayed, box)
  z = x + 0.05 * jax.random.rademacher(jax.random.PRNGKey(3), x.shape, jnp.float32)
  out = replayed(jnp.clip(z, 0.0, 1.0))
  assert bool(jnp.all(out >= bounds.lower - 1e-4) & jnp.all(out <= bounds.upper + 1e-4))


@pytest.mark.parametrize("method", ["ibp", "crown_ibp", "fast_ibp"])
def test_bound_losses_use_the_clean_batch_statistics(digits, method):
  """At eps = 0 every bound is exact: the worst-case loss is the cross-entropy of the
  training-mode logits, not of the running-statistics network."""
  model, variables, x, y = _bn_setup(digits[0])
  loss_fn = methods.make_loss(method, _robust(eps=0.1, warmup_steps=5, ramp_steps=5))
  _, (metrics, _) = loss_fn(model.apply, variables, x, y, jax.random.PRNGKey(0), 0)
  train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  eval_logits = model.apply(variables, x, train=False)
  assert float(metrics["robust_loss"]) == pytest.approx(_cross_entropy(train_logits, y), abs=1e-4)
  assert abs(float(metrics["robust_loss"]) - _cross_entropy(eval_logits, y)) > 0.05


def test_trades_compares_logits_in_one_batch_norm_mode(digits):
  model, variables, x, y = _bn_setup(digits[0])
  loss_fn = methods.make_loss("trades", _robust(eps=0.1, warmup_steps=5, ramp_steps=5))
  _, (metrics, new_stats) = loss_fn(model.apply, variables, x, y, jax.random.PRNGKey(0), 0)
  assert float(metrics["kl"]) < 1e-6  # x' = x at eps = 0
  # Both passes update the running statistics, as two training-mode forward passes do.
  once = model.apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
  twice = model.apply(variables | {"batch_stats": once}, x, train=True,
                      mutable=["batch_stats"])[1]["batch_stats"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_stats,
               twice)


def test_the_tightness_regularizer_is_measured_at_the_normalized_input():
  """At IBP initialization (Shi et al. 2021) the bounds keep the normalized input's size, so
  the tightness term is about 0 there; measured in pixels it was about 0.7 on MNIST."""
  info = data.info("mnist")
  model = models.create("cnn_small",
                        num_classes=10,
                        input_shape=info.input_shape,
                        mean=info.mean,
                        std=info.std)
  variables = models.init(model, jax.random.PRNGKey(0), info.input_shape)
  variables = dict(variables, params=methods.ibp_init(variables["params"], jax.random.PRNGKey(2)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (32,) + info.input_shape)
  y = jnp.zeros(32, jnp.int32)
  rc = _robust(eps=0.1, warmup_steps=0, ramp_steps=10, reg_tol=0.5)
  regularizer = {}
  for std in (info.std, 1.0):
    loss_fn = methods.make_loss("fast_ibp", rc, input_std=std)
    _, (metrics, _) = loss_fn(model.apply, variables, x, y, jax.random.PRNGKey(0), 1)
    regularizer[std] = float(metrics["regularizer"])
  assert regularizer[info.std] < 0.1 < 0.5 < regularizer[1.0], regularizer


def test_certified_training_of_a_batch_norm_cnn_raises_verified_accuracy(digits):
  train, test = digits
  model = TinyBatchNormCNN(train.info.mean, train.info.std)
  config = default.get_config()
  config.optimizer.learning_rate = 3e-3
  verified = {}
  for method in ("standard", "ibp"):
    rc = _robust(eps=0.055, warmup_steps=30, ramp_steps=200)
    tx = optim.make_optimizer(config.optimizer, 300)
    state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape)
    step = jax.jit(steps.make_train_step(model.apply, tx, methods.make_loss(method, rc)))
    batches = data.batches(train, 64, seed=0)
    for _ in range(300):
      state, metrics = step(state, next(batches))
    assert float(metrics["nonfinite"]) == 0.0
    variables = state.eval_variables()
    fn = lambda z, v=variables: model.apply(v, z, train=False)
    verified[method] = float(
        jnp.mean(verify.certify(fn, jnp.asarray(test.images), jnp.asarray(test.labels), 0.05,
                                "ibp")))
  assert verified["ibp"] > verified["standard"] + 0.3, verified


def test_weight_averaging_warms_up_and_averages_the_batch_statistics(digits):
  train, _ = digits
  model = TinyBatchNormCNN(train.info.mean, train.info.std)
  tx = optim.make_optimizer(default.get_config().optimizer, 20)
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape, ema=True)
  step = jax.jit(steps.make_train_step(model.apply, tx, ema_decay=0.99))
  batches = data.batches(train, 32, seed=0)
  for _ in range(5):
    previous = state
    state, _ = step(state, next(batches))
  keep = min(0.99, (1 + 4) / (10 + 4))  # step t = 4: the warm-up's decay, not 0.99
  for field, raw in (("ema_params", "params"), ("ema_batch_stats", "batch_stats")):
    expected = jax.tree.map(lambda e, p: keep * e + (1 - keep) * p, getattr(previous, field),
                            getattr(state, raw))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 getattr(state, field), expected)
  evaluated = state.eval_variables()
  assert evaluated["params"] is state.ema_params
  assert evaluated["batch_stats"] is state.ema_batch_stats

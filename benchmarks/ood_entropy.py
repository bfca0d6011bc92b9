"""Certified uncertainty out of distribution (Berrada et al. 2021's OOD specification).

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.ood_entropy --dataset=mnist \\
        --ood=../shared/data/fashion_mnist/t10k-images-first500-idx3-ubyte.gz --eps=0.01

Trains a ReLU MLP on ``--dataset`` (``--train_steps`` of Adam), makes its last layer
Bayesian with a diagonal Laplace approximation (Gaussian weights centred on the
trained ones, precisions ``prior_precision`` plus the diagonal of the Gauss-Newton
matrix of the training loss), and on the first ``--num_examples`` images of
``--ood`` (another data set, an IDX image file, or uniform ``noise``), within an L-inf ball of
``--eps``, bounds the expected probability of every class with
`verify.functional_lagrangian`. The specification holds where the predictive
entropy's certified lower bound, ``-log max_c E[p_c]``, is at least ``--level``
(a fraction of ``log C``). Beside each bound: the Monte-Carlo expectation at the
centre and after a PGD ascent on the expected top probability, which must never
exceed the bound (the table counts violations beyond 4 standard errors).
"""

from __future__ import annotations

import math
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import verify
from robustlib import data, scripts

_DATASET = flags.DEFINE_string("dataset", "mnist", "In-distribution data set.")
_OOD = flags.DEFINE_string(
    "ood", "fashion_mnist", "Out-of-distribution images: a data set's test split, an IDX "
    "image file (a path ending in .gz or -ubyte), or 'noise' (uniform).")
_EPS = flags.DEFINE_float("eps", 0.01, "L-inf radius around each OOD image.")
_NUM = flags.DEFINE_integer("num_examples", 20, "OOD images.")
_HIDDEN = flags.DEFINE_list("hidden", ["100", "100"], "Hidden widths of the MLP.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 2000, "Adam steps of training.")
_EXPOSURE = flags.DEFINE_float(
    "outlier_exposure", 0.0, "Weight of outlier exposure (Hendrycks et al. 2019) in training: "
    "the cross-entropy to the uniform distribution on uniform-noise images, one per example.")
_PRIOR = flags.DEFINE_float("prior_precision", 1.0, "Prior precision of the Laplace layer.")
_STEPS = flags.DEFINE_integer("steps", 300, "Adam steps on the multipliers.")
_LEVEL = flags.DEFINE_float("level", 0.5, "Entropy level, as a fraction of log C.")
_MC = flags.DEFINE_integer("mc_samples", 20000, "Monte-Carlo draws of the last layer.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (or ROBUSTLIB_DATA_DIR).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, batches and noise.")


def _init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a), jnp.zeros(b))
          for k, a, b in zip(keys, sizes, sizes[1:])]


def _features(params, x):
  """The hidden layers: ``x [N, ...] -> h [N, H]`` (ReLU outputs)."""
  h = x.reshape((x.shape[0], -1))
  for w, b in params:
    h = jax.nn.relu(h @ w + b)
  return h


def train(x: np.ndarray,
          y: np.ndarray,
          hidden: list[int],
          steps: int,
          key: jax.Array,
          exposure: float = 0.0):
  """An MLP trained by Adam (batch 128, learning rate 1e-3): hidden and last layers; with
  ``exposure > 0``, plus that weight times the cross-entropy from the uniform distribution
  on as many uniform-noise images."""
  classes = int(y.max()) + 1
  params = _init(key, [int(np.prod(x.shape[1:]))] + hidden + [classes])
  opt = optax.adam(1e-3)

  logits = lambda p, xb: _features(p[:-1], xb) @ p[-1][0] + p[-1][1]

  def loss(p, xb, yb, noise):
    fit = optax.softmax_cross_entropy_with_integer_labels(logits(p, xb), yb).mean()
    return fit - exposure * jnp.mean(jax.nn.log_softmax(logits(p, noise)))

  @jax.jit
  def step(carry, idx):
    p, s = carry
    noise = jax.random.uniform(jax.random.fold_in(key, idx[0]), (idx.shape[0],) + x.shape[1:])
    g = jax.grad(loss)(p, x[idx], y[idx], noise)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  x, y = jnp.asarray(x), jnp.asarray(y)
  idx = jax.random.randint(jax.random.fold_in(key, 1), (steps, 128), 0, x.shape[0])
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
  return params[:-1], params[-1]


def laplace_layer(h: jax.Array, w: jax.Array, b: jax.Array,
                  prior_precision: float) -> verify.GaussianLinear:
  """Diagonal Laplace approximation of the last layer at ``(w, b)`` given features ``h``:
  precision ``prior + sum_n h_nj^2 p_nc (1 - p_nc)`` (the Gauss-Newton diagonal)."""
  p = jax.nn.softmax(h @ w + b)
  curvature = p * (1 - p)  # [N, C]
  prec_w = prior_precision + (h**2).T @ curvature
  prec_b = prior_precision + curvature.sum(0)
  return verify.GaussianLinear(np.asarray(w), np.asarray(prec_w**-0.5), np.asarray(b),
                               np.asarray(prec_b**-0.5))


def expected_probabilities(features, layer, x, key, num):
  """Monte-Carlo ``E[softmax]`` ``[N, C]`` and its standard errors."""
  w, b = layer.sample(key, num)
  p = jax.nn.softmax(jnp.einsum("nh,shc->snc", features(x), w) + b[:, None], axis=-1)
  return np.asarray(p.mean(0)), np.asarray(p.std(0)) / math.sqrt(num)


def attack(features, layer, box, key, steps=40, samples=2000):
  """PGD ascent on the expected top probability (fixed draws), in the box."""
  w, b = layer.sample(key, samples)

  def top(x):
    p = jax.nn.softmax(jnp.einsum("nh,shc->snc", features(x), w) + b[:, None], axis=-1).mean(0)
    return jnp.sum(jnp.max(p, axis=-1))

  x = (box.lower + box.upper) / 2
  size = 2.5 * jnp.max(box.upper - box.lower) / 2 / steps
  for _ in range(steps):
    x = jnp.clip(x + size * jnp.sign(jax.grad(top)(x)), box.lower, box.upper)
  return x


def main(argv):
  del argv
  key = jax.random.PRNGKey(_SEED.value)
  train_ds = data.load(_DATASET.value, "train", data_dir=_DATA_DIR.value)
  shape = train_ds.images.shape[1:]
  start = time.perf_counter()
  hidden, (w, b) = train(train_ds.images, train_ds.labels, [int(v) for v in _HIDDEN.value],
                         _TRAIN_STEPS.value, key, _EXPOSURE.value)
  features = lambda x: _features(hidden, x)
  test = data.load(_DATASET.value, "test", data_dir=_DATA_DIR.value)
  h_test = jax.jit(features)(jnp.asarray(test.images))
  accuracy = float(np.mean(np.argmax(h_test @ w + b, -1) == test.labels))
  h_train = jax.jit(features)(jnp.asarray(train_ds.images))
  layer = laplace_layer(h_train, w, b, _PRIOR.value)
  print(f"{_DATASET.value} MLP {_HIDDEN.value}: test accuracy {100 * accuracy:.2f} % "
        f"({time.perf_counter() - start:.0f} s); Laplace last layer, mean weight std "
        f"{np.mean(layer.std_w):.4f}")
  if _OOD.value == "noise":
    ood = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2), (_NUM.value,) + shape))
  elif _OOD.value.endswith((".gz", "-ubyte")):
    ood = data.read_idx(_OOD.value, expected_magic=2051)[:_NUM.value, ..., None] / 255.0
  else:
    ood = data.load(_OOD.value, "test", data_dir=_DATA_DIR.value).images[:_NUM.value]
  if ood.shape[1:] != shape:
    scripts.usage_error(f"--ood={_OOD.value} images {ood.shape[1:]} do not match "
                        f"--dataset={_DATASET.value}'s {shape}")
  x = jnp.asarray(ood, jnp.float32)
  box = verify.Interval(jnp.clip(x - _EPS.value, 0, 1), jnp.clip(x + _EPS.value, 0, 1))
  start = time.perf_counter()
  upper = np.asarray(verify.functional_lagrangian(features, box, layer, steps=_STEPS.value))
  seconds = time.perf_counter() - start
  centre, _ = expected_probabilities(features, layer, x, jax.random.fold_in(key, 3), _MC.value)
  adv = attack(features, layer, box, jax.random.fold_in(key, 4))
  attacked, err = expected_probabilities(features, layer, adv, jax.random.fold_in(key, 5),
                                         _MC.value)
  classes = upper.shape[1]
  level = _LEVEL.value * math.log(classes)
  entropy = np.asarray(verify.entropy_lower_bound(upper))
  top = np.argmax(attacked, -1)
  violations = int(np.sum(attacked > upper + 4 * err + 1e-6))
  print(f"\nOOD {_OOD.value}, L-inf {_EPS.value}, level {level:.3f} nats "
        f"({_LEVEL.value} log {classes})")
  print(f"{'#':>3} {'E[p] centre':>12} {'E[p] attack':>12} {'bound':>7} {'H bound':>8} "
        f"{'certified':>10}")
  for i in range(x.shape[0]):
    print(f"{i:>3} {centre[i].max():>12.4f} {attacked[i].max():>12.4f} "
          f"{upper[i, top[i]]:>7.4f} {entropy[i]:>8.3f} {str(bool(entropy[i] >= level)):>10}")
  certified = float(np.mean(entropy >= level))
  # The attack's top probabilities: where one exceeds exp(-level) the specification fails.
  falsified = float(np.mean(attacked.max(-1) > math.exp(-level)))
  print(f"\ncertified {100 * certified:.1f} %, falsified by the attack {100 * falsified:.1f} %, "
        f"mean bound - attack on the top class "
        f"{np.mean(upper[np.arange(len(top)), top] - attacked.max(-1)):.4f}, "
        f"{seconds / x.shape[0]:.2f} s/example, violations {violations}")


if __name__ == "__main__":
  scripts.run(main)

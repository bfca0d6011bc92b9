"""Models the attack tests share: a linear classifier with known minimum distances, a
small MLP fitted to the digits (each built once per test process), and a digits MLP
trained by the training script (once per test session)."""

import fcntl
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robustlib import data

NUM_CLASSES = 10
SHAPE = (8, 8, 1)
REPO = pathlib.Path(__file__).resolve().parents[1]


def lp_norm(v, norm):
  """Per-example L-inf, L2 or L1 norm of ``[N, ...]``."""
  v = v.reshape(v.shape[0], -1)
  return jnp.linalg.norm(v, ord={"linf": np.inf, "l2": 2, "l1": 1}[norm], axis=1)


@functools.lru_cache(maxsize=None)
def linear(num_examples=8):
  """A 10-class linear model on 8x8x1 inputs and points far from the box faces.

  Returns:
    ``(logits_fn, x, y, pairwise)``: ``pairwise[norm]`` ``[N, K]`` is the exact
    distance from ``x`` to the decision boundary between ``y`` and each class,
    ``(z_y - z_t) / ||w_y - w_t||`` in the dual norm (L1 for L-inf, L2 for L2,
    L-inf for L1),
    inf at ``y``; its row minimum is the minimum adversarial distance.
  """
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(64, NUM_CLASSES)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=NUM_CLASSES) * 0.1, jnp.float32)

  def logits_fn(x):
    return (x.reshape(x.shape[0], -1) - 0.5) @ w + bias

  x = jnp.asarray(rng.uniform(0.4, 0.6, size=(num_examples,) + SHAPE), jnp.float32)
  z = logits_fn(x)
  y = jnp.argmax(z, axis=1)
  gap = jnp.take_along_axis(z, y[:, None], axis=1) - z  # z_y - z_t
  diff = w.T[None, :, :] - w.T[y][:, None, :]  # w_t - w_y: [N, K, D]
  own = jnp.arange(NUM_CLASSES)[None] == y[:, None]
  pairwise = {
      norm: jnp.where(own, jnp.inf, gap / jnp.linalg.norm(diff, ord=q, axis=-1))
      for norm, q in (("linf", 1), ("l2", 2), ("l1", np.inf))
  }
  # The nearest wrong decision stays inside the box: [0.4, 0.6] +- distance.
  assert float(pairwise["linf"].min(axis=1).max()) < 0.3
  assert float(pairwise["l1"].min(axis=1).max()) < 0.4  # L1 moves one coordinate
  assert len(np.unique(np.asarray(y))) >= 4
  return logits_fn, x, y, pairwise


def _mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


@functools.lru_cache(maxsize=None)
def digits_mlp():
  """A 64-32-10 MLP fitted (150 Adam steps) to the digits training split, and 64 test points.

  Returns:
    ``(logits_fn, x, y)``.
  """
  train = data.load("digits", "train")
  test = data.load("digits", "test")
  key = jax.random.PRNGKey(0)
  params = []
  for fan_in, fan_out in ((64, 32), (32, NUM_CLASSES)):
    key, sub = jax.random.split(key)
    params.append(
        (jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in), jnp.zeros(fan_out)))
  optimizer = optax.adam(1e-2)
  images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(_mlp_apply(p, images), labels).mean()

  @jax.jit
  def fit(params):

    def step(carry, _):
      params, state = carry
      updates, state = optimizer.update(jax.grad(loss)(params), state)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=150)
    return params

  params = fit(params)

  def logits_fn(x):
    return _mlp_apply(params, x)

  return logits_fn, jnp.asarray(test.images[:64]), jnp.asarray(test.labels[:64])


def accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x), axis=1) == y))


def trained_digits_mlp(tmp_path_factory) -> pathlib.Path:
  """The workdir of a digits MLP trained (standard training) for 300 steps by ``training.train``.

  Trained once per test session: under pytest-xdist the workers share one
  directory (beside their own temporary directories) and a lock, so the first
  worker trains and the others wait for it.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  workdir = base / "digits_mlp_300"
  with open(base / "digits_mlp_300.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "report.json").exists():
      subprocess.run([
          sys.executable, "-m", "training.train", "--config=training/configs/digits_mlp.py",
          f"--workdir={workdir}", "--config.num_steps=300", "--config.method=standard",
          "--config.robust.eps=0", "--config.robust.eval_eps=0"
      ],
                     cwd=REPO,
                     check=True,
                     capture_output=True)
  return workdir


def largest_intermediate(jaxpr) -> int:
  """The element count of the largest value a jaxpr (and its sub-jaxprs) creates."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          largest = max(largest, largest_intermediate(inner))
  return largest

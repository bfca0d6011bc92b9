"""Robust accuracy on a validation slice during training, to keep the best checkpoint.

Rice et al. 2020 ("Overfitting in adversarially robust deep learning"): the robust test
accuracy of PGD adversarial training peaks early and falls after (by several points on
CIFAR-10), so the checkpoint to keep is the one of best robust accuracy on data held out
of training. `split` holds the last examples of the training split out; `make_validate`
gives a function, compiled once per run, that measures clean, PGD and (for certified
methods) IBP accuracy on them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attacks
import verify
from robustlib import batching, compilation, data

# Methods whose selection metric is IBP accuracy (what they train for); others use PGD.
CERTIFIED = ("ibp", "crown_ibp", "fast_ibp")


def split(train: data.Dataset, num_examples: int) -> tuple[data.Dataset, data.Dataset | None]:
  """``(train without its last num_examples, those examples)``; ``(train, None)`` for 0."""
  if num_examples <= 0:
    return train, None
  if num_examples >= len(train):
    raise ValueError(f"validation.num_examples={num_examples} leaves nothing to train on "
                     f"(the training split has {len(train)} examples)")
  cut = len(train) - num_examples
  return (data.Dataset(train.images[:cut], train.labels[:cut],
                       train.info), data.Dataset(train.images[cut:], train.labels[cut:],
                                                 train.info))


def selection_metric(method: str, eps: float) -> str:
  """The validation metric the best checkpoint maximises: ``ibp_accuracy`` for certified
  methods, ``pgd_accuracy`` for others with a radius, else ``accuracy``."""
  if eps <= 0:
    return "accuracy"
  return "ibp_accuracy" if method in CERTIFIED else "pgd_accuracy"


def make_validate(apply_fn: Callable,
                  validation: data.Dataset,
                  *,
                  method: str,
                  eps: float,
                  pgd_steps: int,
                  batch_size: int,
                  key: jax.Array,
                  sharding: jax.sharding.Sharding | None = None) -> Callable[[dict], dict]:
  """``validate(variables) -> {"accuracy", ["pgd_accuracy", ["ibp_accuracy"]]}``.

  Args:
    apply_fn: ``apply_fn(variables, x) -> logits`` in inference mode.
    validation: the held-out examples.
    method: the training method (`selection_metric`).
    eps: the L-inf radius of PGD and IBP (0: clean accuracy only).
    pgd_steps: PGD steps (step size 2.5 eps / steps, one random start, a fixed key).
    batch_size: rows per call; the batch function compiles once.
    key: the PRNG key of PGD's start (the same at every evaluation).
    sharding: the batch sharding of the run's mesh.

  IBP accuracy counts the examples whose IBP margins are all positive: a training signal,
  without the rounding allowance of `verify.certify`'s guarantee.
  """
  attack = attacks.pgd(eps=eps, steps=pgd_steps) if eps > 0 else None
  certified = eps > 0 and method in CERTIFIED

  def batch(params, x, y):
    variables, k = params
    fn = lambda z: apply_fn(variables, z)
    out = {"accuracy": jnp.argmax(fn(x), -1) == y}
    if attack is not None:
      out["pgd_accuracy"] = jnp.argmax(fn(attack(fn, x, y, k)), -1) == y
    if certified:
      out["ibp_accuracy"] = jnp.all(verify.margin_bounds(fn, x, y, eps, method="ibp") > 0, axis=1)
    return out

  jitted = compilation.jit(batch)

  def validate(variables: dict) -> dict:
    flags = batching.batched_apply(jitted, (validation.images, validation.labels),
                                   batch_size=batch_size,
                                   params=(variables, key),
                                   sharding=sharding,
                                   desc="validation",
                                   progress=False)
    return {name: float(np.mean(v)) for name, v in flags.items()}

  return validate

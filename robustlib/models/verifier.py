"""A classifier with a learned verifier (Dvijotham et al. 2018, predictor-verifier training).

The verifier predicts, for each neuron of each ReLU layer and each specification row, the
slope and offset from which `verify.lagrangian_dual` builds the Lagrangian dual's
multipliers; one small network shared by every neuron, applied to `NUM_FEATURES`
features of it. Any prediction gives a valid bound, so the verifier's parameters only
decide how tight the certificate is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# The per-neuron features the verifier reads (`verify.lagrangian_dual` lists them).
NUM_FEATURES = 5


class DualVerifier(nn.Module):
  """``features [..., NUM_FEATURES] -> [..., 2]``: two ReLU layers of ``width`` and a
  zero-initialized output (at initialization the duals are CROWN's)."""
  width: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    h = nn.relu(nn.Dense(self.width)(features))
    h = nn.relu(nn.Dense(self.width)(h))
    return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)


class WithVerifier(nn.Module):
  """``predictor`` (parameters under ``predictor``) and a `DualVerifier` (under
  ``verifier``). Calling it gives the predictor's logits; `duals` the verifier's output.

  Attributes:
    predictor: the classifier.
    width: the verifier's hidden width.
  """
  predictor: nn.Module
  width: int

  def setup(self):
    self.verifier = DualVerifier(self.width)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The predictor's logits ``[N, K]`` (initialization also creates the verifier's
    parameters)."""
    logits = self.predictor(x, train=train)
    if self.is_initializing():
      self.verifier(jnp.zeros((1, NUM_FEATURES), jnp.float32))
    return logits

  def duals(self, features: jax.Array) -> jax.Array:
    """The verifier's prediction ``[..., 2]`` from ``features [..., NUM_FEATURES]``."""
    return self.verifier(features)

"""An ensemble of one architecture as one model: the mean of its members' logits.

Grefenstette et al. 2018 ("Strength in Numbers: Trading-off Robustness and Computation via
Adversarially-Trained Ensembles") train the members jointly against attacks on the
ensemble; as one Flax module the ensemble is one ``logits_fn`` for attacks and for bounds
(IBP and CROWN bound the mean of the members). The members are unrolled in the program
rather than vmapped: the bound interpreter needs the example axis first on every
operation, which a member axis in front would break.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class Ensemble(nn.Module):
  """``size`` independently initialized copies of ``member`` (parameters under
  ``member_0``, ``member_1``, ...); the output is the mean of their logits.

  Attributes:
    member: the unbound architecture of every member.
    size: the number of members, at least 1.
  """
  member: nn.Module
  size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Mean logits ``[N, K]`` of the members on ``x`` ``[N, ...]``."""
    logits = [
        self.member.clone(parent=self, name=f"member_{i}")(x, train=train) for i in range(self.size)
    ]
    return sum(logits[1:], logits[0]) / self.size  # no member axis: examples stay first

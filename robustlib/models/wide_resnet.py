"""Wide residual networks with pre-activation blocks.

Zagoruyko & Komodakis 2016, "Wide Residual Networks", in the form used for
adversarial robustness by Gowal et al. 2020, "Uncovering the Limits of
Adversarial Training against Norm-Bounded Adversarial Examples" (and the
RobustBench model zoo).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from robustlib.models import activations
from robustlib.models.geometry import SpatialLayer
from robustlib.models.normalize import Normalize
from robustlib.models.preact_block import (PreActHead, conv3x3, residual_spatial_layers,
                                           residual_stages)

STAGE_STRIDES = (1, 2, 2)


class WideResNet(nn.Module):
  """WRN-depth-width: stem conv3x3(16), stages 16k, 32k, 64k of n blocks.

  ``n = (depth - 4) / 6`` ``PreActBlock``s per stage with strides 1, 2, 2; the
  head is BN -> act -> global average pool -> Dense. WRN-28-10 on 10 classes
  has 36,479,194 parameters (plus BatchNorm statistics).

  Attributes:
    num_classes: number of logits.
    depth: ``6 n + 4`` for n >= 1 blocks per stage (10, 16, 22, 28, 34, 70...).
    width: the widening factor k.
    activation: ``"relu"`` or ``"swish"``.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.

  Raises:
    ValueError: on construction, if ``depth`` is not ``6 n + 4`` with n >= 1,
      ``width`` is not positive or the activation is unknown.

  Example:
    >>> model = WideResNet(10, depth=28, width=10, activation="swish")
  """

  num_classes: int
  depth: int = 28
  width: int = 10
  activation: str = "relu"
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6 n + 4 with n >= 1 blocks per stage "
                       f"(10, 16, 22, 28, 34, ...), got {self.depth}")
    if self.width < 1:
      raise ValueError(f"WideResNet width must be positive, got {self.width}")
    activations.activation(self.activation)
    super().__post_init__()

  @property
  def blocks_per_stage(self) -> int:
    return (self.depth - 4) // 6

  def spatial_layers(self) -> tuple[SpatialLayer, ...]:
    """The stem and block convolutions on the main path, in order."""
    return residual_spatial_layers(STAGE_STRIDES, self.blocks_per_stage)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: float ``[N, H, W, C]`` in [0, 1].
      train: batch statistics (and their update) in BatchNorm if True.

    Returns:
      logits ``[N, num_classes]``.
    """
    x = Normalize(self.mean, self.std)(x)
    x = conv3x3(16, name="stem")(x)
    widths = tuple(16 * self.width * 2**stage for stage in range(len(STAGE_STRIDES)))
    x = residual_stages(x, widths, STAGE_STRIDES, self.blocks_per_stage, self.activation, train)
    return PreActHead(self.num_classes, self.activation, name="head")(x, train)

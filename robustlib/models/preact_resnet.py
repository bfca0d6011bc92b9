"""PreActResNet-18 for CIFAR-sized images.

He et al. 2016, "Identity Mappings in Deep Residual Networks", in the CIFAR
form used by adversarial training work (e.g. Rice et al. 2020, "Overfitting in
adversarially robust deep learning"): a 3x3 stem and four stages of two
pre-activation blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from robustlib.models import activations
from robustlib.models.geometry import SpatialLayer
from robustlib.models.normalize import Normalize
from robustlib.models.preact_block import (PreActHead, conv3x3, residual_spatial_layers,
                                           residual_stages)

STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class PreActResNet18(nn.Module):
  """PreActResNet-18: stem conv3x3(width), stages width x (1, 2, 4, 8).

  Each stage has two ``PreActBlock``s; stage strides are 1, 2, 2, 2; the head
  is BN -> act -> global average pool -> Dense. With ``width=64`` and 10
  classes it has 11,172,170 parameters (plus BatchNorm statistics).

  Attributes:
    num_classes: number of logits.
    activation: ``"relu"`` or ``"swish"``.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.
    width: channels of the stem and first stage (64 in the paper).

  Example:
    >>> model = PreActResNet18(10, mean=CIFAR_MEAN, std=CIFAR_STD)
    >>> logits, updates = model.apply(variables, x, train=True,
    ...                               mutable=["batch_stats"])
  """

  num_classes: int
  activation: str = "relu"
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  width: int = 64

  def __post_init__(self):
    activations.activation(self.activation)
    if self.width < 1:
      raise ValueError(f"width must be positive, got {self.width}")
    super().__post_init__()

  def spatial_layers(self) -> tuple[SpatialLayer, ...]:
    """The stem and block convolutions on the main path, in order."""
    return residual_spatial_layers(STAGE_STRIDES, BLOCKS_PER_STAGE)

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
    x = conv3x3(self.width, name="stem")(x)
    widths = tuple(self.width * 2**stage for stage in range(len(STAGE_STRIDES)))
    x = residual_stages(x, widths, STAGE_STRIDES, BLOCKS_PER_STAGE, self.activation, train)
    return PreActHead(self.num_classes, self.activation, name="head")(x, train)

"""The convolutional networks of interval bound propagation training.

``CNNSmall``, ``CNNMedium`` and ``CNNLarge`` are the small, medium and large
models of Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models". ``CNN7`` is ``CNNLarge``
with batch normalization after every convolution and the hidden dense layer,
as in Shi et al. 2021, "Fast Certified Robust Training with Short Warmup".

Each architecture is data: a tuple of ``ConvSpec``s and the hidden dense
widths, read both by the forward pass and by the spatial arithmetic that gives
the smallest accepted image.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax

from robustlib.models.geometry import SpatialLayer
from robustlib.models.normalize import Normalize


class ConvSpec(NamedTuple):
  """One square convolution: ``features`` maps of ``kernel x kernel``."""

  features: int
  kernel: int
  stride: int
  padding: str

  def spatial(self) -> SpatialLayer:
    return SpatialLayer(self.kernel, self.stride, self.padding)


class _IBPConvNet(nn.Module):
  """Convolutions, flatten (NHWC order), hidden dense layers, logits; ReLU."""

  num_classes: int
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  convs: ClassVar[tuple[ConvSpec, ...]] = ()
  dense: ClassVar[tuple[int, ...]] = ()
  batch_norm: ClassVar[bool] = False

  def spatial_layers(self) -> tuple[SpatialLayer, ...]:
    """The convolutions' windows, in order."""
    return tuple(spec.spatial() for spec in self.convs)

  def _norm_act(self, x: jax.Array, train: bool) -> jax.Array:
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)

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
    for spec in self.convs:
      x = nn.Conv(spec.features, (spec.kernel, spec.kernel),
                  strides=(spec.stride, spec.stride),
                  padding=spec.padding)(x)
      x = self._norm_act(x, train)
    x = x.reshape(x.shape[0], -1)
    for width in self.dense:
      x = self._norm_act(nn.Dense(width)(x), train)
    return nn.Dense(self.num_classes)(x)


class CNNSmall(_IBPConvNet):
  """The small IBP model (Gowal et al. 2018).

  conv 4x4x16 VALID stride 2, conv 4x4x32 VALID stride 1, FC100, FC(classes),
  ReLU. On 28x28x1: 13x13x16, 10x10x32, 3200 features. Needs images of at
  least 10x10.

  Attributes:
    num_classes: number of logits.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.

  Example:
    >>> logits = CNNSmall(10).apply(variables, x)  # x: [N, 28, 28, 1]
  """

  convs = (ConvSpec(16, 4, 2, "VALID"), ConvSpec(32, 4, 1, "VALID"))
  dense = (100,)


class CNNMedium(_IBPConvNet):
  """The medium IBP model (Gowal et al. 2018).

  conv 3x3x32 VALID s1, conv 4x4x32 VALID s2, conv 3x3x64 VALID s1,
  conv 4x4x64 VALID s2, FC512, FC512, FC(classes), ReLU. On 28x28x1 the maps
  are 26, 12, 10 and 4 pixels wide (1024 features). Needs at least 16x16.

  Attributes:
    num_classes: number of logits.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.
  """

  convs = (ConvSpec(32, 3, 1, "VALID"), ConvSpec(32, 4, 2, "VALID"), ConvSpec(64, 3, 1, "VALID"),
           ConvSpec(64, 4, 2, "VALID"))
  dense = (512, 512)


class CNNLarge(_IBPConvNet):
  """The large IBP model (Gowal et al. 2018).

  conv 3x3x64 SAME s1 (x2), conv 3x3x128 SAME s2, conv 3x3x128 SAME s1 (x2),
  FC512, FC(classes), ReLU. On 28x28x1: 14x14x128, 25088 features.

  Attributes:
    num_classes: number of logits.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.
  """

  convs = (ConvSpec(64, 3, 1, "SAME"), ConvSpec(64, 3, 1, "SAME"), ConvSpec(128, 3, 2, "SAME"),
           ConvSpec(128, 3, 1, "SAME"), ConvSpec(128, 3, 1, "SAME"))
  dense = (512,)


class CNN7(CNNLarge):
  """``CNNLarge`` with BatchNorm then ReLU after each conv and after FC512.

  The 7-layer CNN of Shi et al. 2021, "Fast Certified Robust Training with
  Short Warmup". BatchNorm uses momentum 0.9 and epsilon 1e-5; ``train=True``
  needs ``mutable=["batch_stats"]``.

  Attributes:
    num_classes: number of logits.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.
  """

  batch_norm = True

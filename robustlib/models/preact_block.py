"""The pre-activation residual block and classification head.

From He et al. 2016, "Identity Mappings in Deep Residual Networks": BatchNorm
and the activation come before each convolution, and the residual path adds
onto an identity (or, when the shape changes, a 1x1 convolution of the
pre-activated input).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from robustlib.models import activations
from robustlib.models.geometry import SpatialLayer

# He et al. 2015 initialization, as in the reference CIFAR ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with momentum 0.9 and epsilon 1e-5; running averages in eval."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv3x3(features: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  """A 3x3 convolution without bias, padded by 1 pixel on each side."""
  return nn.Conv(features, (3, 3),
                 strides=(stride, stride),
                 padding=((1, 1), (1, 1)),
                 use_bias=False,
                 kernel_init=conv_init,
                 name=name)


class PreActBlock(nn.Module):
  """``BN -> act -> conv3x3(stride) -> BN -> act -> conv3x3`` plus shortcut.

  Attributes:
    features: output channels.
    stride: stride of the first convolution and of the shortcut.
    activation: activation name, see ``activations.activation``.
  """

  features: int
  stride: int = 1
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, H, W, C]`` to ``[N, ceil(H/stride), ceil(W/stride), features]``."""
    act = activations.activation(self.activation)
    out = act(batch_norm(train, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1),
                         strides=(self.stride, self.stride),
                         use_bias=False,
                         kernel_init=conv_init,
                         name="shortcut")(out)
    else:
      shortcut = x
    out = conv3x3(self.features, self.stride, "conv1")(out)
    out = conv3x3(self.features, 1, "conv2")(act(batch_norm(train, "bn2")(out)))
    return out + shortcut


class PreActHead(nn.Module):
  """``BN -> act -> global average pool -> Dense(num_classes)``.

  Attributes:
    num_classes: number of logits.
    activation: activation name, see ``activations.activation``.
  """

  num_classes: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, H, W, C]`` to logits ``[N, num_classes]``."""
    act = activations.activation(self.activation)
    x = act(batch_norm(train, "bn")(x))
    return nn.Dense(self.num_classes, name="dense")(jnp.mean(x, axis=(1, 2)))


def residual_spatial_layers(strides: tuple[int, ...],
                            blocks_per_stage: int) -> tuple[SpatialLayer, ...]:
  """The stem and block 3x3 convolutions on a residual network's main path."""
  layers = [SpatialLayer(3, 1, 1)]
  for stride in strides:
    for block in range(blocks_per_stage):
      layers += [SpatialLayer(3, stride if block == 0 else 1, 1), SpatialLayer(3, 1, 1)]
  return tuple(layers)


def residual_stages(x: jax.Array, widths: tuple[int, ...], strides: tuple[int, ...],
                    blocks_per_stage: int, activation: str, train: bool) -> jax.Array:
  """Stages of pre-activation blocks; call inside a parent's ``nn.compact`` method.

  Stage ``i`` has ``blocks_per_stage`` blocks of ``widths[i]`` channels; its first
  block has stride ``strides[i]``.
  """
  for width, stride in zip(widths, strides):
    for block in range(blocks_per_stage):
      x = PreActBlock(width, stride if block == 0 else 1, activation)(x, train)
  return x

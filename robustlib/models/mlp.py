"""A fully connected classifier."""

from __future__ import annotations

import flax.linen as nn
import jax

from robustlib.models import activations
from robustlib.models.geometry import SpatialLayer
from robustlib.models.normalize import Normalize


class MLP(nn.Module):
  """Flatten, then ``Dense + activation`` per hidden width, then ``Dense``.

  Attributes:
    num_classes: number of logits.
    hidden: widths of the hidden layers.
    activation: activation name, see ``activations.activation``.
    mean: per-channel input mean (one value or one per channel).
    std: per-channel input standard deviation.

  Example:
    >>> model = MLP(num_classes=10, hidden=(128,))
    >>> variables = model.init(key, jnp.zeros((1, 28, 28, 1)))
  """

  num_classes: int
  hidden: tuple[int, ...] = (256, 256)
  activation: str = "relu"
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    activations.activation(self.activation)
    super().__post_init__()

  def spatial_layers(self) -> tuple[SpatialLayer, ...]:
    """No spatial layers: any image size is accepted."""
    return ()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: float ``[N, H, W, C]`` in [0, 1].
      train: unused; present for a uniform model signature.

    Returns:
      logits ``[N, num_classes]``.
    """
    del train
    act = activations.activation(self.activation)
    x = Normalize(self.mean, self.std)(x)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = act(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)

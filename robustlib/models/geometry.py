"""Spatial arithmetic of convolution stacks: output sizes and minimum inputs.

A model describes the layers on its main spatial path as ``SpatialLayer``s;
from them follow the feature-map sizes and the smallest image it accepts.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

Padding = Union[str, int]


class SpatialLayer(NamedTuple):
  """A square convolution or pooling window along one spatial axis.

  Attributes:
    kernel: window size.
    stride: step between windows.
    padding: ``"SAME"``, ``"VALID"`` or a symmetric pad in pixels.
  """

  kernel: int
  stride: int = 1
  padding: Padding = "VALID"


def _pad(layer: SpatialLayer) -> int:
  if layer.padding == "VALID":
    return 0
  if isinstance(layer.padding, int):
    return layer.padding
  raise ValueError(f"padding must be 'SAME', 'VALID' or an int, got {layer.padding!r}")


def output_size(size: int, layers: Sequence[SpatialLayer]) -> int:
  """The length of one spatial axis after ``layers``; 0 if it vanishes.

  Args:
    size: the input length along the axis.
    layers: the layers applied in order.

  Example:
    >>> output_size(28, [SpatialLayer(4, 2), SpatialLayer(4, 1)])  # 10
  """
  for layer in layers:
    if size < 1:
      return 0
    if layer.padding == "SAME":
      size = -(-size // layer.stride)
    else:
      padded = size + 2 * _pad(layer)
      size = (padded - layer.kernel) // layer.stride + 1 if padded >= layer.kernel else 0
  return max(size, 0)


def min_input_size(layers: Sequence[SpatialLayer]) -> int:
  """The smallest input length for which every layer has a nonempty output.

  Walks back from an output of length 1: a layer whose output must have
  length ``o`` needs an input of at least ``(o - 1) * stride + kernel - 2 * pad``
  (``(o - 1) * stride + 1`` for SAME padding), and never less than 1.

  Example:
    >>> min_input_size([SpatialLayer(4, 2), SpatialLayer(4, 1)])  # 10
  """
  size = 1
  for layer in reversed(tuple(layers)):
    if layer.padding == "SAME":
      size = (size - 1) * layer.stride + 1
    else:
      size = max((size - 1) * layer.stride + layer.kernel - 2 * _pad(layer), 1)
  return size

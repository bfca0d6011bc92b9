"""Activation functions looked up by name."""

from __future__ import annotations

import types
from typing import Callable

import flax.linen as nn
import jax

ACTIVATIONS: types.MappingProxyType[str, Callable[[jax.Array],
                                                  jax.Array]] = (types.MappingProxyType({
                                                      "relu": nn.relu,
                                                      "swish": nn.swish,
                                                      "silu": nn.silu,
                                                  }))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the elementwise activation called ``name``.

  Args:
    name: one of ``relu``, ``swish`` or ``silu`` (swish and silu are
      ``x * sigmoid(x)``, Ramachandran et al. 2017).

  Raises:
    ValueError: naming the valid activations, if ``name`` is unknown.

  Example:
    >>> activation("relu")(jnp.array([-1.0, 2.0]))  # [0., 2.]
  """
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; valid names: {sorted(ACTIVATIONS)}") from None

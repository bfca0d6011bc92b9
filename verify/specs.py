"""Specifications: linear functions of the logits whose bounds are wanted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from robustlib.checks import InputError
from robustlib.checks import check_labels


def margin_spec(y: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
  """Margin specification ``C`` with rows ``e_y - e_j`` for every class ``j != y``.

  ``C @ logits`` holds the margins ``z_y - z_j``; an input is verified robust when
  the lower bound of every margin is positive. Works on traced labels.

  Args:
    y: integer labels ``[N]``.
    num_classes: ``K >= 2``.

  Returns:
    ``[N, K - 1, K]`` float32, row ``r`` of example ``i`` for the ``r``-th class
    ``j != y_i`` in increasing order.

  Example:
    >>> margin_spec(jnp.array([1]), 3)  # [[[-1, 1, 0], [0, 1, -1]]]
  """
  if int(num_classes) < 2:
    raise InputError(f"num_classes must be >= 2, got {num_classes}")
  if not isinstance(y, jax.core.Tracer):
    check_labels(np.asarray(y), num_classes=num_classes)
  y = jnp.asarray(y)
  r = jnp.arange(num_classes - 1)
  others = jnp.where(r[None, :] < y[:, None], r[None, :], r[None, :] + 1)  # [N, K-1]
  eye = jnp.eye(num_classes, dtype=jnp.float32)
  return eye[y][:, None, :] - eye[others]

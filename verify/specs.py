"""Specifications: linear functions of the logits whose bounds are wanted."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from robustlib.checks import InputError
from robustlib.checks import check_labels


def margin_spec(y: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
  """Margin specification ``C`` with rows ``e_y - e_j`` for every class ``j != y``.

  ``C @ logits`` holds the margins ``z_y - z_j``; an input is verified robust when
  the lower bound of every margin is positive. Works on traced labels: their
  rank and dtype are checked at trace time, their values only when concrete.

  Args:
    y: integer labels ``[N]``.
    num_classes: ``K >= 2``.

  Returns:
    ``[N, K - 1, K]`` float32, row ``r`` of example ``i`` for the ``r``-th class
    ``j != y_i`` in increasing order.

  Raises:
    InputError: for ``num_classes`` < 2, or ``y`` not an integer vector ``[N]``
      (under ``jax.jit`` too), or concrete labels outside ``[0, num_classes)``.

  Example:
    >>> margin_spec(jnp.array([1]), 3)  # [[[-1, 1, 0], [0, 1, -1]]]
  """
  try:
    num_classes = operator.index(num_classes)
  except TypeError:
    raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}") from None
  if num_classes < 2:
    raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  # Rank, dtype and length always (traced labels too); the values where concrete.
  check_labels(y, num_classes=num_classes, name="y")
  y = jnp.asarray(y)
  r = jnp.arange(num_classes - 1)
  others = jnp.where(r[None, :] < y[:, None], r[None, :], r[None, :] + 1)  # [N, K-1]
  eye = jnp.eye(num_classes, dtype=jnp.float32)
  return eye[y][:, None, :] - eye[others]

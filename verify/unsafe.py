"""Unsafe sets of outputs: unions of polytopes ``{y : C_p y <= d_p}``.

A property over an input box says which outputs are unsafe (VNN-COMP's
convention): an input is a counterexample when its output lies in one of the
polytopes. The rows of all polytopes are stacked into one specification ``C``
``[S, K]`` with offsets ``d`` ``[S]`` and a membership mask ``[P, S]``, so that
one bound computation of ``C @ f(x)`` serves every polytope at once.

A polytope is avoided when one of its rows is violated, ``C_s y > d_s``; the
safety of an output is therefore

  ``safety(y) = min_p max_{s in p} (C_s y - d_s)``,

positive for a safe output, at most 0 inside the unsafe set. Lower bounds on
the rows over a box give a lower bound on the safety of every point of it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustlib.checks import InputError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnsafeSet:
  """The union of ``P`` polytopes, as stacked rows.

  Attributes:
    C: ``[S, K]`` rows of every polytope.
    d: ``[S]`` offsets.
    member: ``[P, S]`` bool, row ``s`` belongs to polytope ``p``. A polytope
      without rows contains every output.
  """
  C: jax.Array
  d: jax.Array
  member: jax.Array

  @classmethod
  def of(cls,
         polytopes: Sequence[tuple[np.ndarray, np.ndarray]],
         num_outputs: int,
         dtype: np.dtype = np.float32) -> UnsafeSet:
    """Stacks polytopes ``(C_p [m_p, K], d_p [m_p])``, at least one, in ``dtype`` (the bounds'
    dtype; the rows' and offsets' rounding to it is allowed for where they are used: the
    rows' by `verify.rounding`'s allowance, the offsets' by ``2 u |d|``)."""
    if not polytopes:
      raise InputError("an unsafe set needs at least one polytope")
    rows, offsets, owner = [], [], []
    for p, (c, d) in enumerate(polytopes):
      c, d = np.asarray(c, np.float64).reshape(-1, num_outputs), np.asarray(d, np.float64)
      if d.shape != (c.shape[0],):
        raise InputError(f"polytope {p}: C has {c.shape[0]} rows but d has shape {d.shape}")
      rows.append(c)
      offsets.append(d)
      owner += [p] * c.shape[0]
    member = np.arange(len(polytopes))[:, None] == np.asarray(owner, np.int64)[None, :]
    return cls(jnp.asarray(np.concatenate(rows), dtype), jnp.asarray(np.concatenate(offsets),
                                                                     dtype), jnp.asarray(member))

  @classmethod
  def misclassified(cls, label: int, num_classes: int) -> UnsafeSet:
    """Outputs where some class ``t != label`` scores at least ``label``'s: ``y_label - y_t <= 0``."""
    if not 0 <= label < num_classes or num_classes < 2:
      raise InputError(f"label must be in [0, {num_classes}) with at least 2 classes, got {label}")
    eye = np.eye(num_classes)
    return cls.of([(eye[label] - eye[t], np.zeros(1)) for t in range(num_classes) if t != label],
                  num_classes)

  @property
  def num_polytopes(self) -> int:
    return self.member.shape[0]

  def _per_polytope(self, rows: jax.Array) -> jax.Array:
    """``[N, S]`` row values minus offsets -> ``[N, P]`` max over each polytope's rows."""
    v = jnp.where(self.member[None], (rows - self.d)[:, None, :], -jnp.inf)
    return jnp.max(v, axis=-1, initial=-jnp.inf)

  def distance(self, y: jax.Array) -> jax.Array:
    """``[N, K]`` outputs -> ``[N, P]``: ``max_s (C_s y - d_s)`` per polytope, <= 0 inside it."""
    return self._per_polytope(y @ self.C.T)

  def safety(self, y: jax.Array) -> jax.Array:
    """``[N, K]`` outputs -> ``[N]``: > 0 when safe, <= 0 inside the unsafe set."""
    return jnp.min(self.distance(y), axis=-1)

  def proven(self, row_lower: jax.Array) -> jax.Array:
    """Lower bound ``[N]`` on the safety over a box from lower bounds ``[N, S]`` of ``C @ y``.

    Positive means no point of the box is a counterexample.
    """
    return jnp.min(self._per_polytope(row_lower), axis=-1)

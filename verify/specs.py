"""Specifications: what a bound must prove. Margins (linear functions of the logits), and
any function of the input and output the interpreter bounds (`Specification`)."""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------------------------
# Specifications beyond margins (Qin et al. 2019, "Verification of non-linear specifications
# for neural networks"): any function of the input and the output that the interpreter bounds.


@dataclasses.dataclass(frozen=True)
class Specification:
  """A property of a network on a box: ``rows(x, fn(x)) > 0`` at every point of it.

  Attributes:
    rows: ``(x [N, ...], out [N, K]) -> [N, S]``, made of primitives the interpreter
      bounds (`verify.SUPPORTED_PRIMITIVES`: softmax, log, exp, products, squares...);
      row ``s`` of example ``n`` is positive where the property holds. Each example's
      rows must depend on that example alone (no reordering or mixing of the batch).
    name: what it says, for messages and tables.
    outputs: the number of outputs ``K`` the rows are written for (None: any);
      `verify.spec_bounds` refuses a network with another.
  """
  rows: Callable[[jax.Array, jax.Array], jax.Array]
  name: str
  outputs: int | None = None

  def of(self, fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """The function whose lower bounds prove it: ``x -> rows(x, fn(x))`` ``[N, S]``."""
    return lambda x: self.rows(x, fn(x))


def _classes(classes: Sequence[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  try:
    num_classes = operator.index(num_classes)
    chosen = sorted({operator.index(c) for c in classes})
  except TypeError:
    raise InputError(f"classes must be integers and num_classes an integer, got {classes!r} "
                     f"and {num_classes!r}") from None
  if not chosen or len(chosen) >= num_classes or chosen[0] < 0 or chosen[-1] >= num_classes:
    raise InputError(f"classes must be a non-empty proper subset of range({num_classes}), got "
                     f"{list(classes)}")
  rest = [k for k in range(num_classes) if k not in chosen]
  return np.asarray(chosen), np.asarray(rest)


def probability_mass(classes: Sequence[int], num_classes: int, threshold: float) -> Specification:
  """A semantic specification: the softmax puts more than ``threshold`` of its mass on
  ``classes`` (e.g. "a vehicle is never taken for an animal").

  Bounded as ``logsumexp(z[classes]) - logsumexp(z[rest]) > log(t / (1 - t))``, the same
  property written as a difference of two convex functions, whose relaxations are far
  tighter than a softmax's quotient.
  """
  chosen, rest = _classes(classes, num_classes)
  t = float(threshold)
  if not 0.0 < t < 1.0:
    raise InputError(f"threshold must be a probability in (0, 1), got {threshold!r}")
  offset = float(np.log(t) - np.log1p(-t))

  def rows(x, out):
    del x
    return (_logsumexp(out[:, chosen]) - _logsumexp(out[:, rest]) - offset)[:, None]

  return Specification(rows, f"P(classes {chosen.tolist()}) > {t:g}", int(num_classes))


def _logsumexp(z: jax.Array) -> jax.Array:
  """``log(sum(exp(z)))`` over the last axis, shifted by its maximum: ``jax.nn.logsumexp``
  without its guard for infinite maxima, a selection on the input whose rounding error the
  allowance would take as the logits' whole range."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  return m + jnp.log(jnp.sum(jnp.exp(z - m[..., None]), axis=-1))


def _frozen(values, dtype) -> np.ndarray:
  """A read-only copy: a spec is a compiled program's static argument, so its arrays never
  change after it is made."""
  out = np.array(values, dtype, copy=True)
  out.setflags(write=False)
  return out


def output_box(lower: jax.typing.ArrayLike, upper: jax.typing.ArrayLike) -> Specification:
  """An output-set specification (regression): every output stays in ``(lower, upper)``
  (``[K]`` each; ``-inf``/``inf`` for an unbounded side). Rows ``[out - lower, upper - out]``
  for the finite sides."""
  lower, upper = _frozen(lower, np.float64), _frozen(upper, np.float64)
  if lower.ndim != 1 or lower.shape != upper.shape or not np.all(lower < upper):
    raise InputError(f"lower and upper must be vectors [K] with lower < upper, got {lower} and "
                     f"{upper}")
  low, high = np.flatnonzero(np.isfinite(lower)), np.flatnonzero(np.isfinite(upper))
  if not low.size + high.size:
    raise InputError("an output box with no finite side holds everywhere: nothing to verify")

  def rows(x, out):
    del x
    return jnp.concatenate(
        [out[:, low] - lower[low].astype(out.dtype), upper[high].astype(out.dtype) - out[:, high]],
        axis=1)

  return Specification(rows, f"output in [{lower.tolist()}, {upper.tolist()}]", lower.size)


def halfspaces(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> Specification:
  """An output-set specification: ``a @ out < b`` (``a [S, K]``, ``b [S]``), the output
  inside a polytope. Rows ``b - a @ out``."""
  a, b = _frozen(a, np.float32), _frozen(b, np.float32)
  if a.ndim != 2 or b.shape != (a.shape[0],) or not a.size:
    raise InputError(f"a must be [S, K] and b [S] with S, K >= 1, got shapes {a.shape} and "
                     f"{b.shape}")

  def rows(x, out):
    del x
    return b.astype(out.dtype) - out @ a.T.astype(out.dtype)

  return Specification(rows, f"{a.shape[0]} half-spaces", a.shape[1])


def conserves(quantity: Callable[[jax.Array], jax.Array], tolerance: float) -> Specification:
  """A conservation specification of a dynamics model ``state -> next state``: the
  ``quantity`` (``[N, D] -> [N]``, e.g. a pendulum's energy) of the predicted state stays
  within ``tolerance`` of the input state's. Rows ``tol -+ (q(out) - q(x))``."""
  tol = float(tolerance)
  if not tol > 0:
    raise InputError(f"tolerance must be > 0, got {tolerance!r}")

  def rows(x, out):
    if x.shape != out.shape:
      raise InputError(f"conserves compares a state with the model's next state: the input "
                       f"has shape {x.shape}, the output {out.shape}")
    change = quantity(out) - quantity(x)
    return jnp.stack([tol - change, tol + change], axis=1)

  return Specification(rows, f"conserved to within {tol:g}")

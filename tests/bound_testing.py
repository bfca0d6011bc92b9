"""Helpers for specifications of bound propagation: points of an input box, soundness checks."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import verify


def spec_outputs(fn: Callable, spec=None) -> Callable:
  """``x -> spec @ fn(x)`` (``[N, S]``), or ``fn`` itself without a spec."""
  if spec is None:
    return fn
  spec = jnp.asarray(spec)
  return lambda x: jnp.einsum("nsk,nk->ns", spec, fn(x))


def box_points(box: verify.Interval, fn: Callable | None = None, num: int = 32, seed: int = 0):
  """Points of ``box`` as ``[P, N, ...]``: random points, random corners and, given ``fn``
  (``[N, ...] -> [N, S]``), for every output the two corners its gradient at the center points to.
  """
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  t = rng.uniform(0, 1, (num,) + lo.shape).astype(lo.dtype)
  t[:num // 2] = np.round(t[:num // 2])  # corners
  points = [lo + t * (hi - lo)]
  if fn is not None:
    jac = jax.jit(jax.jacrev(lambda x: jnp.sum(fn(x), axis=0)))(box.center)  # [S, N, ...]
    up = np.asarray(jac) > 0
    points += [np.where(up, hi, lo), np.where(up, lo, hi)]
  return np.concatenate(points).astype(lo.dtype)


def outputs_at(fn: Callable, points: np.ndarray) -> np.ndarray:
  """``fn`` at points ``[P, N, ...]`` (batch-first functions take all P * N rows at once)."""
  p, n = points.shape[:2]
  out = np.asarray(jax.jit(fn)(points.reshape((p * n,) + points.shape[2:])))
  return out.reshape((p, n) + out.shape[1:])


def assert_sound(fn: Callable,
                 box: verify.Interval,
                 lower=None,
                 upper=None,
                 spec=None,
                 points: np.ndarray | None = None,
                 rtol: float = 1e-5,
                 atol: float = 1e-5) -> None:
  """Every point of the box maps inside ``[lower, upper]`` (either may be None).

  Points are those of `box_points` (with the gradient corners of ``spec @ fn``)
  unless given. The tolerance ``atol + rtol * |value|`` absorbs float32 rounding.
  """
  if points is None:
    points = box_points(box, spec_outputs(fn, spec))
  values = outputs_at(fn, points)
  if spec is not None:
    values = np.einsum("nsk,pnk->pns", np.asarray(spec), values)
  tol = atol + rtol * np.abs(values)
  if lower is not None:
    gap = values - np.asarray(lower)[None]
    assert np.all(gap >= -tol), f"a point falls below the lower bound by {-gap.min():.3g}"
  if upper is not None:
    gap = np.asarray(upper)[None] - values
    assert np.all(gap >= -tol), f"a point rises above the upper bound by {-gap.min():.3g}"


def relu_mlp(seed: int = 0, sizes=(6, 16, 16, 4)):
  """A random ReLU MLP ``[N, sizes[0]] -> [N, sizes[-1]]`` and its ``[(W, b), ...]``."""
  rng = np.random.default_rng(seed)
  params = [(jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a),
                         jnp.float32), jnp.asarray(rng.normal(size=b) * 0.3, jnp.float32))
            for a, b in zip(sizes[:-1], sizes[1:])]

  def fn(x):
    for w, b in params[:-1]:
      x = jax.nn.relu(x @ w + b)
    return x @ params[-1][0] + params[-1][1]

  return fn, params

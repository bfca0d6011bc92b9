"""Certified robustness of a classifier on L-inf balls."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib.checks import InputError
from robustlib.checks import check_labels
from verify.alpha_crown import alpha_crown
from verify.crown import lower_bounds
from verify.interval import linf_ball
from verify.specs import margin_spec

METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")


def margin_bounds(logits_fn: Callable,
                  x: jax.typing.ArrayLike,
                  y: jax.typing.ArrayLike,
                  eps: jax.typing.ArrayLike,
                  method: str = "ibp",
                  bounds: tuple[float, float] | None = (0.0, 1.0),
                  chunk_size: int | None = None,
                  alpha_steps: int = 20,
                  alpha_lr: float = 0.1) -> jax.Array:
  """Lower bounds on the margins ``z_y - z_j`` over the L-inf ball (jittable, differentiable).

  The margin specification is part of the bounded function, as auto_LiRPA does
  with ``C``: for IBP it is folded into the last linear layer; for the backward
  methods it is the starting point of the backward pass.

  Args:
    logits_fn: ``logits_fn(x) -> [N, K]``.
    x: inputs ``[N, ...]``.
    y: integer labels ``[N]``.
    eps: radius, a scalar or ``[N]``.
    method: one of ``"ibp"``, ``"crown_ibp"``, ``"crown"``, ``"alpha_crown"``.
    bounds: the valid input box, or None.
    chunk_size: rows per backward pass (see `verify.crown`).
    alpha_steps: Adam steps of alpha-CROWN.
    alpha_lr: its learning rate.

  Returns:
    ``[N, K - 1]`` lower bounds, row order as `margin_spec`. Certified training
    uses e.g. ``softplus(-margin_bounds(...))`` as a robust loss.
  """
  if method not in METHODS:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  x = jnp.asarray(x)
  box = linf_ball(x, eps, bounds)
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
    raise InputError(f"logits_fn must map [N, ...] to [N, K], got {out.shape} for {x.shape}")
  spec = margin_spec(y, out.shape[1])
  if method == "alpha_crown":
    return alpha_crown(logits_fn,
                       box,
                       spec,
                       steps=alpha_steps,
                       lr=alpha_lr,
                       chunk_size=chunk_size,
                       lower_only=True)
  return lower_bounds(logits_fn, box, spec, method, chunk_size)


@compilation.jit(static_argnames=("logits_fn", "method", "bounds", "chunk_size"))
def _certify_jit(logits_fn, x, y, eps, method, bounds, chunk_size):
  lower = margin_bounds(logits_fn, x, y, eps, method, bounds, chunk_size)
  if method != "ibp":  # both are sound: keep the tighter bound of each margin
    lower = jnp.maximum(lower, margin_bounds(logits_fn, x, y, eps, "ibp", bounds, chunk_size))
  return jnp.all(lower > 0, axis=1)


def certify(logits_fn: Callable,
            x: jax.typing.ArrayLike,
            y: jax.typing.ArrayLike,
            eps: jax.typing.ArrayLike,
            method: str = "ibp",
            bounds: tuple[float, float] | None = (0.0, 1.0),
            chunk_size: int | None = None) -> jax.Array:
  """Which examples are verified robust: every margin's lower bound is > 0.

  With a linear method (CROWN-IBP, CROWN, alpha-CROWN) each margin's bound is
  the tighter of that method's and IBP's, so a method never certifies fewer
  points than IBP (CROWN can be looser than IBP, e.g. on IBP-trained networks).

  Compiled once per ``(logits_fn, method, shapes)``; pass the same function
  object across batches to reuse the compilation.

  Args:
    logits_fn: ``logits_fn(x) -> [N, K]``, a pure function (eval mode).
    x: inputs ``[N, ...]`` inside ``bounds``.
    y: integer labels ``[N]``.
    eps: L-inf radius >= 0, a scalar or ``[N]``.
    method: ``"ibp"``, ``"crown_ibp"``, ``"crown"`` or ``"alpha_crown"``.
    bounds: the valid input box, or None.
    chunk_size: rows per backward pass (see `verify.crown`).

  Returns:
    bool ``[N]``: True where the prediction is provably constant on the ball.

  Example:
    >>> verified = verify.certify(logits_fn, x, y, 0.1, method="crown_ibp")
  """
  if method not in METHODS:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  x_np = np.asarray(x)
  if x_np.ndim < 1:
    raise InputError(f"x must have a leading batch axis, got shape {x_np.shape}")
  check_labels(y, num_examples=x_np.shape[0])
  eps_np = np.asarray(eps)
  if np.any(np.isnan(eps_np)) or np.any(eps_np < 0):
    raise InputError(f"eps must be >= 0, got {eps_np}")
  bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
  return _certify_jit(logits_fn, jnp.asarray(x), jnp.asarray(y), jnp.asarray(eps, jnp.float32),
                      method, bounds, chunk_size)

"""Certified robustness of a classifier on L-inf balls."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from robustlib import compilation
from robustlib.checks import InputError
from robustlib.checks import check_bounds
from robustlib.checks import check_eps
from robustlib.checks import check_images
from robustlib.checks import check_labels
from robustlib.checks import check_logits_shape
from verify import rounding
from verify.alpha_crown import alpha_crown
from verify.crown import lower_bounds
from verify.sdp_fo import sdp_fo
from verify.interval import Interval, linf_ball, round_up
from verify.specs import Specification, margin_spec

METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")
CERTIFY_METHODS = METHODS + ("sdp_fo",)


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

  Raises:
    InputError: for an unknown method, or inputs `certify` rejects. Shapes and
      dtypes are checked at trace time; values (NaN, the box, the labels' range,
      the sign of eps) only where they are concrete, not traced.
  """
  if method not in METHODS:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  check_bounds(bounds)
  check_images(x, bounds=bounds, name="x")
  x = jnp.asarray(x)
  check_eps(eps, num_examples=x.shape[0])
  box = linf_ball(x, eps, bounds)
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  num_classes = check_logits_shape(out, x.shape[0], what="a margin specification")
  check_labels(y, num_examples=x.shape[0], num_classes=num_classes, name="y")
  spec = margin_spec(y, num_classes)
  return _lower(logits_fn, box, spec, method, chunk_size, alpha_steps, alpha_lr)


def _lower(fn, box, spec, method, chunk_size, alpha_steps, alpha_lr) -> jax.Array:
  """``[N, S]`` lower bounds of ``spec @ fn(x)`` over ``box`` by ``method``."""
  if method == "alpha_crown":
    return alpha_crown(fn,
                       box,
                       spec,
                       steps=alpha_steps,
                       lr=alpha_lr,
                       chunk_size=chunk_size,
                       lower_only=True)
  return lower_bounds(fn, box, spec, method, chunk_size)


def _proven(fn, box, spec, method, lower, ibp_lower) -> jax.Array:
  """bool ``[N, S]``: each row's lower bound (``method``'s, and IBP's) exceeds its pass's
  rounding allowance."""
  allow = rounding.allowance(fn, box, spec)
  if method == "ibp":
    return lower - allow > 0
  # Both are sound: each row is proven by the tighter, less its own pass's allowance.
  ibp = ibp_lower - allow
  if method in rounding.BACKWARD_PASSES:
    allow = rounding.allowance(fn, box, spec, "crown", errors="backward")
  return jnp.maximum(lower - allow, ibp) > 0


@compilation.jit(static_argnames=("logits_fn", "method", "bounds", "chunk_size"))
def _certify_jit(logits_fn, x, y, eps, method, bounds, chunk_size):
  lower = margin_bounds(logits_fn, x, y, eps, method, bounds, chunk_size)
  spec = margin_spec(y, lower.shape[1] + 1)
  box = linf_ball(x, eps, bounds)
  ibp = None if method == "ibp" else margin_bounds(logits_fn, x, y, eps, "ibp", bounds, chunk_size)
  return jnp.all(_proven(logits_fn, box, spec, method, lower, ibp), axis=1)


def spec_bounds(fn: Callable,
                interval: Interval,
                spec: Specification,
                method: str = "crown",
                chunk_size: int | None = None,
                alpha_steps: int = 20,
                alpha_lr: float = 0.1) -> jax.Array:
  """Lower bounds ``[N, S]`` of a `Specification`'s rows ``spec.rows(x, fn(x))`` over the
  box (jittable; without the rounding allowance, see `certify_spec`).

  Args:
    fn: ``fn(x) -> [N, K]``.
    interval: the input box ``[N, ...]``.
    spec: e.g. `verify.specs.probability_mass`, `output_box`, `halfspaces`, `conserves`.
    method: one of `METHODS`.
    chunk_size, alpha_steps, alpha_lr: as `margin_bounds`.

  Raises:
    InputError: for an unknown method or a spec that is not a `Specification`;
    UnsupportedPrimitiveError: for a spec (or network) the interpreter cannot bound,
      naming the primitive and the line.
  """
  if method not in METHODS:
    raise InputError(f"method must be one of {METHODS}, got {method!r}")
  if not isinstance(spec, Specification):
    raise InputError(f"spec must be a verify.specs.Specification, got {type(spec).__name__}")
  x = jax.ShapeDtypeStruct(interval.lower.shape, interval.lower.dtype)
  out = jax.eval_shape(fn, x)
  if spec.outputs is not None and (len(out.shape) != 2 or out.shape[1] != spec.outputs):
    raise InputError(f"spec {spec.name!r} is written for {spec.outputs} outputs; the network "
                     f"gives shape {out.shape}")
  g = spec.of(fn)
  rows = jax.eval_shape(g, x)
  if len(rows.shape) != 2 or rows.shape[0] != interval.lower.shape[0]:
    raise InputError(f"spec {spec.name!r} must give rows [N, S]; it gives shape {rows.shape}")
  eye = jnp.broadcast_to(jnp.eye(rows.shape[1], dtype=rows.dtype),
                         (rows.shape[0],) + (rows.shape[1],) * 2)
  return _lower(g, interval, eye, method, chunk_size, alpha_steps, alpha_lr)


@compilation.jit(static_argnames=("fn", "spec", "method", "chunk_size"))
def certify_spec(fn: Callable,
                 interval: Interval,
                 spec: Specification,
                 method: str = "crown",
                 chunk_size: int | None = None) -> jax.Array:
  """Where a `Specification` provably holds on the whole box (Qin et al. 2019): bool
  ``[N]``, True when every row's lower bound (the method's, or IBP's) exceeds its
  rounding allowance, as `certify` proves margins: for the real-valued function and its
  float32 evaluation at every float32 point of the box.

  Example:
    >>> spec = verify.specs.probability_mass([0, 1], 10, 0.5)
    >>> holds = verify.certify_spec(logits_fn, verify.linf_ball(x, 0.1), spec)
  """
  lower = spec_bounds(fn, interval, spec, method, chunk_size)
  g = spec.of(fn)
  eye = jnp.broadcast_to(jnp.eye(lower.shape[1], dtype=lower.dtype), lower.shape + lower.shape[1:])
  ibp = None if method == "ibp" else spec_bounds(fn, interval, spec, "ibp", chunk_size)
  return jnp.all(_proven(g, interval, eye, method, lower, ibp), axis=1)


def certify(logits_fn: Callable,
            x: jax.typing.ArrayLike,
            y: jax.typing.ArrayLike,
            eps: jax.typing.ArrayLike,
            method: str = "ibp",
            bounds: tuple[float, float] | None = (0.0, 1.0),
            chunk_size: int | None = None) -> jax.Array:
  """Which examples are verified robust: every margin's lower bound exceeds its rounding allowance.

  Verified means: at every float32 point within ``eps`` of ``x`` (inside
  ``bounds``), the label's logit exceeds every other logit, both for the
  real-valued function the program computes from its float weights and for the
  program evaluated in float32 (every product at HIGHEST precision); each margin's
  lower bound must exceed `verify.rounding_allowance`, which covers the rounding of
  that evaluation and of the bound computation (see `verify.rounding`). ``eps`` is
  rounded up to float32.

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
    method: ``"ibp"``, ``"crown_ibp"``, ``"crown"``, ``"alpha_crown"`` or
      ``"sdp_fo"`` (`verify.sdp_fo` with its defaults; ReLU networks only, not jitted
      end to end).
    bounds: the valid input box, or None.
    chunk_size: rows per backward pass (see `verify.crown`).

  Returns:
    bool ``[N]``: True where the prediction is provably constant on the ball.

  Raises:
    InputError: before any work, for an unknown method; ``bounds`` with lower >
      upper; ``x`` of rank 0, of a non-floating dtype, with NaN or infinite
      values or outside ``bounds``; ``y`` not integer labels ``[N]`` in ``[0,
      K)``; ``eps`` negative, NaN, infinite or of a shape other than ``()`` or
      ``[N]``; ``logits_fn`` not returning floating logits ``[N, K]``, K >= 2.

  Example:
    >>> verified = verify.certify(logits_fn, x, y, 0.1, method="crown_ibp")
  """
  if method not in CERTIFY_METHODS:
    raise InputError(f"method must be one of {CERTIFY_METHODS}, got {method!r}")
  bounds = check_bounds(bounds)
  check_images(x, bounds=bounds, name="x")
  x = jnp.asarray(x)
  check_labels(y, num_examples=x.shape[0], name="y")
  check_eps(eps, num_examples=x.shape[0])
  logits = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
  num_classes = check_logits_shape(logits, x.shape[0], what="a margin specification")
  check_labels(y, num_classes=num_classes, name="y")
  x, y, eps = jnp.asarray(x), jnp.asarray(y), jnp.asarray(
      round_up(eps))  # the float32 ball contains the asked one
  if method == "sdp_fo":
    lower = sdp_fo(logits_fn,
                   linf_ball(x, eps, bounds),
                   margin_spec(y, num_classes),
                   chunk_size=chunk_size,
                   only_below=0.0)
    return _certify_lower(logits_fn, x, y, eps, lower, bounds, chunk_size)
  return _certify_jit(logits_fn, x, y, eps, method, bounds, chunk_size)


@compilation.jit(static_argnames=("logits_fn", "bounds", "chunk_size"))
def _certify_lower(logits_fn, x, y, eps, lower, bounds, chunk_size):
  """`certify` from given lower bounds of the margins (SDP-FO's, for the real-valued
  network, and the larger of them and CROWN's): with IBP's, less CROWN's allowance."""
  spec = margin_spec(y, lower.shape[1] + 1)
  box = linf_ball(x, eps, bounds)
  ibp = margin_bounds(logits_fn, x, y, eps, "ibp", bounds, chunk_size)
  return jnp.all(_proven(logits_fn, box, spec, "crown", lower, ibp), axis=1)

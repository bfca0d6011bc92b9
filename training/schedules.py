"""Schedules of the robust-training coefficients (epsilon, kappa, beta) as pure functions of the step.

Every schedule is ``value(step) -> float32 scalar``, jittable with a traced step,
and is described by plain numbers from a config: it holds ``start`` until
``begin``, moves to ``end`` over ``[begin, finish]``, and holds ``end`` after.

* ``"linear"``: a straight line (Gowal et al. 2018; Zhang et al. 2020).
* ``"smooth"``: Shi et al. 2021's smoothed ramp: ``value ~ t**power`` for the first
  ``mid_point`` of the ramp, then linear, joined with a continuous slope, so
  that epsilon grows slowly while bounds are still loose.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

Schedule = Callable[..., jnp.ndarray]
KINDS = ("linear", "smooth")


def check_ramp(begin: int, finish: int, name: str = "schedule") -> None:
  """Raises ValueError unless ``0 <= begin <= finish``."""
  if not 0 <= int(begin) <= int(finish):
    raise ValueError(f"{name}: the ramp must start at a step >= 0 and end no earlier than it "
                     f"starts; got begin={begin}, finish={finish}")


def ramp(start: float,
         end: float,
         begin: int,
         finish: int,
         kind: str = "linear",
         mid_point: float = 0.25,
         power: float = 4.0) -> Schedule:
  """A schedule from ``start`` (until step ``begin``) to ``end`` (from step ``finish`` on).

  Args:
    start: value before the ramp.
    end: value after the ramp.
    begin: first step of the ramp.
    finish: step at which ``end`` is reached (``finish == begin``: a jump).
    kind: ``"linear"`` or ``"smooth"``.
    mid_point: ``"smooth"``: fraction of the ramp spent on the polynomial part.
    power: ``"smooth"``: exponent of the polynomial part.

  Returns:
    ``schedule(step) -> float32 scalar``.

  Raises:
    ValueError: for an unknown kind, a ramp that ends before it begins, or
      ``mid_point`` outside ``(0, 1)``, ``power < 1``.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {KINDS}")
  check_ramp(begin, finish)
  if kind == "smooth" and not (0.0 < mid_point < 1.0 and power >= 1.0):
    raise ValueError(f"smooth schedule needs 0 < mid_point < 1 and power >= 1, got "
                     f"mid_point={mid_point}, power={power}")
  start, end = float(start), float(end)
  begin, finish = int(begin), int(finish)
  length = finish - begin

  def linear(step):
    if length == 0:
      return jnp.where(step >= finish, end, start).astype(jnp.float32)
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / length, 0.0, 1.0)
    return jnp.float32(start) + (end - start) * frac

  if kind == "linear" or length == 0:
    return linear

  mid = mid_point * length
  # value = start + a t**power on [0, mid], then a straight line with the same slope at mid,
  # reaching `end` at t = length:  a mid**power + power a mid**(power-1) (length - mid) = end - start.
  a = (end - start) / (mid**power + power * mid**(power - 1) * (length - mid))
  slope = power * a * mid**(power - 1)

  def smooth(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) - begin, 0.0, float(length))
    curve = start + a * t**power
    line = start + a * mid**power + slope * (t - mid)
    return jnp.where(t < mid, curve, line).astype(jnp.float32)

  return smooth

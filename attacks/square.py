"""Square Attack: a score-based black-box attack by random search.

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020.

Only the logits are used (no gradients). Each iteration proposes one change per
example: L-inf sets a random square window (all rows and columns of the window,
a random sign per channel) to a vertex of the epsilon-ball; L2 moves perturbation
mass from a second window into the first, shaped by the paper's centred
"rectangles" pattern. A proposal is kept when it raises the loss or fools the
model. The square's side shrinks with the published schedule of ``p`` (the
fraction of pixels a window covers), rescaled to the query budget unless
``rescale_schedule=False`` (as in AutoAttack).

Inputs of rank 4 are read as ``[N, H, W, C]`` images; rank 3 as ``[N, H, W]``;
anything else as a 1-D signal ``[N, D]`` whose windows are runs of ``p * D``
consecutive features.

Example::

  attack = attacks.square(eps=8 / 255, queries=5000)
  x_adv = attack(logits_fn, x, y, key)
  result = attacks.square_search(logits_fn, x, y, key, eps=8 / 255)  # + queries
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attacks import core
from robustlib.checks import InputError

# Iterations (on a 10,000-query scale) after which p is halved.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareResult(NamedTuple):
  """What :func:`square_search` returns.

  Attributes:
    x_adv: ``[N, ...]`` the best point per example, inside the ball and the box.
    adversarial: ``[N]`` bool, whether ``x_adv`` fools the model.
    queries: ``[N]`` int32, the logits evaluations spent on each example, the
      evaluation of the clean ``x`` included; at most ``queries * restarts``.
  """
  x_adv: jax.Array
  adversarial: jax.Array
  queries: jax.Array


def p_selection(iteration: jax.Array,
                queries: int,
                p_init: float,
                rescale_schedule: bool = True) -> jax.Array:
  """The fraction of pixels a window covers at ``iteration`` (0-based).

  ``p_init`` halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
  8000; with ``rescale_schedule`` those are iterations of a 10,000-query budget,
  the schedule rescaled to ``queries`` (iteration ``i`` reads as
  ``floor(i * 10000 / queries)``), as the paper's code does by default;
  AutoAttack turns the rescaling off.
  """
  i = jnp.asarray(iteration, jnp.float32)
  scaled = jnp.floor(i * 10000.0 / queries) if rescale_schedule else i
  halvings = jnp.sum(scaled > jnp.asarray(P_SCHEDULE, jnp.float32))
  return p_init / 2.0**halvings


def _check_config(norm: str, queries: Any, p_init: Any, restarts: Any, loss: Any,
                  targeted: bool) -> tuple[Callable, int]:
  core.check_norm(norm)
  core.check_positive_int(queries, "queries")
  core.check_positive_int(restarts, "restarts")
  if isinstance(p_init, bool) or not isinstance(p_init, (int, float, np.floating, np.integer)):
    raise InputError(f"p_init must be a number in (0, 1], got {p_init!r}")
  if not 0.0 < float(p_init) <= 1.0:
    raise InputError(f"p_init must lie in (0, 1], got {p_init}")
  if not callable(loss) and loss not in ("margin", "ce"):
    raise InputError(f"square's loss must be 'margin', 'ce' or a callable, got {loss!r}")
  return core.get_loss(loss, targeted)


# ----------------------------------------------------------------------------
# Geometry of windows on an [N, H, W, C] view of the input.


def _image_view(shape: Sequence[int]) -> tuple[int, int, int]:
  """``(H, W, C)`` the input of per-example ``shape`` is searched as."""
  if len(shape) == 3:
    return tuple(shape)
  if len(shape) == 2:
    return shape[0], shape[1], 1
  return int(np.prod(shape)), 1, 1


def _window_side(p: jax.Array, h: int, w: int, minimum: int, odd: bool) -> jax.Array:
  """The window's side (a run of ``~p * H`` rows when ``W == 1``), an int32 scalar."""
  limit = h if w == 1 else min(h, w)
  area = p * h * w
  side = jnp.round(area if w == 1 else jnp.sqrt(area)).astype(jnp.int32)
  side = jnp.clip(side, min(minimum, limit), limit)
  if odd:
    side = jnp.where((side % 2 == 0) & (side < limit), side + 1, side)
    side = jnp.where((side % 2 == 0) & (side > 1), side - 1, side)
  return side


def _windows(u_top: jax.Array, u_left: jax.Array, side: jax.Array, h: int,
             w: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example a window's top-left corner (from uniforms ``[N]`` in [0, 1)) and
  its ``[N, H, W, 1]`` bool mask."""
  side_h, side_w = side, (jnp.ones_like(side) if w == 1 else side)
  top = jnp.floor(u_top * (h - side_h + 1)).astype(jnp.int32)
  left = jnp.floor(u_left * (w - side_w + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  mask = ((rows >= top[:, None, None]) & (rows < (top + side_h)[:, None, None]) &
          (cols >= left[:, None, None]) & (cols < (left + side_w)[:, None, None]))
  return top, left, mask[..., None]


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform [0, 1) draws ``[N, ...]``, made flat (one key, or one per example)."""
  return core.uniform(key, shape, flat=True)


def _signs(u: jax.Array, dtype) -> jax.Array:
  return jnp.where(u < 0.5, -1.0, 1.0).astype(dtype)


def _inverse_square_sums(size: int) -> np.ndarray:
  """``[size + 1]``: entry ``m`` is ``sum_{j=1}^{m} 1 / j^2``."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size + 1)**2)]).astype(np.float32)


def _rectangles(ri: jax.Array, rj: jax.Array, a: jax.Array, b: jax.Array,
                table: jax.Array) -> jax.Array:
  """The unnormalized ``a x b`` pattern of nested centred rectangles at ``(ri, rj)``.

  Rectangle ``k`` (Chebyshev radius ``k`` around ``(a // 2, b // 2)``) adds
  ``1 / (k + 1)^2``; zero outside the ``a x b`` block.
  """
  ca, cb = a // 2, b // 2
  rings = jnp.maximum(ca, cb) + 1
  radius = jnp.maximum(jnp.abs(ri - ca), jnp.abs(rj - cb))
  inside = (ri >= 0) & (ri < a) & (rj >= 0) & (rj < b)
  value = table[rings] - table[jnp.clip(radius, 0, rings)]
  return jnp.where(inside, value, 0.0)


def _unit(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True)), 1e-12)


def _eta(ri: jax.Array, rj: jax.Array, a: jax.Array, b: jax.Array, table: jax.Array,
         axes: tuple[int, ...]) -> jax.Array:
  """The paper's L2 window pattern: two halves of opposite sign, unit L2 norm.

  ``ri``, ``rj``: coordinates relative to the window's corner, broadcast over a
  grid whose ``axes`` are summed for the normalization.
  """
  top = _unit(_rectangles(ri, rj, a // 2, b, table), axes)
  bottom = _unit(_rectangles(ri - a // 2, rj, a - a // 2, b, table), axes)
  return _unit(top - bottom, axes)


def _l2_norm(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(v * v, axis=(1, 2, 3), keepdims=True))


# ----------------------------------------------------------------------------
# Initial points.


def _init_linf(key, x, eps, bounds):
  """Vertical stripes: a random sign per (column, channel), the whole height."""
  n, _, w, c = x.shape
  signs = _signs(_uniform(key, (n, 1, w, c)), x.dtype)
  return jnp.clip(x + eps[:, None, None, None] * signs, *bounds)


def _init_l2(key, x, eps, bounds, table):
  """A grid of windows of side ``H // 5`` with the L2 pattern and random signs."""
  n, h, w, c = x.shape
  side_h, side_w = max(h // 5, 1), (1 if w == 1 else max(w // 5, 1))
  start_h, start_w = max((h - 5 * side_h) // 2, 0), max((w - 5 * side_w) // 2, 0)
  blocks_h, blocks_w = max(h // side_h, 1), max(w // side_w, 1)
  rows, cols = np.arange(h), np.arange(w)
  bi = np.minimum(np.maximum(rows - start_h, 0) // side_h, blocks_h - 1)
  bj = np.minimum(np.maximum(cols - start_w, 0) // side_w, blocks_w - 1)
  ri = (rows - start_h - bi * side_h)[:, None]
  rj = (cols - start_w - bj * side_w)[None, :]
  pattern = _eta(jnp.asarray(ri), jnp.asarray(rj), side_h, side_w, table, (0, 1))
  if side_h == side_w:  # The transposed pattern.
    pattern_t = _eta(jnp.asarray(rj), jnp.asarray(ri), side_h, side_w, table, (0, 1))
  else:
    pattern_t = pattern
  # One draw for everything random here: random draws are costly to compile.
  u = _uniform(key, (n, blocks_h, blocks_w, c + 1))
  signs = _signs(u[..., 1:], x.dtype)
  flip = u[..., 0] < 0.5
  signs = signs[:, bi][:, :, bj]  # [N, H, W, C]
  flip = flip[:, bi][:, :, bj]
  delta = jnp.where(flip, pattern_t, pattern)[..., None] * signs
  return jnp.clip(x + _unit(delta, (1, 2, 3)) * eps[:, None, None, None], *bounds)


# ----------------------------------------------------------------------------
# Proposals.


def _propose_linf(key, x, x_best, eps, p, bounds):
  n, h, w, c = x.shape
  u = _uniform(key, (n, 2 + c))
  side = _window_side(p, h, w, minimum=1, odd=False)
  _, _, mask = _windows(u[:, 0], u[:, 1], side, h, w)
  signs = _signs(u[:, 2:], x.dtype)[:, None, None, :]
  e = eps[:, None, None, None]

  def candidate(s):
    return jnp.where(mask, jnp.clip(x + e * s, *bounds), x_best)

  x_new = candidate(signs)
  # A window that is already at the proposed vertex would waste a query: flip it.
  unchanged = jnp.all(x_new == x_best, axis=(1, 2, 3), keepdims=True)
  return jnp.where(unchanged, candidate(-signs), x_new)


def _propose_l2(key, x, x_best, eps, p, bounds, table):
  n, h, w, c = x.shape
  u = _uniform(key, (n, 5 + c))
  side = _window_side(p, h, w, minimum=3, odd=True)
  top, left, mask1 = _windows(u[:, 0], u[:, 1], side, h, w)
  _, _, mask2 = _windows(u[:, 2], u[:, 3], side, h, w)
  side_w = 1 if w == 1 else side

  delta = x_best - x
  norm_image = _l2_norm(delta)
  norm_windows = _l2_norm(jnp.where(mask1 | mask2, delta, 0.0))
  norm_window1 = jnp.sqrt(jnp.sum(jnp.where(mask1, delta * delta, 0.0), axis=(1, 2),
                                  keepdims=True))  # [N, 1, 1, C]

  ri = jnp.arange(h)[None, :, None] - top[:, None, None]
  rj = jnp.arange(w)[None, None, :] - left[:, None, None]
  flip = (u[:, 4] < 0.5)[:, None, None] & (w > 1)
  pattern = _eta(jnp.where(flip, rj, ri), jnp.where(flip, ri, rj), side, side_w, table, (1, 2))
  signs = _signs(u[:, 5:], x.dtype)[:, None, None, :]
  new = pattern[..., None] * signs + jnp.where(mask1, delta, 0.0) / (1e-12 + norm_window1)
  new = new / (1e-12 + jnp.sqrt(jnp.sum(new * new, axis=(1, 2), keepdims=True)))
  e = eps[:, None, None, None]
  new = new * jnp.sqrt(jnp.maximum(e * e - norm_image**2, 0.0) / c + norm_windows**2)
  delta = jnp.where(mask1, new, jnp.where(mask2, 0.0, delta))
  return jnp.clip(x + delta / (1e-12 + _l2_norm(delta)) * e, *bounds)


# ----------------------------------------------------------------------------
# The search.


class _State(NamedTuple):
  iteration: jax.Array
  x_best: jax.Array
  loss: jax.Array
  adversarial: jax.Array
  queries: jax.Array


def _restart(logits_fn, objective, x, y, target, eps, key, spent, active, *, norm, queries, p_init,
             rescale_schedule, bounds, table, cap):
  """One run of the random search on the examples where ``active``.

  Returns the run's best point, its loss and adversarialness, the examples it
  ran on (``active`` and with a query left for the start) and the updated
  per-example query counts.
  """
  k_init, k_loop = core.split(key, 2)
  if norm == "linf":
    x_init = _init_linf(k_init, x, eps, bounds)
  else:
    x_init = _init_l2(k_init, x, eps, bounds, table)
  logits = logits_fn(x_init)
  active = active & (spent < cap)
  spent = spent + active.astype(jnp.int32)

  def still_searching(state):
    return ~state.adversarial & (state.queries < cap) & active

  def cond(state):
    return (state.iteration < queries) & jnp.any(still_searching(state))

  def body(state):
    searching = still_searching(state)
    k_step = core.fold_in(k_loop, state.iteration)
    p = p_selection(state.iteration, queries, p_init, rescale_schedule)
    if norm == "linf":
      x_new = _propose_linf(k_step, x, state.x_best, eps, p, bounds)
    else:
      x_new = _propose_l2(k_step, x, state.x_best, eps, p, bounds, table)
    logits = logits_fn(x_new)
    loss = objective(logits)
    adversarial = core.is_adversarial(logits, y, target)
    take = searching & ((loss > state.loss) | adversarial)
    return _State(iteration=state.iteration + 1,
                  x_best=jnp.where(take[:, None, None, None], x_new, state.x_best),
                  loss=jnp.where(take, loss, state.loss),
                  adversarial=state.adversarial | (take & adversarial),
                  queries=state.queries + searching.astype(jnp.int32))

  state = _State(jnp.zeros((), jnp.int32), x_init, objective(logits),
                 core.is_adversarial(logits, y, target), spent)
  state = jax.lax.while_loop(cond, body, state)
  return state.x_best, state.loss, state.adversarial, active, state.queries


def _search(logits_fn,
            x,
            y,
            key,
            eps,
            target,
            *,
            norm,
            queries,
            p_init,
            restarts,
            rescale_schedule,
            loss_fn,
            bounds,
            first_restart=0,
            live=None) -> SquareResult:
  """Restarts ``first_restart, ..., first_restart + restarts - 1`` on the examples
  where ``live`` (all by default)."""
  n = x.shape[0]
  h, w, c = _image_view(x.shape[1:])
  x_img = x.reshape(n, h, w, c)
  table = jnp.asarray(_inverse_square_sums(max(h, w) + 1))

  def view_logits(z):
    return logits_fn(z.reshape(x.shape))

  def objective(logits):
    return loss_fn(logits, y, target)

  clean = logits_fn(x)
  clean_adv = core.is_adversarial(clean, y, target)
  best = core.init_best(x_img, clean_adv if live is None else clean_adv | ~live, objective(clean))
  spent = jnp.ones((n,), jnp.int32)

  def one_restart(carry, r):
    best, spent = carry
    x_run, loss, adversarial, active, spent = _restart(view_logits,
                                                       objective,
                                                       x_img,
                                                       y,
                                                       target,
                                                       eps,
                                                       core.fold_in(key, first_restart + r),
                                                       spent,
                                                       ~best.adversarial,
                                                       norm=norm,
                                                       queries=queries,
                                                       p_init=p_init,
                                                       rescale_schedule=rescale_schedule,
                                                       bounds=bounds,
                                                       table=table,
                                                       cap=(r + 1) * queries)
    best = core.update_best(best, x_run, adversarial & active, jnp.where(active, loss, -jnp.inf))
    return (best, spent), None

  (best, spent), _ = jax.lax.scan(one_restart, (best, spent), jnp.arange(restarts))
  return SquareResult(best.x.reshape(x.shape), best.adversarial, spent)


def square_search(
    logits_fn: core.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    eps: Any,
    target: jax.Array | None = None,
    *,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    rescale_schedule: bool = True,
    loss: str | Callable = "margin",
    bounds: Sequence[float] = (0.0, 1.0)) -> SquareResult:
  """Square Attack returning the per-example query counts as well (jittable).

  Args:
    logits_fn: ``[N, ...] -> [N, K]``; only its outputs are used.
    x: ``[N, ...]`` inputs inside ``bounds``.
    y: ``[N]`` int labels.
    key: PRNG key.
    eps: scalar or ``[N]`` radius (may be traced).
    target: ``[N]`` int target classes for a targeted search, else None.
    norm, queries, p_init, restarts, rescale_schedule, loss, bounds: as in
      :func:`square`.

  Returns:
    A :class:`SquareResult` (for a float16 or bfloat16 ``x``, searched in float32
    and rounded toward ``x``: ``adversarial`` is judged before that rounding).
  """
  loss_fn, _ = _check_config(norm, queries, p_init, restarts, loss, target is not None)
  bounds = core.check_bounds(bounds)
  core.check_eps(eps)
  x = jnp.asarray(x)
  fn, x_wide = core.widen(logits_fn, x)
  result = _search(fn,
                   x_wide,
                   jnp.asarray(y),
                   key,
                   core.per_example_eps(eps, x.shape[0], x.dtype),
                   target,
                   norm=norm,
                   queries=queries,
                   p_init=float(p_init),
                   restarts=restarts,
                   rescale_schedule=rescale_schedule,
                   loss_fn=loss_fn,
                   bounds=bounds)
  return result._replace(x_adv=core.round_toward(result.x_adv, x))


def square(eps: float,
           *,
           norm: str = "linf",
           queries: int = 5000,
           p_init: float = 0.8,
           restarts: int = 1,
           rescale_schedule: bool = True,
           loss: str | Callable = "margin",
           targeted: bool = False,
           bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """Square Attack (Andriushchenko et al., ECCV 2020), score-based black-box.

  Args:
    eps: default radius of the ``norm`` ball.
    norm: ``"linf"`` or ``"l2"``.
    queries: logits evaluations allowed per example and restart (the clean
      evaluation of ``x`` counts as one). Examples stop spending queries once
      they are adversarial.
    p_init: initial fraction of the pixels a window covers, in ``(0, 1]``; it
      halves on the paper's schedule (`p_selection`).
    restarts: independent runs, each from a fresh random start, on the
      examples no earlier run fooled.
    rescale_schedule: rescale the schedule of ``p`` to ``queries`` (the paper's
      code's default); AutoAttack uses False.
    loss: ``"margin"`` (``max_{j != y} z_j - z_y``; targeted:
      ``z_t - max_{j != t} z_j``), ``"ce"`` or a callable ``loss(logits [N, K],
      y [N], target [N] | None) -> [N]`` (`attacks.core.get_loss`); maximized.
    targeted: calls take ``target=`` and the search aims at it.
    bounds: the input box.

  Returns:
    An :class:`attacks.core.AttackFn`; :func:`square_search` runs the same
    search and also returns the query counts.

  Raises:
    InputError: for ``eps < 0``, ``queries < 1``, ``restarts < 1``, ``p_init``
      outside ``(0, 1]`` or an unknown norm or loss.
  """
  loss_fn, min_classes = _check_config(norm, queries, p_init, restarts, loss, targeted)
  bounds = core.check_bounds(bounds)
  search = functools.partial(_search,
                             norm=norm,
                             queries=queries,
                             p_init=float(p_init),
                             rescale_schedule=bool(rescale_schedule),
                             loss_fn=loss_fn,
                             bounds=bounds)

  def run(logits_fn, x, y, key, eps, target):
    return search(logits_fn, x, y, key, eps, target, restarts=restarts).x_adv

  def run_one(logits_fn, x, y, key, eps, r, live):
    return search(logits_fn, x, y, key, eps, None, restarts=1, first_restart=r, live=live).x_adv

  return core.make_attack(run,
                          name=f"square-{norm}",
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          targeted=targeted,
                          min_classes=min_classes,
                          runs=restarts,
                          run_one=None if targeted else run_one)

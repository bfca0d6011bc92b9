"""alpha-CROWN: CROWN with optimised lower slopes of the ReLU relaxations.

The lower line of an unstable ``max(x, c)`` may have any slope in [0, 1]; each
output row gets its own slopes, initialised at CROWN's adaptive choice and
improved by projected gradient ascent (Adam, with optax) on the sum of the
bounds. The best bound seen for each row is kept, the initial one included, so
the result is never looser than CROWN. Intermediate bounds are CROWN's.

Reference:
  Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification
  with Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import optax

from robustlib.checks import InputError
from verify import primitives
from verify.crown import Node
from verify.crown import _prepare
from verify.crown import _spec_rows
from verify.crown import _sum_rest
from verify.crown import backward
from verify.crown import intermediate_bounds
from verify.crown import node_kind
from verify.crown import relu_alpha_init
from verify.graph import ancestors
from verify.interval import Interval
from verify.interval import ordered


def _optimise(out, A, bounds, steps: int, lr: float) -> jax.Array:
  """Best lower bounds ``[R, N]`` of the rows ``A`` over ``steps`` Adam steps.

  The search for the slopes is not differentiated (Adam's update has no
  derivative where a gradient is 0): the result is the bound at the best slopes
  found for each row, held fixed, so its gradient with respect to the network's
  parameters is that of CROWN with those slopes (intermediate bounds included).
  """
  search_bounds = jax.tree_util.tree_map(lax.stop_gradient, bounds)
  relus = [n for n in ancestors(out) if node_kind(n) == "relu"]
  init = {}
  for node in relus:
    x = node.inputs[node.bounded_inputs[0]]
    a = relu_alpha_init(node, search_bounds[x.index])
    init[str(node.index)] = jnp.broadcast_to(a[None], (A.shape[0],) + a.shape)

  def rows(alphas, bounds=search_bounds):
    return backward(out, A, bounds, alphas={int(k): v for k, v in alphas.items()})

  if not relus or steps == 0:
    return rows(init, bounds)

  def loss(alphas):
    r = rows(alphas)
    return -jnp.sum(r), r

  def keep_better(better, new, old):  # per row and example: better [R, N]
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(better.reshape(better.shape + (1,) * (a.ndim - 2)), a, b), new, old)

  opt = optax.adam(lr)

  def step(carry, _):
    alphas, state, best, best_alphas = carry
    (_, r), g = jax.value_and_grad(loss, has_aux=True)(alphas)
    r, g = lax.stop_gradient((r, g))
    better = r > best
    best, best_alphas = jnp.where(better, r, best), keep_better(better, alphas, best_alphas)
    upd, state = opt.update(g, state, alphas)
    alphas = optax.apply_updates(alphas, upd)
    alphas = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), alphas)
    return (alphas, state, best, best_alphas), None

  best0 = lax.stop_gradient(rows(init))
  carry = (init, opt.init(init), best0, init)
  (alphas, _, best, best_alphas), _ = lax.scan(step, carry, None, length=steps)
  best_alphas = keep_better(lax.stop_gradient(rows(alphas)) > best, alphas, best_alphas)
  return rows(lax.stop_gradient(best_alphas), bounds)


@primitives.highest_precision
def alpha_crown(fn: Callable,
                interval: Interval,
                spec: jax.typing.ArrayLike | None = None,
                steps: int = 20,
                lr: float = 0.1,
                chunk_size: int | None = None,
                lower_only: bool = False) -> Interval | jax.Array:
  """alpha-CROWN bounds on ``spec @ fn(x)`` for ``x`` in ``interval``.

  Args:
    fn: ``fn(x) -> [N, K]`` made of supported primitives.
    interval: the input box ``[N, ...]``.
    spec: ``C`` ``[N, S, K]``, or None for bounds on ``fn(x)`` itself.
    steps: Adam steps (0 gives CROWN).
    lr: Adam learning rate for the slopes.
    chunk_size: as in `verify.crown`, for the intermediate bounds.
    lower_only: return only the lower bounds ``[N, S]`` (half the work).

  Returns:
    `Interval` ``[N, S]`` (or ``[N, K]``), at least as tight as `verify.crown`.
  """
  if steps < 0:
    raise InputError(f"steps must be >= 0, got {steps}")
  graph, boxes, out, out_shape, spec = _prepare(fn, interval, spec)
  if lower_only and spec is None:
    raise InputError("lower_only needs a spec")
  bounds = intermediate_bounds(graph, boxes, "crown", chunk_size)
  A, logits = _spec_rows(out_shape, spec, interval.dtype)
  if not logits and not lower_only:
    A = jnp.concatenate([A, -A], axis=0)
  if not isinstance(out, Node):
    r = _sum_rest(A * jnp.asarray(out)[None])
  else:
    r = _optimise(out, A, bounds, steps, lr)
  if lower_only:
    return r.T
  k = r.shape[0] // 2
  lower, upper = r[:k].T, -r[k:].T
  if logits:
    lower, upper = lower.reshape(out_shape), upper.reshape(out_shape)
  return ordered(lower, upper)

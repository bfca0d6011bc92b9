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

import math
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


def relu_nodes(out: Node) -> list[Node]:
  """The ``max``/``min`` (ReLU) nodes the bound of ``out`` passes through, in order."""
  return [n for n in ancestors(out) if node_kind(n) == "relu"]


def optimise(out: Node,
             A: jax.Array,
             bounds: dict[int, Interval],
             steps: int,
             lr: float,
             *,
             masks: dict[int, jax.Array] | None = None,
             lr_beta: float = 0.05,
             init: dict | None = None,
             record: dict | None = None) -> tuple[jax.Array, dict]:
  """Best lower bounds ``[R, N]`` of the rows ``A`` over ``steps`` Adam steps, and the
  parameters that give them.

  The parameters are, per ReLU node (by index, as a string), the lower slopes
  ``"alpha"`` in [0, 1] and, with ``masks`` (split signs ``[N, *shape]`` in
  {-1, 0, 1} per node), β-CROWN's multipliers ``"beta"`` >= 0 of the split
  constraints, each ``[R, N, *shape]``. ``init`` warm-starts some of them.

  The search for the parameters is not differentiated (Adam's update has no
  derivative where a gradient is 0): the result is the bound at the best
  parameters found for each row, held fixed, so its gradient with respect to
  the network's parameters is that of CROWN with them (intermediate bounds
  included). ``record`` receives the coefficients reaching each ReLU node's output
  at those parameters (`verify.crown.backward`).
  """
  search_bounds = jax.tree_util.tree_map(lax.stop_gradient, bounds)
  relus = relu_nodes(out)
  params = {"alpha": {}, "beta": {}}
  for node in relus:
    x = node.inputs[node.bounded_inputs[0]]
    a = relu_alpha_init(node, search_bounds[x.index])
    params["alpha"][str(node.index)] = jnp.broadcast_to(a[None], (A.shape[0],) + a.shape)
    if masks is not None and node.index in masks:
      params["beta"][str(node.index)] = jnp.zeros((A.shape[0],) + a.shape, A.dtype)
  if init is not None:
    for group, values in init.items():
      for k, v in values.items():
        params[group][k] = jnp.broadcast_to(v, params[group][k].shape).astype(A.dtype)

  def rows(params, bounds=search_bounds, record=None):
    betas = {int(k): b * masks[int(k)][None].astype(b.dtype) for k, b in params["beta"].items()}
    return backward(out,
                    A,
                    bounds,
                    alphas={
                        int(k): v for k, v in params["alpha"].items()
                    },
                    betas=betas,
                    record=record)

  if not relus or steps == 0:
    return rows(params, bounds, record), params

  def loss(params):
    r = rows(params)
    return -jnp.sum(r), r

  def keep_better(better, new, old):  # per row and example: better [R, N]
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(better.reshape(better.shape + (1,) * (a.ndim - 2)), a, b), new, old)

  labels = lambda p: {g: jax.tree_util.tree_map(lambda _, g=g: g, p[g]) for g in p}
  opt = optax.multi_transform({"alpha": optax.adam(lr), "beta": optax.adam(lr_beta)}, labels)
  project = lambda p: {
      "alpha": jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), p["alpha"]),
      "beta": jax.tree_util.tree_map(lambda b: jnp.maximum(b, 0.0), p["beta"])
  }

  def step(carry, _):
    params, state, best, best_params = carry
    (_, r), g = jax.value_and_grad(loss, has_aux=True)(params)
    r, g = lax.stop_gradient((r, g))
    better = r > best
    best, best_params = jnp.where(better, r, best), keep_better(better, params, best_params)
    upd, state = opt.update(g, state, params)
    params = project(optax.apply_updates(params, upd))
    return (params, state, best, best_params), None

  best0 = lax.stop_gradient(rows(params))
  carry = (params, opt.init(params), best0, params)
  (params, _, best, best_params), _ = lax.scan(step, carry, None, length=steps)
  best_params = keep_better(lax.stop_gradient(rows(params)) > best, params, best_params)
  best_params = lax.stop_gradient(best_params)
  return rows(best_params, bounds, record), best_params


def optimise_intermediate(relus: list[Node],
                          bounds: dict[int, Interval],
                          steps: int,
                          lr: float,
                          max_rows: int = 4096) -> dict[int, Interval]:
  """The ReLU inputs' bounds tightened in order by alpha-CROWN, each neuron's lower and upper
  bound with its own slopes (as α,β-CROWN's initial alpha-CROWN pass).

  The first ReLU node's input is left as given (it depends on no relaxation), as is
  any node of more than ``max_rows / 2`` neurons per example (CROWN's bounds stay).
  Each new bound is intersected with the given one, so none loosens.
  """
  bounds = dict(bounds)
  for node in relus[1:]:
    x = node.inputs[node.bounded_inputs[0]]
    n, m = x.shape[0], math.prod(x.shape[1:])
    if 2 * m > max_rows:
      continue
    eye = jnp.eye(m, dtype=x.dtype).reshape((m, 1) + tuple(x.shape[1:]))
    A = jnp.broadcast_to(jnp.concatenate([eye, -eye]), (2 * m, n) + tuple(x.shape[1:]))
    r, _ = optimise(x, A, bounds, steps, lr)  # [2 m, N]
    lower = r[:m].T.reshape(x.shape)
    upper = -r[m:].T.reshape(x.shape)
    old = bounds[x.index]
    bounds[x.index] = ordered(jnp.maximum(lower, old.lower), jnp.minimum(upper, old.upper))
  return bounds


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
    r, _ = optimise(out, A, bounds, steps, lr)
  if lower_only:
    return r.T
  k = r.shape[0] // 2
  lower, upper = r[:k].T, -r[k:].T
  if logits:
    lower, upper = lower.reshape(out_shape), upper.reshape(out_shape)
  return ordered(lower, upper)

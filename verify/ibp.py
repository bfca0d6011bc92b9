"""Interval bound propagation (IBP) through any JAX function.

Each primitive's record in `verify.primitives` has a rule mapping intervals of
its operands to an interval of its result. Affine maps use the center-radius
form ``W c +- |W| r`` (exact for a single affine map of a box); monotone
primitives map the ends of the interval; bilinear products of two bounded
operands use the midpoint-radius product of Rump (1999).

References:
  Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models", 2018.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from verify import primitives
from verify.graph import Graph
from verify.graph import Node
from verify.graph import build_graph
from verify.interval import Interval
from verify.interval import ordered


def ibp_node(node: Node, ins: list[Any]) -> Interval:
  """Applies the IBP rule of ``node`` to its operands (intervals or constants)."""
  out = primitives.record(node).ibp(node, *ins)
  dtype = node.dtype
  return Interval(out.lower.astype(dtype), out.upper.astype(dtype))


def _outward(box: Interval, dtype) -> Interval:
  """``box`` in ``dtype``, rounded outward where that is narrower (known bounds computed in a
  wider dtype than the node's, as a float64 pass over a float32 program computes them)."""
  if jnp.dtype(box.lower.dtype) == jnp.dtype(dtype) or not jnp.issubdtype(dtype, jnp.floating):
    return box
  sg = jax.lax.stop_gradient

  def step(v, towards):  # the next value towards ``towards``; the gradient is v's
    up = jnp.nextafter(sg(v), jnp.asarray(towards, dtype))
    return jnp.where(jnp.isfinite(v), up + (v - sg(v)), up)

  # XLA on CPU flushes subnormal results to zero (in either direction), so magnitudes below
  # the smallest normal number are first moved outward to it or to zero, exact in ``dtype``.
  tiny = jnp.asarray(jnp.finfo(dtype).tiny, box.lower.dtype)
  lower = jnp.where(jnp.abs(box.lower) < tiny, jnp.where(box.lower < 0, -tiny, 0.0), box.lower)
  upper = jnp.where(jnp.abs(box.upper) < tiny, jnp.where(box.upper > 0, tiny, 0.0), box.upper)
  lo, hi = lower.astype(dtype), upper.astype(dtype)
  lo = jnp.where(lo > box.lower, step(lo, -jnp.inf), lo)
  hi = jnp.where(hi < box.upper, step(hi, jnp.inf), hi)
  return Interval(lo, hi)


def propagate(graph: Graph,
              boxes: list[Interval],
              known: dict[int, Interval] | None = None) -> dict[int, Interval]:
  """IBP bounds of every node of ``graph`` given the boxes of its inputs, each intersected
  with ``known`` bounds of that node (sound ones, e.g. CROWN's) where given."""
  bounds: dict[int, Interval] = {}
  for node, box in zip(graph.inputs, boxes):
    bounds[node.index] = box
  for node in graph.nodes:
    if node.index in bounds:
      continue
    ins = [bounds[a.index] if isinstance(a, Node) else a for a in node.inputs]
    b = ibp_node(node, ins)
    if known is not None and node.index in known:
      k = _outward(known[node.index], b.lower.dtype)
      b = ordered(jnp.maximum(b.lower, k.lower), jnp.minimum(b.upper, k.upper))
    bounds[node.index] = b
  return bounds


def output_intervals(graph: Graph, bounds: dict[int, Interval]) -> Any:
  """The graph's outputs as intervals, in the function's output structure."""
  outs = []
  for o in graph.outputs:
    if isinstance(o, Node):
      outs.append(bounds[o.index])
    else:
      o = jnp.asarray(o)
      outs.append(Interval(o, o))
  return jax.tree_util.tree_unflatten(graph.out_tree, outs)


@primitives.highest_precision
def ibp(fn: Callable, *args: Any) -> Any:
  """Interval bounds on the outputs of ``fn`` over boxes of its inputs.

  Args:
    fn: a JAX function made of supported primitives (see `SUPPORTED_PRIMITIVES`).
    *args: the arguments of ``fn``; pytrees whose leaves are `Interval`s (bounded
      inputs) or arrays (constants, e.g. parameters).

  Returns:
    The output of ``fn`` with every array leaf replaced by an `Interval` that
    contains it for every input inside the boxes.

  Raises:
    UnsupportedPrimitiveError: (an `InputError`) naming a primitive without a
      rule and the source line that applied it to a bounded value.

  Example:
    >>> out = verify.ibp(lambda x: jnp.tanh(x @ w), verify.linf_ball(x, 0.1))
  """
  graph, boxes = build_graph(fn, args)
  return output_intervals(graph, propagate(graph, boxes))


@primitives.highest_precision
def relu_input_bounds(fn: Callable, *args: Any) -> list[Interval]:
  """IBP bounds of the pre-activation ``x - c`` of every ``max(x, c)`` (a ReLU when ``c = 0``).

  What certified-training regularizers read (Shi et al. 2021: bound tightness
  and the balance of active and inactive ReLUs). Only ``max`` with one bounded
  operand counts.

  Args:
    fn, args: as in `ibp`.

  Returns:
    One `Interval` per ReLU, in the order the function applies them.
  """
  graph, boxes = build_graph(fn, args)
  bounds = propagate(graph, boxes)
  out = []
  for node in graph.nodes:
    if primitives.is_max_relu(node):
      b = bounds[node.inputs[node.bounded_inputs[0]].index]
      _, c = primitives.relu_threshold(node, b.lower.dtype)
      out.append(Interval(b.lower - c, b.upper - c))
  return out

"""Interval bound propagation (IBP) through any JAX function.

Each primitive has a rule mapping intervals of its operands to an interval of
its result. Affine maps use the center-radius form ``W c +- |W| r`` (exact for
a single affine map of a box); monotone primitives map the ends of the
interval; bilinear products of two bounded operands use the midpoint-radius
product of Rump (1999).

References:
  Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models", 2018.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from verify.graph import Graph
from verify.graph import Node
from verify.graph import UnsupportedPrimitiveError
from verify.graph import build_graph
from verify.interval import Interval

IbpRule = Callable[..., Interval]


def _is_iv(x) -> bool:
  return isinstance(x, Interval)


def _ends(x, upper: bool):
  if _is_iv(x):
    return x.upper if upper else x.lower
  return x


def monotone(*signs: int) -> IbpRule:
  """A rule for a primitive monotone in each operand (+1 increasing, -1 decreasing)."""

  def rule(node: Node, *ins) -> Interval:
    lo_args, hi_args = [], []
    for i, x in enumerate(ins):
      s = signs[i] if i < len(signs) else signs[-1]
      lo_args.append(_ends(x, upper=s < 0))
      hi_args.append(_ends(x, upper=s > 0))
    return Interval(node.apply(*lo_args), node.apply(*hi_args))

  return rule


def _bilinear(node: Node, a, b) -> Interval:
  """``f(a, b)`` bilinear (mul, dot_general, conv): center-radius forms."""
  if _is_iv(a) and _is_iv(b):
    ma, ra, mb, rb = a.center, a.radius, b.center, b.radius
    mid = node.apply(ma, mb)
    rad = node.apply(jnp.abs(ma), rb) + node.apply(ra, jnp.abs(mb)) + node.apply(ra, rb)
    return Interval(mid - rad, mid + rad)
  if _is_iv(a):
    mid = node.apply(a.center, b)
    rad = node.apply(a.radius, jnp.abs(b))
  else:
    mid = node.apply(a, b.center)
    rad = node.apply(jnp.abs(a), b.radius)
  return Interval(mid - rad, mid + rad)


def _mul(node: Node, a, b) -> Interval:
  if _is_iv(a) and _is_iv(b):
    cands = [a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper]
    lo = jnp.minimum(jnp.minimum(cands[0], cands[1]), jnp.minimum(cands[2], cands[3]))
    hi = jnp.maximum(jnp.maximum(cands[0], cands[1]), jnp.maximum(cands[2], cands[3]))
    return Interval(lo, hi)
  x, c = (a, b) if _is_iv(a) else (b, a)
  p, q = x.lower * c, x.upper * c
  return Interval(jnp.minimum(p, q), jnp.maximum(p, q))


def _div(node: Node, a, b) -> Interval:
  if _is_iv(b):
    # 1 / b for b of constant sign; a sign change makes the quotient unbounded.
    crosses = (b.lower <= 0) & (b.upper >= 0)
    inv = Interval(jnp.where(crosses, -jnp.inf, 1 / b.upper),
                   jnp.where(crosses, jnp.inf, 1 / b.lower))
    return _mul(node, a, inv)
  p, q = a.lower / b, a.upper / b
  return Interval(jnp.minimum(p, q), jnp.maximum(p, q))


def _abs(node: Node, x: Interval) -> Interval:
  l, u = x.lower, x.upper
  lo = jnp.where(l >= 0, l, jnp.where(u <= 0, -u, jnp.zeros_like(l)))
  hi = jnp.maximum(jnp.abs(l), jnp.abs(u))
  return Interval(lo, hi)


def _even_power(x: Interval, n: int) -> Interval:
  a = _abs(None, x)
  return Interval(a.lower**n, a.upper**n)


def _integer_pow(node: Node, x: Interval) -> Interval:
  n = node.params["y"]
  if n < 0:
    raise UnsupportedPrimitiveError(f"integer_pow with negative exponent {n} on a bounded value "
                                    f"at {node.source} is not supported")
  if n == 0:
    one = jnp.ones_like(x.lower)
    return Interval(one, one)
  if n % 2 == 0:
    return _even_power(x, n)
  return Interval(x.lower**n, x.upper**n)


def _square(node: Node, x: Interval) -> Interval:
  return _even_power(x, 2)


def _select_n(node: Node, pred, *cases) -> Interval:
  if _is_iv(pred):
    raise UnsupportedPrimitiveError(f"select_n with a bounded predicate at {node.source} is "
                                    "not supported")
  return monotone(0, *([1] * len(cases)))(node, pred, *cases)


def _const_index_op(node: Node, x, *rest) -> Interval:
  if any(_is_iv(r) for r in rest):
    raise UnsupportedPrimitiveError(f"'{node.name}' with bounded indices at {node.source} is "
                                    "not supported")
  return monotone(1, 0)(node, x, *rest)


_INC = monotone(1)
IBP_RULES: dict[str, IbpRule] = {
    # Structure, copies and sums: monotone increasing in every operand.
    **{
        name: _INC for name in [
            "convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "concatenate", "pad", "reduce_sum", "reduce_window_sum", "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cumsum", "cummax", "cummin", "split", "stop_gradient", "optimization_barrier", "add", "add_any", "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "cbrt", "erf", "reduce_precision", "real", "atan", "asinh", "sinh"
        ]
    },
    "sub": monotone(1, -1),
    "neg": monotone(-1),
    "rsqrt": monotone(-1),
    "mul": _mul,
    "dot_general": _bilinear,
    "conv_general_dilated": _bilinear,
    "div": _div,
    "abs": _abs,
    "integer_pow": _integer_pow,
    "square": _square,
    "select_n": _select_n,
    "dynamic_slice": _const_index_op,
    "gather": _const_index_op,
}

# Center-radius form for affine maps with one bounded operand (as auto_LiRPA's IBP).
_CENTER_RADIUS = ("dot_general", "conv_general_dilated")


def ibp_node(node: Node, ins: list[Any]) -> Interval:
  """Applies the IBP rule of ``node`` to its operands (intervals or constants)."""
  rule = IBP_RULES.get(node.name)
  if rule is None:
    raise UnsupportedPrimitiveError(f"no IBP rule for primitive {node.describe()}")
  out = rule(node, *ins)
  dtype = node.dtype
  return Interval(out.lower.astype(dtype), out.upper.astype(dtype))


def propagate(graph: Graph, boxes: list[Interval]) -> dict[int, Interval]:
  """IBP bounds of every node of ``graph`` given the boxes of its inputs."""
  bounds: dict[int, Interval] = {}
  for node, box in zip(graph.inputs, boxes):
    bounds[node.index] = box
  for node in graph.nodes:
    if node.index in bounds:
      continue
    ins = [bounds[a.index] if isinstance(a, Node) else a for a in node.inputs]
    bounds[node.index] = ibp_node(node, ins)
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


def is_supported(name: str) -> bool:
  return name in IBP_RULES


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
  graph, boxes = build_graph(fn, args, is_supported)
  return output_intervals(graph, propagate(graph, boxes))


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
  graph, boxes = build_graph(fn, args, is_supported)
  bounds = propagate(graph, boxes)
  out = []
  for node in graph.nodes:
    if node.name == "max" and len(node.bounded_inputs) == 1:
      pos = node.bounded_inputs[0]
      b = bounds[node.inputs[pos].index]
      c = jnp.asarray(node.inputs[1 - pos], b.lower.dtype)
      out.append(Interval(b.lower - c, b.upper - c))
  return out


SUPPORTED_PRIMITIVES = tuple(sorted(IBP_RULES))

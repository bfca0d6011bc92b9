"""Tracing a JAX function into a graph of bounded operations.

The function is traced once to a jaxpr. Walking it equation by equation splits
the program in two: equations whose inputs do not depend on a bounded input are
evaluated right away by binding their primitive (weights, BatchNorm statistics,
masks), and the others become `Node`s of a flat graph. Nested calls (`jit`,
`closed_call`, `custom_jvp_call`, `custom_vjp_call`, `checkpoint`) are inlined.
A few primitives are rewritten into simpler ones (``clamp`` into ``max`` and
``min``; ``max``/``min`` of two bounded values into a ReLU of their difference).

The graph is what every bound method (IBP, CROWN, alpha-CROWN) walks; it is
built at trace time, so under `jax.jit` the analysis runs once per compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from robustlib import jax_internals as ji
from robustlib.checks import InputError
from verify.interval import Interval


class UnsupportedPrimitiveError(InputError):
  """A primitive without a bound rule was applied to a bounded value."""


@dataclasses.dataclass(eq=False)
class Node:
  """One operation applied to at least one bounded value.

  Attributes:
    index: position in the graph's topological order.
    name: the primitive's name, or ``"input"`` for an input of the function.
    primitive: the JAX primitive (None for inputs).
    params: the primitive's parameters.
    inputs: one entry per operand: a `Node` (bounded) or a concrete value.
    out_index: for primitives with several results, which one this node is.
    shape: shape of the node's value.
    dtype: dtype of the node's value.
    source: the user's source line that created the operation.
  """
  index: int
  name: str
  primitive: Any
  params: dict
  inputs: tuple
  out_index: int | None
  shape: tuple[int, ...]
  dtype: Any
  source: str = ""

  @property
  def bounded_inputs(self) -> list[int]:
    """Positions of the operands that are nodes."""
    return [i for i, a in enumerate(self.inputs) if isinstance(a, Node)]

  def apply(self, *args) -> jax.Array:
    """Evaluates the operation on ``args`` (one per operand)."""
    if self.primitive is None:
      raise ValueError("an input node has no operation")
    out = self.primitive.bind(*args, **self.params)
    if self.out_index is not None:
      out = out[self.out_index]
    return out

  def apply_bounded(self, *bounded) -> jax.Array:
    """Evaluates the operation with the bounded operands replaced by ``bounded``."""
    args = list(self.inputs)
    for pos, val in zip(self.bounded_inputs, bounded):
      args[pos] = val
    return self.apply(*args)

  def describe(self) -> str:
    where = f" at {self.source}" if self.source else ""
    return f"'{self.name}'{where}"


@dataclasses.dataclass(eq=False)
class Graph:
  """A traced function: input nodes, operation nodes in topological order, outputs.

  Attributes:
    inputs: one `Node` per bounded argument leaf.
    nodes: every node (inputs first) in topological order.
    outputs: flat outputs, each a `Node` or a concrete value.
    out_tree: the pytree structure of the function's output.
  """
  inputs: list[Node]
  nodes: list[Node]
  outputs: list[Any]
  out_tree: Any


# Primitives whose sub-jaxpr is inlined when a bounded value flows in.
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_CALL_PRIMITIVES = {
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "checkpoint", "remat", "custom_lin"
}


def source_line(eqn) -> str:
  """The user's source location (``file:line (function)``) of an equation."""
  try:
    return ji.source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""


class _Builder:
  """Walks jaxprs, evaluating constant equations and recording bounded ones."""

  def __init__(self, supported: Callable[[str], bool]):
    self.nodes: list[Node] = []
    self.supported = supported

  def new_node(self, name, primitive, params, inputs, out_index, aval_or_val, source):
    if hasattr(aval_or_val, "shape"):
      shape, dtype = tuple(aval_or_val.shape), aval_or_val.dtype
    else:
      shape, dtype = (), jnp.asarray(aval_or_val).dtype
    node = Node(len(self.nodes), name, primitive, dict(params), tuple(inputs), out_index, shape,
                dtype, source)
    self.nodes.append(node)
    return node

  def emit(self, primitive, params, inputs, source, aval) -> Node:
    """Records ``primitive(*inputs)``, applying the rewrites."""
    name = primitive.name
    bounded = [isinstance(a, Node) for a in inputs]
    if name == "clamp":
      lo, x, hi = inputs
      # clamp(lo, x, hi) = min(max(x, lo), hi), with lo and hi broadcast by the primitives.
      lo_b = lo if isinstance(lo, Node) else jnp.broadcast_to(jnp.asarray(lo, aval.dtype),
                                                              aval.shape)
      hi_b = hi if isinstance(hi, Node) else jnp.broadcast_to(jnp.asarray(hi, aval.dtype),
                                                              aval.shape)
      if isinstance(lo_b, Node) and lo_b.shape != tuple(aval.shape):
        lo_b = self.emit(lax.broadcast_in_dim_p, {
            "shape": tuple(aval.shape),
            "broadcast_dimensions": (),
            "sharding": None
        }, [lo_b], source, aval)
      if isinstance(hi_b, Node) and hi_b.shape != tuple(aval.shape):
        hi_b = self.emit(lax.broadcast_in_dim_p, {
            "shape": tuple(aval.shape),
            "broadcast_dimensions": (),
            "sharding": None
        }, [hi_b], source, aval)
      inner = self.emit(lax.max_p, {}, [x, lo_b], source, aval)
      return self.emit(lax.min_p, {}, [inner, hi_b], source, aval)
    if name in ("max", "min") and all(bounded):
      # max(a, b) = b + relu(a - b); min(a, b) = a - relu(a - b).
      a, b = inputs
      diff = self.emit(lax.sub_p, {}, [a, b], source, aval)
      zero = jnp.zeros((), aval.dtype)
      relu = self.emit(lax.max_p, {}, [diff, zero], source, aval)
      if name == "max":
        return self.emit(lax.add_p, {}, [b, relu], source, aval)
      return self.emit(lax.sub_p, {}, [a, relu], source, aval)
    if not self.supported(name):
      raise UnsupportedPrimitiveError(
          f"no bound rule for primitive '{name}' (applied to a bounded value at {source}); "
          "supported primitives are listed in verify.SUPPORTED_PRIMITIVES")
    return self.new_node(name, primitive, params, inputs, None, aval, source)

  def walk(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, ji.Literal):
        return v.val
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      source = source_line(eqn)
      name = eqn.primitive.name
      if not any(isinstance(a, Node) for a in invals):
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
          out = eqn.primitive.bind(*invals, **bind_params)
        outs = out if eqn.primitive.multiple_results else [out]
      elif name in _CALL_PRIMITIVES or any(
          isinstance(eqn.params.get(p), (ji.ClosedJaxpr, ji.Jaxpr)) for p in _CALL_JAXPR_PARAMS):
        sub = next(eqn.params[p]
                   for p in _CALL_JAXPR_PARAMS
                   if isinstance(eqn.params.get(p), (ji.ClosedJaxpr, ji.Jaxpr)))
        if isinstance(sub, ji.ClosedJaxpr):
          outs = self.walk(sub.jaxpr, sub.consts, invals)
        else:
          outs = self.walk(sub, (), invals)
      elif eqn.primitive.multiple_results:
        if not self.supported(name):
          raise UnsupportedPrimitiveError(
              f"no bound rule for primitive '{name}' (applied to a bounded value at {source}); "
              "supported primitives are listed in verify.SUPPORTED_PRIMITIVES")
        outs = [
            self.new_node(name, eqn.primitive, eqn.params, invals, i, v.aval, source)
            for i, v in enumerate(eqn.outvars)
        ]
      else:
        outs = [self.emit(eqn.primitive, eqn.params, invals, source, eqn.outvars[0].aval)]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]


def is_interval(x: Any) -> bool:
  return isinstance(x, Interval)


def build_graph(fn: Callable, args: Sequence[Any],
                supported: Callable[[str], bool]) -> tuple[Graph, list[Interval]]:
  """Traces ``fn(*args)`` into a `Graph`.

  Args:
    fn: the function; its arguments may be pytrees whose leaves are `Interval`s
      (bounded) or arrays (constants).
    args: the arguments.
    supported: whether a primitive name has a bound rule.

  Returns:
    ``(graph, boxes)``: the graph and the `Interval` of each input node, in order.
  """
  leaves, in_tree = jax.tree_util.tree_flatten(list(args), is_leaf=is_interval)
  specs = []
  for leaf in leaves:
    if isinstance(leaf, Interval):
      specs.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    else:
      leaf = jnp.asarray(leaf)
      specs.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))

  def flat_fn(*xs):
    return fn(*jax.tree_util.tree_unflatten(in_tree, list(xs)))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
  out_tree = jax.tree_util.tree_structure(out_shape)
  builder = _Builder(supported)
  walk_args, boxes, inputs = [], [], []
  for leaf, spec in zip(leaves, specs):
    if isinstance(leaf, Interval):
      node = builder.new_node("input", None, {}, (), None, spec, "")
      inputs.append(node)
      boxes.append(leaf)
      walk_args.append(node)
    else:
      walk_args.append(jnp.asarray(leaf))
  outputs = builder.walk(closed.jaxpr, closed.consts, walk_args)
  return Graph(inputs, builder.nodes, outputs, out_tree), boxes


def consumers(graph: Graph) -> dict[int, list[Node]]:
  """For each node index, the nodes that take it as an operand."""
  users: dict[int, list[Node]] = {n.index: [] for n in graph.nodes}
  for node in graph.nodes:
    for a in node.inputs:
      if isinstance(a, Node) and node not in users[a.index]:
        users[a.index].append(node)
  return users


def ancestors(node: Node) -> list[Node]:
  """``node`` and every node it depends on, in topological order."""
  seen: dict[int, Node] = {}
  stack = [node]
  while stack:
    n = stack.pop()
    if n.index in seen:
      continue
    seen[n.index] = n
    stack.extend(a for a in n.inputs if isinstance(a, Node))
  return [seen[i] for i in sorted(seen)]

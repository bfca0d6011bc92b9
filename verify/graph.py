"""Tracing a JAX function into a graph of bounded operations.

The function is traced once to a jaxpr. Walking it equation by equation splits
the program in two: equations whose inputs do not depend on a bounded input are
evaluated right away by binding their primitive (weights, BatchNorm statistics,
masks), and the others become `Node`s of a flat graph. What to do with each
primitive comes from `verify.primitives`: calls (``jit``, ``closed_call``,
``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``) are inlined, and only
calls; loops of static length are unrolled, a ``cond`` on a constant index takes
its branch, generic reductions with a max/min/add body become the dedicated ones,
and anything else that carries a body (``while``, ``cond`` on a bounded index,
other reduction bodies) is refused.

Narrow floats (bfloat16, float16) are bounded in float32: an operation whose
result is a narrow float becomes the same operation in float32 followed by
``reduce_precision`` to the narrow format (the exact result rounded once, as XLA
computes products and sums with float32 accumulation), whose relaxation is the
identity plus or minus the format's rounding reach.

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
from verify import primitives
from verify.interval import Interval


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
    out = primitives.bind(self.primitive, *args, **self.params)
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


def source_line(eqn) -> str:
  """The user's source location (``file:line (function)``) of an equation."""
  try:
    return ji.source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""


class _Builder:
  """Walks jaxprs, evaluating constant equations and recording bounded ones."""

  def __init__(self):
    self.nodes: list[Node] = []

  @staticmethod
  def is_node(x) -> bool:
    return isinstance(x, Node)

  def new_node(self, name, primitive, params, inputs, out_index, aval_or_val, source):
    if hasattr(aval_or_val, "shape"):
      shape, dtype = tuple(aval_or_val.shape), aval_or_val.dtype
    else:
      shape, dtype = (), jnp.asarray(aval_or_val).dtype
    node = Node(len(self.nodes), name, primitive, dict(params), tuple(inputs), out_index, shape,
                dtype, source)
    self.nodes.append(node)
    return node

  def op(self, primitive, params, inputs, source, aval, out_index=None) -> Node:
    """Records ``primitive(*inputs)`` as a node (narrow floats computed in float32, then
    rounded)."""
    rec = primitives.lookup(primitive.name, source)
    params = primitives.bind_params(rec, params)
    dtype = jnp.dtype(aval.dtype)
    narrow = primitives.is_low_float(dtype)
    if narrow or any(
        primitives.is_low_float(getattr(a, "dtype", jnp.float32))
        for a in inputs
        if not isinstance(a, Node)):
      inputs = [
          a if isinstance(a, Node) or not primitives.is_low_float(jnp.asarray(a).dtype) else
          jnp.asarray(a, jnp.float32) for a in inputs
      ]
      params = {
          k: (jnp.float32 if k in ("new_dtype", "preferred_element_type") and v is not None and
              primitives.is_low_float(v) else v) for k, v in params.items()
      }
    wide = jax.ShapeDtypeStruct(tuple(aval.shape), jnp.float32 if narrow else dtype)
    node = self.new_node(primitive.name, primitive, params, inputs, out_index, wide, source)
    if narrow and not rec.exact:
      info = jnp.finfo(dtype)
      node = self.op(lax.reduce_precision_p, {
          "exponent_bits": int(info.nexp),
          "mantissa_bits": int(info.nmant)
      }, [node], source, wide)
    return node

  def emit(self, primitive, params, inputs, source, aval) -> Any:
    """``primitive(*inputs)`` for one result, with the registry's expansions."""
    return self.apply(primitive, params, inputs, source, [aval])[0]

  def apply(self, primitive, params, invals, source, avals) -> list[Any]:
    """The results of ``primitive(*invals)``: constants, inlined calls, expansions or nodes."""
    name = primitive.name
    if not any(isinstance(a, Node) for a in invals):
      out = primitives.bind(primitive, *invals, **params)
      return list(out) if primitive.multiple_results else [out]
    if name in primitives.CALLS:
      jaxpr, consts = primitives.call_body(primitive, params)
      return self.walk(jaxpr, consts, invals, source)
    expand = primitives.EXPANSIONS.get(name)
    if expand is not None:
      return expand(self, primitive, params, invals, source, avals)
    if primitive.multiple_results:
      return [self.op(primitive, params, invals, source, a, i) for i, a in enumerate(avals)]
    return [self.op(primitive, params, invals, source, avals[0])]

  def walk(self,
           jaxpr,
           consts: Sequence[Any],
           args: Sequence[Any],
           outer_source: str = "") -> list[Any]:
    """Walks ``jaxpr``; ``outer_source`` is the user's line of the call being inlined, for
    equations of library code that have no user line of their own."""
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
      if not any(isinstance(a, Node) for a in invals):
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
          out = primitives.bind(eqn.primitive, *invals, **bind_params)
        outs = out if eqn.primitive.multiple_results else [out]
      else:
        outs = self.apply(eqn.primitive, eqn.params, invals,
                          source_line(eqn) or outer_source, [v.aval for v in eqn.outvars])
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]


def is_interval(x: Any) -> bool:
  return isinstance(x, Interval)


def build_graph(fn: Callable, args: Sequence[Any]) -> tuple[Graph, list[Interval]]:
  """Traces ``fn(*args)`` into a `Graph`.

  Args:
    fn: the function; its arguments may be pytrees whose leaves are `Interval`s
      (bounded) or arrays (constants).
    args: the arguments.

  Returns:
    ``(graph, boxes)``: the graph and the `Interval` of each input node, in order.
  """
  leaves, in_tree = jax.tree_util.tree_flatten(list(args), is_leaf=is_interval)
  specs = []
  for leaf in leaves:
    if isinstance(leaf, Interval):
      specs.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise primitives.InputError(f"bounded inputs must be floating point, got an Interval "
                                    f"of dtype {leaf.dtype}")
    else:
      leaf = jnp.asarray(leaf)
      specs.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))

  def flat_fn(*xs):
    return fn(*jax.tree_util.tree_unflatten(in_tree, list(xs)))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
  out_tree = jax.tree_util.tree_structure(out_shape)
  builder = _Builder()
  walk_args, boxes, inputs = [], [], []
  for leaf, spec in zip(leaves, specs):
    if isinstance(leaf, Interval):
      if primitives.is_low_float(leaf.dtype):  # narrow inputs are bounded in float32 (exactly)
        leaf = Interval(leaf.lower.astype(jnp.float32), leaf.upper.astype(jnp.float32))
        spec = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
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


def evaluate(graph: Graph, args: Sequence[jax.Array]) -> dict[int, jax.Array]:
  """Every node's value at the point ``args`` (one array per input node), by index."""
  values = {node.index: jnp.asarray(a) for node, a in zip(graph.inputs, args)}
  for node in graph.nodes:
    if node.index not in values:
      values[node.index] = node.apply_bounded(
          *[values[node.inputs[p].index] for p in node.bounded_inputs])
  return values

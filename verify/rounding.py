"""The rounding allowance: what "verified" subtracts so that it also holds in floating point.

The bound passes (IBP, CROWN, alpha-CROWN) bound the real-valued function that a
program computes from its float weights: every operation exact (a bfloat16 or
float16 operation is the exact one rounded once to its format, see
`verify.graph`). Two things separate those bounds from what a user observes:

1. the program evaluated in floating point at a point of the box differs from its
   real value by its rounding errors;
2. the bounds are themselves computed in floating point.

`error_bounds` bounds the first for every node by a forward pass over the graph:
each node's error is what its operation does to its operands' errors (its
record's ``error`` rule in `verify.primitives`, a Lipschitz-type bound on the
operands' IBP intervals) plus its own rounding (its ``reach`` rule: ``u`` per
rounded operation, ``gamma_n`` times the sum of magnitudes for an ``n``-term sum,
Higham 2002), with every magnitude taken from the IBP bounds widened by the
errors. The second is bounded by the same terms under the same first-order model:
a bound pass performs the same products and sums (or their transposes) over the
same magnitudes, and its relaxations' slopes are at most the Lipschitz constants
the error rules use. `allowance` therefore takes the output's error bound
``|C| e`` three times (the evaluation, the bound computation, and as much again
for higher-order terms) and adds ``(K + 2) u |C| m`` for the specification's own
products (``m`` the outputs' magnitudes).

The guarantee, with ``L`` a lower bound returned by a bound pass: when
``L - allowance > 0``, the specification is positive at every float32 point of
the box both for the real-valued function and for the program evaluated in
float32 with every product at HIGHEST precision (so not for TF32 or bfloat16
matrix passes, which the bound passes never use) and library functions accurate
to `verify.error_rules.TRANSCENDENTAL_ULPS` units in the last place.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from verify import error_rules as er
from verify import primitives
from verify.crown import intermediate_bounds
from verify.graph import Graph
from verify.graph import Node
from verify.graph import build_graph
from verify.ibp import propagate
from verify.interval import Interval

# The bound of the output's evaluation error is taken this many times (see the module docstring).
ERROR_FACTOR = 3.0

_BY_KIND = {
    "identity": er.identity,
    "linear": er.linear,
    "affine": er.affine,
    "relu": er.relu,
    "pool": er.pool,
}


def _magnitude(box: Interval) -> jax.Array:
  lo, hi = jnp.asarray(box.lower, jnp.float32), jnp.asarray(box.upper, jnp.float32)
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _error_dtype(dtype):
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def error_bounds(graph: Graph, bounds: dict[int, Interval]) -> dict[int, jax.Array]:
  """For every node, a bound on ``|float value - real value|`` over the box.

  Args:
    graph: a traced function.
    bounds: IBP bounds of every node (`verify.ibp.propagate`).

  Returns:
    ``{node index: array of the node's shape}``, non-negative (infinite where no
    finite bound is known, e.g. a division by an interval around 0).
  """
  errs: dict[int, jax.Array] = {}
  for node in graph.nodes:
    dtype = _error_dtype(node.dtype)
    if node.primitive is None:
      errs[node.index] = jnp.zeros(node.shape, dtype)
      continue
    rec = primitives.record(node)
    boxes = [bounds[a.index] if isinstance(a, Node) else a for a in node.inputs]
    es = [
        errs[a.index] if isinstance(a, Node) else jnp.zeros(jnp.shape(a), dtype)
        for a in node.inputs
    ]
    rule = rec.error or _BY_KIND.get(primitives.kind(node), er.variation)
    moved = jnp.asarray(rule(node, es, boxes), dtype)
    moved = jnp.where(jnp.isnan(moved), jnp.inf, jnp.abs(moved))
    mags = [
        _magnitude(b) + e if isinstance(b, Interval) else jnp.abs(jnp.asarray(b, jnp.float32))
        for b, e in zip(boxes, es)
    ]
    mag = _magnitude(bounds[node.index]) + moved
    reach = (rec.reach or (er.exact if rec.exact else er.once))(node, mags, mag)
    errs[node.index] = jnp.broadcast_to(moved + jnp.asarray(reach, dtype), node.shape)
  return errs


def output_allowance(graph: Graph, bounds: dict[int, Interval], out,
                     spec: jax.Array | None) -> jax.Array:
  """The allowance ``[N, S]`` of ``spec @ out`` (``[N, K]`` of ``out`` without a spec)."""
  if not isinstance(out, Node):
    shape = jnp.shape(out) if spec is None else spec.shape[:2]
    return jnp.zeros(shape, jnp.float32)
  errs = error_bounds(graph, bounds)
  e = errs[out.index]
  m = _magnitude(bounds[out.index]) + e
  u = er.unit_roundoff(out.dtype)
  if spec is None:
    return ERROR_FACTOR * e + 2 * u * m
  c = jnp.abs(jnp.asarray(spec, e.dtype))
  k = c.shape[-1]
  hi = jax.lax.Precision.HIGHEST
  return (ERROR_FACTOR * jnp.einsum("nsk,nk->ns", c, e, precision=hi) +
          (k + 2) * u * jnp.einsum("nsk,nk->ns", c, m, precision=hi))


@primitives.highest_precision
def allowance(fn: Callable,
              interval: Interval,
              spec: jax.typing.ArrayLike | None = None,
              magnitudes: str = "ibp") -> jax.Array:
  """What a lower bound of ``spec @ fn(x)`` over ``interval`` must exceed to be a proof.

  Args:
    fn: ``fn(x) -> [N, K]``.
    interval: the input box ``[N, ...]``.
    spec: ``C [N, S, K]``, or None for the outputs themselves.
    magnitudes: ``"ibp"``: the error bounds take the nodes' magnitudes from IBP;
      ``"crown"``: from IBP intersected with CROWN's bounds of the nonlinearities'
      inputs (`verify.crown.intermediate_bounds`; for programs CROWN bounds). On a
      deep network IBP's magnitudes grow with depth far faster than CROWN's, the
      allowance with them (143 against 36 on a 4x256 MNIST MLP at L-inf 0.015).

  Returns:
    ``[N, S]`` (``[N, K]`` without a spec), non-negative: a lower bound ``L`` of
    any bound pass proves ``spec @ fn(x) > 0`` on the box's float32 points, for
    the real-valued function and for its float32 evaluation, when
    ``L - allowance > 0`` (see the module docstring for the model).

  Example:
    >>> spec = verify.margin_spec(y, 10)
    >>> lower = verify.crown(logits_fn, box, spec).lower
    >>> verified = jnp.all(lower - verify.rounding_allowance(logits_fn, box, spec) > 0, axis=1)
  """
  graph, boxes = build_graph(fn, [interval])
  if len(graph.outputs) != 1:
    raise primitives.InputError(f"fn must return one array [N, K], got {len(graph.outputs)} "
                                "outputs")
  if magnitudes not in ("ibp", "crown"):
    raise primitives.InputError(f"magnitudes must be 'ibp' or 'crown', got {magnitudes!r}")
  known = None
  if magnitudes == "crown":
    known = intermediate_bounds(graph, boxes, "crown")
  bounds = propagate(graph, boxes, known)
  spec = None if spec is None else jnp.asarray(spec)
  return output_allowance(graph, bounds, graph.outputs[0], spec)

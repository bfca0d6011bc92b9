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
products (``m`` the outputs' magnitudes) and ``u |C| m`` for its rows' rounding to their
dtype (``u`` the larger of the two dtypes': rows of decimal coefficients are rounded).

The forward model multiplies by ``|W|`` at every layer, so on a deep network it grows far
faster than any rounding can. For lower bounds of linear passes (``errors="backward"``,
`BACKWARD_PASSES`), `sensitivity_errors` bounds both parts by the output's sensitivity
to each node's own rounding, carried backward through the linear maps with their signs
(interval matrices for the ReLUs' derivatives), and adds what the passes' computed
intermediate bounds may be off by where their relaxations use them (`ErrorModel`): 5 to
17 times smaller than the forward model on a 4x256 MNIST MLP at L-inf 0.002-0.005.

The guarantee, with ``L`` a lower bound returned by a bound pass: when
``L - allowance > 0``, the specification is positive at every float32 point of
the box both for the real-valued function and for the program evaluated in
float32 with every product at HIGHEST precision (so not for TF32 or bfloat16
matrix passes, which the bound passes never use) and library functions accurate
to `verify.error_rules.TRANSCENDENTAL_ULPS` units in the last place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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

# The bound passes whose lower bounds `allowance(..., errors="backward")` is for: linear passes
# relaxing over CROWN's intermediate bounds (or tighter ones).
BACKWARD_PASSES = ("crown", "alpha_crown")

# `ErrorModel.refined` gives a ReLU input a backward pass per element (as CROWN's intermediate
# bounds) when its elements times the batch times the graph's largest node are at most this
# (128 MB of float32 coefficients; a 256-wide MLP layer up to a batch of 512).
REFINE_BUDGET = 1 << 25

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
  return ErrorModel.forward(graph, bounds).errs


def _node_error(node: Node, bounds: dict[int, Interval], errs: dict[int, jax.Array],
                comp: dict[int, jax.Array]):
  """``(error bound, own rounding)`` of one node given its operands' error bounds.

  ``comp``: how far each operand's ``bounds``, computed in floating point, may be from
  the bounds they stand for; the rules see the bounds widened by it, intervals that hold
  the operands' real values (a stability test on the computed bounds alone could call a
  ReLU flat where the real value crosses its threshold).
  """
  dtype = _error_dtype(node.dtype)
  if node.primitive is None:
    zero = jnp.zeros(node.shape, dtype)
    return zero, zero
  rec = primitives.record(node)
  boxes = [
      er.widen(bounds[a.index], comp[a.index]) if isinstance(a, Node) else a for a in node.inputs
  ]
  es = [
      errs[a.index] if isinstance(a, Node) else jnp.zeros(jnp.shape(a), dtype) for a in node.inputs
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
  reach = jnp.broadcast_to(jnp.asarray(reach, dtype), node.shape)
  return jnp.broadcast_to(moved + reach, node.shape), reach


@dataclasses.dataclass(frozen=True)
class PassBounds:
  """What the bound passes relax the ReLU inputs over.

  Attributes:
    ibp: IBP's bounds of every node, as computed.
    relaxed: the bounds of the ReLU inputs a linear pass relaxes over (CROWN's, or
      alpha-CROWN's), as computed; each may be IBP's where they are equal.
  """
  ibp: dict[int, Interval]
  relaxed: dict[int, Interval]

  def hull(self) -> dict[int, Interval]:
    """The bounds a pass relaxes each node over: ``relaxed``, else IBP's."""
    return {**self.ibp, **self.relaxed}


@dataclasses.dataclass(frozen=True)
class ErrorModel:
  """Error bounds of every node of a graph.

  Attributes:
    errs: ``|float value - real value|`` of every node over the box.
    reaches: every node's own rounding.
    computed: at each ReLU input, how far a bound of it computed in floating point by
      the passes (`PassBounds`) may be from the bound it stands for (the forward
      model's ``errs`` without `PassBounds`). Measured over `PassBounds.hull`, it holds for
      any pass whose intermediate bounds are linear passes relaxing over bounds inside the
      hull (alpha-CROWN's optimised ones): their slopes lie in the hull's intervals.
    forward_errs: the forward model's ``errs`` (``errs`` itself without `PassBounds`).
    bounds: the bounds the errors are measured over, as computed; each within
      ``forward_errs`` of the bound it stands for (IBP's computation over them is the
      forward model's; a linear pass's, over them or tighter ones, no larger).
  """
  errs: dict[int, jax.Array]
  reaches: dict[int, jax.Array]
  computed: dict[int, jax.Array]
  forward_errs: dict[int, jax.Array]
  bounds: dict[int, Interval]

  @classmethod
  def forward(cls, graph: Graph, bounds: dict[int, Interval]) -> "ErrorModel":
    """The forward model: each node's error from its operands' (`error_bounds`)."""
    errs, reaches = {}, {}
    for node in graph.nodes:
      errs[node.index], reaches[node.index] = _node_error(node, bounds, errs, errs)
    inputs = {x.index for x in _relu_inputs(graph)}
    return cls(errs, reaches, {i: errs[i] for i in inputs}, errs, bounds)

  @classmethod
  def refined(cls, graph: Graph, bounds: dict[int, Interval], passes: PassBounds) -> "ErrorModel":
    """The forward model with each ReLU input's errors (within `REFINE_BUDGET`) tightened by
    a backward pass from it (`sensitivity_errors`), in order, so that later nodes' errors
    start from the tightened ones; and the passes' computation errors of its bounds."""
    plain = cls.forward(graph, bounds)
    # The passes' IBP bounds are IBP's over its own bounds, whose computation its forward
    # model bounds (not the one over ``bounds``, which may be tighter).
    ibp_errs = plain.errs if passes.ibp is bounds else cls.forward(graph, passes.ibp).errs
    inputs = {x.index for x in _relu_inputs(graph)}
    largest = max(int(np.prod(n.shape[1:])) for n in graph.nodes)
    errs, reaches, computed = {}, {}, {}
    for node in graph.nodes:
      errs[node.index], reaches[node.index] = _node_error(node, bounds, errs, plain.errs)
      if node.index not in inputs:
        continue
      fwd = plain.errs[node.index]
      size = int(np.prod(node.shape[1:]))
      linear = fwd
      if (size * node.shape[0] * largest <= REFINE_BUDGET and
          jnp.issubdtype(node.dtype, jnp.floating)):
        rows = jnp.broadcast_to(
            jnp.eye(size, dtype=_error_dtype(node.dtype)).reshape((size, 1) + node.shape[1:]),
            (size,) + node.shape)
        model = cls(errs, reaches, computed, plain.errs, bounds)

        def per_element(v, node=node):  # [S, N] -> [N, *shape]
          return jnp.moveaxis(v, 0, -1).reshape(node.shape)

        evaluation = per_element(sensitivity_errors(graph, passes, model, node, rows))
        errs[node.index] = jnp.minimum(errs[node.index], evaluation)
        linear = jnp.minimum(
            fwd, (ERROR_FACTOR - 1) *
            per_element(sensitivity_errors(graph, passes, model, node, rows, computation=True)))
      # A side the passes took from IBP is off by IBP's computation error, one a linear pass
      # computed (strictly tighter) by the linear pass's.
      ib, rb = passes.ibp[node.index], passes.relaxed.get(node.index, passes.ibp[node.index])
      low = jnp.where(rb.lower > ib.lower, linear, ibp_errs[node.index])
      high = jnp.where(rb.upper < ib.upper, linear, ibp_errs[node.index])
      computed[node.index] = jnp.maximum(low, high)
    return cls(errs, reaches, computed, plain.errs, bounds)


def _relu_inputs(graph: Graph) -> list[Node]:
  return [
      n.inputs[n.bounded_inputs[0]]
      for n in graph.nodes
      if primitives.kind(n) == "relu" and isinstance(n.inputs[n.bounded_inputs[0]], Node)
  ]


def _sum_rest(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(2, x.ndim))) if x.ndim > 2 else x


def _relu_slopes(node: Node, box: Interval):
  """``relu(x') - relu(x) = d (x' - x)`` with ``d`` in ``[dc - dr, dc + dr]`` for ``x, x'``
  in ``box``: 0 on the flat side, 1 on the other, ``[0, 1]`` where ``box`` crosses the
  threshold."""
  is_max, c = primitives.relu_threshold(node, box.lower.dtype)
  below, above = box.upper <= c, box.lower >= c
  flat, through = (below, above) if is_max else (above, below)
  half = jnp.where(flat | through, 0.0, 0.5)
  return jnp.where(through, 1.0, half), half


def _slopes(node: Node, box: Interval):
  """``f(x') - f(x) = d (x' - x)`` for an elementwise ``f`` and ``x, x'`` in ``box``:
  ``(dc, dr)``, or None."""
  if primitives.kind(node) == "relu":
    return _relu_slopes(node, box)
  bound = getattr(primitives.record(node).error, "slope_bound", None)
  if bound is None:
    return None
  s = bound(box.lower, box.upper)
  return jnp.zeros_like(s), jnp.where(jnp.isnan(s), jnp.inf, s)


def _propagates(node: Node) -> bool:
  floats = [node.inputs[p].dtype for p in node.bounded_inputs] + [node.dtype]
  return all(jnp.issubdtype(d, jnp.floating) for d in floats)


def _slope_box(x: Node, passes: PassBounds, model: ErrorModel, computation: bool) -> Interval:
  """An interval holding both values between which an elementwise node's slope is taken at
  its operand ``x``: in a pass's computation, the value its relaxation is drawn over (its
  computed bounds, widened by their error ``computed``); in the evaluation, the real and
  the float value (the real value's bounds, widened by the float value's error)."""
  if computation:  # only ReLU inputs: the pass stops at other elementwise nodes
    return er.widen(passes.hull()[x.index], model.computed[x.index])
  real = er.widen(model.bounds[x.index], model.forward_errs[x.index])
  if x.index in passes.relaxed and x.index in model.computed:
    relaxed = er.widen(passes.relaxed[x.index], model.computed[x.index])
    real = Interval(jnp.maximum(real.lower, relaxed.lower), jnp.minimum(real.upper, relaxed.upper))
  return er.widen(real, model.errs[x.index])


def sensitivity_errors(graph: Graph,
                       passes: PassBounds,
                       model: ErrorModel,
                       out: Node,
                       rows: jax.Array,
                       computation: bool = False) -> jax.Array:
  """``sum_n |S_n| . reach_n``: how far ``rows . out`` evaluated in floating point can be from
  its real value, by a backward pass of the output's sensitivities to each node's rounding.

  The float value of node ``n`` differs from its real value by ``D_n = J(D_inputs) +
  rho_n``, ``|rho_n| <= reach_n``, with ``J`` the node's linear map (affine nodes) or
  ``d . D_input`` with ``d`` in an interval (a ReLU: 0 or 1 where the operand's widened
  bounds keep one side, ``[0, 1]`` elsewhere; another elementwise function: ``[-s, s]``,
  ``s`` its slope bound). So ``rows . D_out = sum_n S_n rho_n`` with ``S_n`` in a
  product of interval matrices, carried backward as midpoint and radius (Rump 1999):
  signs cancel through the linear maps, where the forward model multiplies by ``|W|``
  at every layer. A node without such a rule contributes its error bound ``|S_n| .
  errs_n`` and stops the pass.

  A linear bound pass (CROWN, alpha-CROWN, beta-CROWN) over ``rows . out`` computes its
  coefficients ``A_n`` in floating point: replacing ``rows . out`` by ``A_n . n`` at each
  step leaves a residual at most ``|A_n| . reach_n`` (the same products over the same
  magnitudes), and ``|A_n| <= |S_n|`` when each relaxation's slope lies in the ReLU's
  interval, i.e. over bounds at least as wide as those the pass relaxes over
  (`PassBounds.hull`). With ``computation``, the pass adds at every ReLU input whose
  widened bounds cross the threshold ``|S| . computed``: a relaxation's line over
  computed bounds misses the function by at most their error.

  Each slope's interval is taken over `_slope_box`: the bounds widened by how far their
  computation may be off (`ErrorModel.computed`, else the forward errors) so that they
  hold the real value, and in the evaluation by the float value's error too. Like CROWN,
  the model bounds each batch row on its own: it assumes the program computes the rows
  independently (a row's float value depends on no other row's).

  Args:
    graph, passes, model: the graph, the bounds of its nodes (IBP's, and those a linear
      pass relaxes over) and their error bounds.
    out: the output node.
    rows: ``[S, N, *out.shape[1:]]`` coefficients.
    computation: bounds the computation of a linear bound pass instead of the evaluation.

  Returns:
    ``[S, N]``, non-negative (infinite where a bound is).
  """
  cut = model.forward_errs if computation else model.errs
  acc: dict[int, tuple[jax.Array, jax.Array]] = {out.index: (rows, jnp.zeros_like(rows))}
  total = jnp.zeros(rows.shape[:2], rows.dtype)

  def weigh(size, w):  # no 0 * inf where a sensitivity is 0; NaN (an inf - inf) is inf
    size = jnp.where(jnp.isnan(size), jnp.inf, size)
    return _sum_rest(jnp.where(size > 0, size * w[None], 0.0))

  def add(node, centre, radius):
    if not isinstance(node, Node) or node.primitive is None:
      return
    if node.index in acc:
      c0, r0 = acc[node.index]
      centre, radius = c0 + centre, r0 + radius
    acc[node.index] = (centre, radius)

  for node in reversed(graph.nodes):
    if node.index not in acc:
      continue
    centre, radius = acc.pop(node.index)
    size = jnp.abs(centre) + radius
    kind = primitives.kind(node)
    slopes = None
    # A pass's lines of another elementwise function may miss it by more than their slope
    # times the error of the bounds they are drawn over: its computation stops there.
    if (kind == "relu" or (kind == "elementwise" and not computation)) and _propagates(node):
      x = node.inputs[node.bounded_inputs[0]]
      slopes = _slopes(node, _slope_box(x, passes, model, computation))
    if slopes is not None:
      dc, dr = slopes
      total = total + weigh(size, model.reaches[node.index])
      # A computed 0 may stand for a tiny sensitivity: 0 * inf stays NaN (then inf).
      add(x, centre * dc[None], jnp.abs(centre) * dr[None] + radius * (jnp.abs(dc) + dr)[None])
      if computation and kind == "relu":
        total = total + weigh(jnp.where(dr[None] > 0, size, 0.0), model.computed[x.index])
    elif kind == "identity" and _propagates(node):  # its VJP may be 0 (stop_gradient)
      total = total + weigh(size, model.reaches[node.index])
      add(node.inputs[node.bounded_inputs[0]], centre, radius)
    elif kind in ("linear", "affine") and _propagates(node):
      total = total + weigh(size, model.reaches[node.index])
      ins = [node.inputs[p] for p in node.bounded_inputs]
      zeros = [jnp.zeros(a.shape, a.dtype) for a in ins]
      ones = [jnp.ones(a.shape, a.dtype) for a in ins]
      with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(node.apply_bounded, *zeros)
        _, vjp_abs = jax.vjp(er.absolute_map(node, kind == "affine"), *ones)
        cs = jax.vmap(vjp)(centre.astype(node.dtype))
        rs = jax.vmap(vjp_abs)(radius.astype(node.dtype))
      for a, c, r in zip(ins, cs, rs):
        add(a, c, r)
    else:
      total = total + weigh(size, cut[node.index])
  return jnp.where(jnp.isnan(total), jnp.inf, total)


def output_allowance(graph: Graph,
                     bounds: dict[int, Interval],
                     out,
                     spec: jax.Array | None,
                     passes: PassBounds | None = None,
                     model: ErrorModel | None = None) -> jax.Array:
  """The allowance ``[N, S]`` of ``spec @ out`` (``[N, K]`` of ``out`` without a spec).

  With ``passes``, for a lower bound from a linear bound pass: the least of the forward
  model's allowance and the backward model's (`ErrorModel.refined`,
  `sensitivity_errors`): the evaluation error plus twice the computation's, and the
  specification's own products. ``model``: the error model, if already built.
  """
  if not isinstance(out, Node):
    shape = jnp.shape(out) if spec is None else spec.shape[:2]
    return jnp.zeros(shape, jnp.float32)
  if model is None:
    model = (ErrorModel.forward(graph, bounds) if passes is None else ErrorModel.refined(
        graph, bounds, passes))
  e = model.forward_errs[out.index]
  m = _magnitude(bounds[out.index]) + model.errs[out.index]
  u = er.unit_roundoff(out.dtype)
  n, k = e.shape[0], e.shape[-1]
  hi = jax.lax.Precision.HIGHEST
  if spec is None:
    c = jnp.broadcast_to(jnp.eye(k, dtype=e.dtype), (n, k, k))
    own = 2 * u * m
  else:
    # The products' rounding, and the rows' own rounding to their dtype or the outputs'
    # (an unsafe set's decimal coefficients): at most max(u, u_C) |C| each.
    spec = jnp.asarray(spec)
    c = spec.astype(e.dtype)
    own = ((k + 2) * u + max(u, er.unit_roundoff(spec.dtype))) * jnp.einsum(
        "nsk,nk->ns", jnp.abs(c), m, precision=hi)
  forward = ERROR_FACTOR * (e if spec is None else jnp.einsum(
      "nsk,nk->ns", jnp.abs(c), e, precision=hi)) + own
  if passes is None:
    return forward
  rows = jnp.swapaxes(c, 0, 1)
  evaluation = sensitivity_errors(graph, passes, model, out, rows)
  computation = sensitivity_errors(graph, passes, model, out, rows, computation=True)
  return jnp.minimum(forward, (evaluation + (ERROR_FACTOR - 1) * computation).T + own)


@primitives.highest_precision
def allowance(fn: Callable,
              interval: Interval,
              spec: jax.typing.ArrayLike | None = None,
              magnitudes: str = "ibp",
              errors: str = "forward") -> jax.Array:
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
    errors: ``"forward"``: for a lower bound of any pass; ``"backward"``: for one of a
      linear pass in `BACKWARD_PASSES` relaxing over CROWN's intermediate bounds or
      tighter ones (the least of both models; `sensitivity_errors`).

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
  if errors not in ("forward", "backward"):
    raise primitives.InputError(f"errors must be 'forward' or 'backward', got {errors!r}")
  known = None
  if magnitudes == "crown" or errors == "backward":
    known = intermediate_bounds(graph, boxes, "crown")
  bounds = propagate(graph, boxes, known if magnitudes == "crown" else None)
  passes = None
  if errors == "backward":
    passes = PassBounds(propagate(graph, boxes), known)
  spec = None if spec is None else jnp.asarray(spec)
  return output_allowance(graph, bounds, graph.outputs[0], spec, passes)

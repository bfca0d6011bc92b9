"""Backward linear bound propagation: CROWN and CROWN-IBP.

A lower bound on ``A . y + bias`` for a node ``y`` is pushed backward through
the graph: through an affine operation ``y = f(x) = L x + f(0)`` the coefficients
become ``L^T A`` (computed with the operation's VJP, so every linear primitive
is handled by JAX's own transpose rule) and ``A . f(0)`` joins the bias; through
a nonlinearity its linear relaxation (lower line where ``A >= 0``, upper line
where ``A < 0``) replaces it. At an input box, ``A . center - |A| . radius``.
Upper bounds are lower bounds of the negated specification.

Coefficients are stored as ``[S, N, ...]``: one row per specification, with the
batch axis kept (examples are independent, as in a network in eval mode).

References:
  Zhang et al., "Efficient Neural Network Robustness Certification with General
  Activation Functions" (CROWN), NeurIPS 2018.
  Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust
  Neural Networks" (CROWN-IBP), ICLR 2020.
  Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness
  and Beyond" (auto_LiRPA), NeurIPS 2020.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from robustlib import backend
from robustlib import fastgrad
from robustlib.checks import InputError
from verify.ibp import ibp_node
from verify.ibp import propagate as ibp_propagate
from verify import patches
from verify import primitives
from verify import relaxations as rx
from verify.graph import Graph
from verify.graph import Node
from verify.primitives import UnsupportedPrimitiveError
from verify.graph import ancestors
from verify.graph import consumers
from verify.graph import build_graph
from verify.interval import Interval
from verify.interval import ordered
from verify.rows import balanced_chunks
from verify.rows import map_chunks
from verify.rows import identity_rows

# The chunk budget (elements of one coefficient array before chunking) is the backend policy's
# (`robustlib.backend`). On CPU, 2**23 (32 MB of float32): XLA's CPU runtime takes a
# computation's temporary memory fresh at every call and pays a page fault for each page on first
# touch (about 17 ms per 64 MB on the 2-core machine these defaults were tuned on), so smaller
# chunks, reused across the loop over chunks, are faster: CROWN on the benchmark's small CNN at
# batch 128 took 1.57 s with this budget against 2.20 s with four times it (599 MB of temporary
# memory against 115 MB), and 1.89 s with half of it (more, smaller passes).


def node_kind(node: Node) -> str:
  """'input', 'identity', 'affine', 'relu', 'elementwise', 'pool', 'product', 'interval' or
  'unsupported'.

  The registry's ``linear`` and ``affine`` kinds are both 'affine' here; only the
  latter has a constant term (`verify.primitives`).
  """
  k = primitives.kind(node)
  return "affine" if k == "linear" else k


def _check_crown_node(node: Node) -> None:
  if node_kind(node) == "unsupported":
    raise UnsupportedPrimitiveError(
        f"CROWN has no linear relaxation for {node.describe()} with bounded operands "
        f"{node.bounded_inputs}; use verify.ibp for it")


def _sum_rest(x: jax.Array) -> jax.Array:
  """Sums ``[S, N, ...]`` over the trailing axes to ``[S, N]``."""
  return jnp.sum(x, axis=tuple(range(2, x.ndim))) if x.ndim > 2 else x


def concretize(A: jax.Array, box: Interval) -> jax.Array:
  """Lower bound of ``A . x`` for ``x`` in ``box``: ``A . c - |A| . r`` as ``[S, N]``."""
  c, r = box.center, box.radius
  return _sum_rest(A * c[None]) - _sum_rest(jnp.abs(A) * r[None])


# ----------------------------------------------------------------------------------------------
# Max pooling as a selection of one element per window.


def _window_stack(node: Node, x: jax.Array, pad_value) -> jax.Array:
  """``[*out_shape, W]``: the W elements of every pooling window of ``x``."""
  if "axes" in node.params:  # a reduction over axes, not windows
    axes = tuple(node.params["axes"])
    keep = [d for d in range(x.ndim) if d not in axes]
    xt = jnp.transpose(x, keep + list(axes))
    return xt.reshape(tuple(x.shape[d] for d in keep) + (-1,))
  p = node.params
  dims, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  wdil = p["window_dilation"]
  xp = lax.pad(x, jnp.asarray(pad_value, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  out_shape = node.shape
  slices = []
  for offs in itertools.product(*[range(k) for k in dims]):
    start = [o * d for o, d in zip(offs, wdil)]
    limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_shape, strides)]
    slices.append(lax.slice(xp, start, limit, strides))
  return jnp.stack(slices, axis=-1)


def _pool_relaxation(node: Node, box: Interval):
  """One-hot selection mask ``[*out, W]``, whether it is also the upper bound, the upper const."""
  lo = _window_stack(node, box.lower, -jnp.inf)
  hi = _window_stack(node, box.upper, -jnp.inf)
  idx = jnp.argmax(lo, axis=-1)
  mask = jax.nn.one_hot(idx, lo.shape[-1], dtype=box.lower.dtype)
  best_lower = jnp.max(lo, axis=-1)
  other_upper = jnp.max(jnp.where(mask > 0, -jnp.inf, hi), axis=-1)
  dominated = best_lower >= other_upper
  return mask, dominated, jnp.max(hi, axis=-1)


# ----------------------------------------------------------------------------------------------
# The backward pass.


def _elementwise_relaxation(node: Node, box: Interval, alpha=None) -> rx.Relaxation:
  return primitives.relaxation(node, box, alpha)


relu_alpha_init = primitives.relu_alpha_init


def _linear_map(node: Node) -> Callable[..., jax.Array]:
  """The node's operation as a function of its bounded operands, with fast transposes.

  A convolution of a bounded input with a fixed kernel is transposed as a
  channels-last convolution with a pre-flipped kernel (``robustlib.fastgrad``):
  on CPU, XLA's own transpose inside a loop over chunks is several times slower. The backend
  policy decides (`robustlib.backend`: ``fast_conv_transpose``).
  """
  if (backend.fast_paths().fast_conv_transpose and primitives.family(node) == "conv" and
      node.bounded_inputs == [0] and node.params["batch_group_count"] == 1):
    return fastgrad.conv_with_fast_transpose(node.inputs[1], node.params)
  return node.apply_bounded


def backward(start: Node,
             A0: jax.Array,
             bounds: dict[int, Interval],
             stop: frozenset[int] = frozenset(),
             alphas: dict[int, jax.Array] | None = None,
             betas: dict[int, jax.Array] | None = None,
             record: dict[int, jax.Array] | None = None) -> jax.Array:
  """Lower bound of ``A0 . start`` given bounds on the inputs of nonlinear nodes.

  Args:
    start: the node whose linear function is bounded.
    A0: ``[S, *start.shape]`` coefficients (batch axis second).
    bounds: interval of every input node, of every node feeding a nonlinearity
      on the way, and of every node in ``stop``.
    stop: nodes where propagation stops and their interval is used instead.
    alphas: optional lower slopes ``[S, *shape]`` for ``max``/``min`` nodes by index.
    betas: optional ``beta * s`` ``[S, *shape]`` for ``max``/``min`` nodes by index: the
      bound is that of ``A0 . start - sum beta s (x - c)`` over the box, a lower bound of
      ``A0 . start`` wherever ``s (x - c) >= 0`` (x the node's input, c its threshold) when
      ``beta >= 0`` (β-CROWN's split constraints, `verify.beta_crown`).
    record: if given, receives the coefficients ``[S, *shape]`` reaching each such
      node's output (for branching heuristics) and, as ``"input"``, the input's.

  Returns:
    ``[S, N]`` lower bounds.
  """
  order = ancestors(start)
  acc: dict[int, jax.Array] = {start.index: A0}
  total = jnp.zeros(A0.shape[:2], A0.dtype)

  def add(node: Node, A: jax.Array):
    if node.index in acc:
      acc[node.index] = acc[node.index] + A
    else:
      acc[node.index] = A

  for node in reversed(order):
    A = acc.pop(node.index, None)
    if A is None:
      continue
    if node.index in stop or node.name == "input":
      if record is not None and node.name == "input":
        record["input"] = A
      total = total + concretize(A, bounds[node.index])
      continue
    kind = node_kind(node)
    if kind == "identity":
      add(node.inputs[node.bounded_inputs[0]], A)
    elif kind == "affine":
      pos = node.bounded_inputs
      zeros = [jnp.zeros(node.inputs[p].shape, node.inputs[p].dtype) for p in pos]
      out0, vjp = jax.vjp(_linear_map(node), *zeros)
      cts = jax.vmap(vjp)(A.astype(out0.dtype))
      for p, ct in zip(pos, cts):
        add(node.inputs[p], ct)
      if primitives.kind(node) == "affine":  # a constant term
        total = total + _sum_rest(A * out0[None])
    elif kind in ("relu", "elementwise"):
      x = node.inputs[node.bounded_inputs[0]]
      alpha = None if alphas is None else alphas.get(node.index)
      r = _elementwise_relaxation(node, bounds[x.index], alpha)
      pos_part = A >= 0
      if record is not None and kind == "relu":
        record[node.index] = A
      add(x, jnp.where(pos_part, A * r.lw, A * r.uw))
      total = total + _sum_rest(rx.line_terms(A, r.lb, r.ub))
      beta = None if betas is None else betas.get(node.index)
      if beta is not None:
        add(x, -beta)
        total = total + _sum_rest(beta * primitives.relu_threshold(node, A.dtype)[1][None])
    elif kind == "interval":
      total = total + concretize(A, bounds[node.index])
    elif kind == "product":
      a, b = node.inputs
      ba, bb = bounds[a.index], bounds[b.index]
      r = rx.mccormick(ba.lower, ba.upper, bb.lower, bb.upper)
      pos_part = A >= 0
      add(a, jnp.where(pos_part, A * r.wa_l, A * r.wa_u))
      add(b, jnp.where(pos_part, A * r.wb_l, A * r.wb_u))
      total = total + _sum_rest(rx.line_terms(A, r.c_l, r.c_u))
    elif kind == "pool":
      x = node.inputs[0]
      mask, dominated, upper_const = _pool_relaxation(node, bounds[x.index])
      coef = jnp.where(A >= 0, A, jnp.where(dominated, A, 0.0))
      total = total + _sum_rest(jnp.where((A < 0) & ~dominated, A * upper_const, 0.0))

      def select(v, mask=mask, node=node):
        return jnp.sum(_window_stack(node, v, 0.0) * mask, axis=-1)

      _, vjp = jax.vjp(select, jnp.zeros(x.shape, x.dtype))
      (ct,) = jax.vmap(vjp)(coef)
      add(x, ct)
    else:
      _check_crown_node(node)
  return total


# ----------------------------------------------------------------------------------------------
# Intermediate bounds.


def relaxed_inputs(graph: Graph) -> list[Node]:
  """Nodes whose bounds some relaxation needs, in topological order."""
  need: dict[int, Node] = {}
  for node in graph.nodes:
    kind = node_kind(node)
    if kind in ("relu", "elementwise", "pool"):
      x = node.inputs[node.bounded_inputs[0]]
      need[x.index] = x
    elif kind in ("product", "interval"):
      for p in node.bounded_inputs:
        need[node.inputs[p].index] = node.inputs[p]
      if kind == "interval":
        need[node.index] = node
  return [need[i] for i in sorted(need)]


def ibp_exact_nodes(graph: Graph) -> set[int]:
  """Nodes whose IBP bounds are exact: a single mixing affine map of a box, then elementwise."""
  raw: dict[int, bool] = {}
  exact: dict[int, bool] = {}
  for node in graph.nodes:
    ins = [node.inputs[p] for p in node.bounded_inputs]
    if node.name == "input":
      raw[node.index] = exact[node.index] = True
    elif (primitives.flag(node, "one_to_one") and len(ins) == 1 and
          node_kind(node) in ("affine", "identity")):
      raw[node.index] = raw[ins[0].index]
      exact[node.index] = exact[ins[0].index]
    elif primitives.family(node) in ("broadcast", "padding") and len(ins) == 1:
      raw[node.index] = False
      exact[node.index] = exact[ins[0].index]
    elif primitives.flag(node, "mixing") and len(ins) == 1 and node_kind(node) == "affine":
      raw[node.index] = False
      exact[node.index] = raw[ins[0].index]
    else:
      raw[node.index] = exact[node.index] = False
  return {i for i, e in exact.items() if e}


def _default_chunk(node: Node, budget: int) -> int:
  """Rows per backward pass keeping one coefficient array under ``budget`` elements."""
  biggest = max(math.prod(a.shape) for a in ancestors(node))
  return max(1, budget // (2 * max(biggest, 1)))


def node_bounds_by_backward(node: Node,
                            bounds: dict[int, Interval],
                            chunk_size: int | None = None,
                            needed: jax.Array | None = None,
                            fallback: Interval | None = None) -> Interval:
  """CROWN bounds of the elements of ``node`` (identity specification, in chunks).

  A convolution's output whose backward chain `verify.patches` covers is bounded
  in patches, every element at once (``needed`` then only chooses between the
  result and ``fallback``); any other node by dense rows, in chunks.

  Args:
    node: a node ``[N, ...]``.
    bounds: bounds needed by the backward pass (inputs, earlier relaxations).
    chunk_size: neurons per backward pass (each pass bounds them from both sides).
    needed: optional bool ``[N, ...]``: only these elements get a backward pass;
      the others take ``fallback``. Each example's needed elements are processed
      first, and chunks past the largest count are skipped at run time.
    fallback: bounds for the elements that are not needed.

  Returns:
    `Interval` of the node's shape.
  """
  n, rest = node.shape[0], node.shape[1:]
  m = math.prod(rest)
  dtype = node.dtype
  policy = backend.fast_paths()
  patch_plan = patches.plan(node)
  if patch_plan is not None:

    def relaxation(user: Node) -> rx.Relaxation:
      return _elementwise_relaxation(user, bounds[user.inputs[user.bounded_inputs[0]].index])

    lower, upper = patches.bound_node(patch_plan, node, bounds, relaxation, chunk_size,
                                      policy.chunk_budget)
    if needed is not None:
      lower = jnp.where(needed, lower, fallback.lower)
      upper = jnp.where(needed, upper, fallback.upper)
    return _ordered(lower, upper)
  chunk, n_chunks = balanced_chunks(m, chunk_size or _default_chunk(node, policy.chunk_budget))
  if needed is None:
    order = jnp.broadcast_to(jnp.arange(m), (n, m))
    count = m
  else:
    flat = needed.reshape(n, m)
    order = jnp.argsort(~flat, axis=1, stable=True)
    count = jnp.max(jnp.sum(flat, axis=1))
  padded = jnp.pad(order, ((0, 0), (0, n_chunks * chunk - m)))

  def run_rows(idx):  # [N, chunk] neuron indices -> [2 chunk, N]
    start, rows, bias = identity_rows(node, idx)
    return backward(start, jnp.concatenate([rows, -rows], axis=0), bounds) + jnp.concatenate(
        [bias, -bias], axis=0)

  if n_chunks == 1:
    out = run_rows(padded)[None]
  else:

    def run(c):
      idx = lax.dynamic_slice_in_dim(padded, c * chunk, chunk, axis=1)
      if needed is None:
        return run_rows(idx)
      return lax.cond(c * chunk < count, run_rows, lambda _: jnp.zeros((2 * chunk, n), dtype), idx)

    out = map_chunks(run, jnp.arange(n_chunks))  # [chunks, 2 chunk, N]
  lower_sorted = out[:, :chunk].reshape(-1, n)[:m].T  # [N, m] in `order`
  upper_sorted = -out[:, chunk:].reshape(-1, n)[:m].T
  inverse = jnp.argsort(order, axis=1)
  lower = jnp.take_along_axis(lower_sorted, inverse, axis=1).reshape(node.shape)
  upper = jnp.take_along_axis(upper_sorted, inverse, axis=1).reshape(node.shape)
  if needed is not None:
    lower = jnp.where(needed, lower, fallback.lower)
    upper = jnp.where(needed, upper, fallback.upper)
  return _ordered(lower, upper)


def _ordered(lower: jax.Array, upper: jax.Array) -> Interval:
  """Bounds from two separate passes, in order: where they cross (by rounding, on a box a
  few ulps wide) the value lies between them either way."""
  return Interval(jnp.minimum(lower, upper), jnp.maximum(lower, upper))


def _unstable(node: Node, users: list[Node], box: Interval) -> jax.Array | None:
  """Elements whose relaxation depends on their bounds; None if all may (not all ReLUs)."""
  mask = jnp.zeros(node.shape, bool)
  for user in users:
    kind = node_kind(user)
    if kind in ("affine", "identity"):
      continue
    if kind != "relu":
      return None
    _, c = primitives.relu_threshold(user, node.dtype)
    mask = mask | ((box.lower < c) & (box.upper > c))
  return mask


def intermediate_bounds(graph: Graph,
                        boxes: list[Interval],
                        method: str,
                        chunk_size: int | None = None,
                        intersect: bool = False) -> dict[int, Interval]:
  """Bounds of the inputs of every nonlinearity: from IBP (``crown_ibp``) or CROWN.

  With ``crown``, every such node gets a backward pass (auto_LiRPA's default),
  except a node that is a single affine map of the input box, whose IBP bounds
  are exact, and the output of an elementwise function (a ReLU before a max
  pool) of a node that has bounds, which gets the function's range over them.
  Only elements left unstable by IBP get a backward pass when the node feeds
  ReLUs only (the others are stable either way, as auto_LiRPA's sparse
  intermediate bounds). The bounds of a node feeding any other nonlinearity
  are intersected with IBP's: that keeps a relaxation inside its function's
  domain (``sqrt`` of ``relu(x) + c``, whose backward lower bound may be below
  0, where auto_LiRPA gives NaN). A node feeding ReLUs only keeps auto_LiRPA's
  bounds: the adaptive ReLU slopes make the final bound non-monotone in them
  (intersecting loosened 14 of 464 of auto_LiRPA's CROWN bounds on its
  ``resblock_bn_avgpool`` network by up to 3.5e-4, while tightening 239);
  ``intersect`` intersects them too (for the MILP, whose encoding only gains).

  Returns a dict with the input boxes and those bounds (and, for ``crown_ibp``,
  every node's IBP bounds).
  """
  for node in graph.nodes:
    _check_crown_node(node)
  ibp_bounds = ibp_propagate(graph, boxes)
  if method == "crown_ibp":
    return ibp_bounds
  bounds = {n.index: b for n, b in zip(graph.inputs, boxes)}
  exact = ibp_exact_nodes(graph)
  users = consumers(graph)
  for node in relaxed_inputs(graph):
    if node.index in bounds:
      continue
    if node.index in exact:
      bounds[node.index] = ibp_bounds[node.index]
      continue
    if node_kind(node) == "interval" or not jnp.issubdtype(node.dtype, jnp.floating):
      # No linear relaxation (or not a real value): the IBP rule over its operands' bounds.
      ib = ibp_bounds[node.index]
      if all(node.inputs[p].index in bounds for p in node.bounded_inputs):
        ins = [bounds[a.index] if isinstance(a, Node) else a for a in node.inputs]
        b = ibp_node(node, ins)
        ib = _ordered(jnp.maximum(b.lower, ib.lower), jnp.minimum(b.upper, ib.upper))
      bounds[node.index] = ib
      continue
    elementwise = node_kind(node) in ("relu", "elementwise")
    if elementwise and node.inputs[node.bounded_inputs[0]].index in bounds:
      # The output of an elementwise function of a bounded node (a ReLU feeding a max pool): the
      # function's range over its input's bounds, as auto_LiRPA; a backward pass through its
      # relaxation would be looser (e.g. a ReLU's lower line of slope 1 reaches below 0).
      ins = [bounds[a.index] if isinstance(a, Node) else a for a in node.inputs]
      bounds[node.index] = ibp_node(node, ins)
      continue
    _check_batch_first(node, graph)
    ib = ibp_bounds[node.index]
    needed = _unstable(node, users[node.index], ib)
    b = node_bounds_by_backward(node, bounds, chunk_size, needed, ib)
    if needed is None or intersect:
      b = _ordered(jnp.maximum(b.lower, ib.lower), jnp.minimum(b.upper, ib.upper))
    bounds[node.index] = b
  return bounds


def _check_batch_first(node: Node, graph: Graph) -> None:
  n = graph.inputs[0].shape[0] if graph.inputs[0].shape else None
  if not node.shape or node.shape[0] != n:
    raise InputError(f"backward bound propagation needs the batch axis first on every "
                     f"nonlinearity input; {node.describe()} has shape {node.shape}")


# ----------------------------------------------------------------------------------------------
# Public entry points.


def _prepare(fn: Callable, interval: Interval, spec):
  if not isinstance(interval, Interval):
    raise InputError(f"expected an Interval of inputs [N, ...], got {type(interval).__name__}")
  if len(interval.shape) < 1:
    raise InputError("the input interval needs a leading batch axis")
  graph, boxes = build_graph(fn, [interval])
  _check_batch_axes(fn, interval, graph)
  if len(graph.outputs) != 1:
    raise InputError(f"fn must return one array [N, K], got {len(graph.outputs)} outputs")
  out = graph.outputs[0]
  out_shape = tuple(out.shape) if isinstance(out, Node) else tuple(jnp.shape(out))
  n = interval.shape[0]
  if not out_shape or out_shape[0] != n:
    raise InputError(f"fn must keep the batch axis first: input batch {n}, output shape "
                     f"{out_shape}")
  if spec is not None:
    spec = jnp.asarray(spec)
    if spec.ndim != 3 or spec.shape[0] != n or (len(out_shape)
                                                != 2) or spec.shape[2] != out_shape[1]:
      raise InputError(f"spec must have shape [N={n}, S, K={out_shape[1:]}] for outputs of shape "
                       f"{out_shape}, got {tuple(spec.shape)}")
  return graph, boxes, out, out_shape, spec


def _check_batch_axes(fn: Callable, interval: Interval, graph: Graph) -> None:
  """Refuses a graph some node of which does not hold one example per index of its first axis.

  Backward passes keep coefficients as ``[S, N, ...]`` and sum each node's constant
  terms per example over its trailing axes, which is right only when every node
  keeps the batch axis first. The function is traced once more with one more
  example: a node whose first axis does not grow by one (a transposed batch, a
  mean over the batch) is refused, naming it. A function that only runs at its
  own batch size gets the weaker check that every node's first axis is the batch
  size. Shapes alone miss an operation that keeps them while reordering or
  mixing examples (``x[::-1]``, a cumulative sum or a product over the batch):
  each node's record must also say that its row ``i`` depends on row ``i`` of
  its operands only (`verify.primitives.Primitive.rows`).
  """
  n = interval.shape[0]
  zeros = lambda shape: Interval(jnp.zeros(shape, interval.dtype), jnp.zeros(shape, interval.dtype))
  # Traced again where the function's own constants are values even under an outer jit, so
  # that a rule can read them (``h[jnp.arange(n), y]`` gathers each example's own row).
  with jax.ensure_compile_time_eval():
    same, _ = build_graph(fn, [zeros(interval.shape)])
    try:
      other, _ = build_graph(fn, [zeros((n + 1,) + tuple(interval.shape[1:]))])
    except Exception:  # pylint: disable=broad-except
      other = None  # a function of one batch size (it closes over per-example constants)
  if len(same.nodes) != len(graph.nodes):
    raise InputError("backward bound propagation needs a function that traces the same way "
                     "twice; its graph changed")
  for a in same.nodes:
    if a.primitive is not None and not primitives.flag(a, "rows"):
      raise InputError(f"bound propagation reads the first axis as the examples, and "
                       f"{a.describe()} reorders, mixes or moves it; keep the batch axis first "
                       "and each example's computation apart")
  if other is None:
    # Only the shapes can be checked.
    for a in graph.nodes:
      if not a.shape or a.shape[0] != n:
        raise InputError(f"backward bound propagation needs the batch axis first on every "
                         f"operation; {a.describe()} has shape {a.shape} for {n} "
                         "examples") from None
    return
  if len(other.nodes) != len(graph.nodes):
    raise InputError("backward bound propagation needs a function whose operations do not "
                     "depend on the batch size; its graph changed with one more example")
  for a, b in zip(graph.nodes, other.nodes):
    if a.shape and b.shape == (a.shape[0] + 1,) + tuple(a.shape[1:]):
      continue
    raise InputError(f"backward bound propagation needs the batch axis first on every "
                     f"operation, with examples independent; {a.describe()} has shape "
                     f"{a.shape} for {n} examples and {b.shape} for {n + 1}")


def _spec_rows(out_shape, spec, dtype):
  """``[S, N, *rest]`` rows to bound from below, and how to read the result."""
  n, rest = out_shape[0], out_shape[1:]
  if spec is None:
    k = math.prod(rest)
    eye = jnp.eye(k, dtype=dtype)
    rows = jnp.concatenate([eye, -eye], axis=0)  # [2K, K]
    A = jnp.broadcast_to(rows[:, None, :], (2 * k, n, k)).reshape((2 * k, n) + rest)
    return A, True
  return jnp.transpose(spec, (1, 0, 2)).astype(dtype), False


def _output_backward(out, A, bounds, chunk_size, stop=frozenset()):
  """Lower bounds ``[S, N]`` of the rows ``A`` of the output, chunked over rows."""
  if not isinstance(out, Node):
    return _sum_rest(A * jnp.asarray(out)[None])
  s = A.shape[0]
  chunk, n_chunks = balanced_chunks(
      s, chunk_size or _default_chunk(out,
                                      backend.fast_paths().chunk_budget))
  if n_chunks == 1:
    return backward(out, A, bounds, stop)
  pad = n_chunks * chunk - s
  if pad:
    A = jnp.concatenate([A, jnp.zeros((pad,) + A.shape[1:], A.dtype)])
  res = map_chunks(lambda a: backward(out, a, bounds, stop),
                   A.reshape((n_chunks, chunk) + A.shape[1:]))
  return res.reshape((n_chunks * chunk,) + res.shape[2:])[:s]


def check_chunk_size(chunk_size: int | None) -> None:
  """None (the default size) or an integer >= 1."""
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or
                                 isinstance(chunk_size, bool) or chunk_size < 1):
    raise InputError(f"chunk_size must be an integer >= 1 or None (a size by the backend "
                     f"policy), got {chunk_size!r}")


@primitives.highest_precision
def _bound(fn, interval, spec, method, chunk_size):
  check_chunk_size(chunk_size)
  graph, boxes, out, out_shape, spec = _prepare(fn, interval, spec)
  bounds = intermediate_bounds(graph, boxes, method, chunk_size)
  A, logits = _spec_rows(out_shape, spec, interval.dtype)
  if not logits:
    # Upper bounds are lower bounds of the negated specification.
    A = jnp.concatenate([A, -A], axis=0)
  rows = _output_backward(out, A, bounds, chunk_size)
  k = rows.shape[0] // 2
  lower, upper = rows[:k].T, -rows[k:].T
  if logits:
    lower, upper = lower.reshape(out_shape), upper.reshape(out_shape)
  return ordered(lower, upper)


def crown(fn: Callable,
          interval: Interval,
          spec: jax.typing.ArrayLike | None = None,
          chunk_size: int | None = None) -> Interval:
  """CROWN bounds on ``spec @ fn(x)`` for ``x`` in ``interval``.

  Every input of a nonlinearity gets bounds from its own backward pass (as
  auto_LiRPA's CROWN); a first affine layer of the input gets its (exact) IBP
  bounds, and elements of a ReLU input that IBP finds stable keep IBP bounds.

  Args:
    fn: ``fn(x) -> [N, K]``, made of supported primitives, examples independent.
    interval: the input box ``[N, ...]``.
    spec: ``C`` of shape ``[N, S, K]``; None for bounds on ``fn(x)`` itself.
    chunk_size: specification rows (or neurons) per backward pass; None picks a
      size keeping one coefficient array under the backend policy's chunk budget
      (`robustlib.backend`; 32 MB on CPU).

  Returns:
    `Interval` ``[N, S]`` on ``C @ fn(x)`` (``[N, K]`` without a spec).

  Example:
    >>> b = verify.crown(logits_fn, verify.linf_ball(x, 0.03), verify.margin_spec(y, 10))
  """
  return _bound(fn, interval, spec, "crown", chunk_size)


def crown_ibp(fn: Callable,
              interval: Interval,
              spec: jax.typing.ArrayLike | None = None,
              chunk_size: int | None = None) -> Interval:
  """CROWN-IBP bounds: IBP bounds for intermediate nodes, CROWN from the output.

  Same arguments and result as `crown`; the cheap method for certified training.
  """
  return _bound(fn, interval, spec, "crown_ibp", chunk_size)


@primitives.highest_precision
def lower_bounds(fn: Callable,
                 interval: Interval,
                 spec: jax.typing.ArrayLike,
                 method: str,
                 chunk_size: int | None = None) -> jax.Array:
  """Only the lower bounds ``[N, S]`` of ``spec @ fn(x)`` (half the work of `crown`)."""
  check_chunk_size(chunk_size)
  graph, boxes, out, out_shape, spec = _prepare(fn, interval, spec)
  if method == "ibp":
    bounds = ibp_propagate(graph, boxes)
    stop = fold_frontier(out)
    A = jnp.transpose(spec, (1, 0, 2)).astype(interval.dtype)
    if not isinstance(out, Node):
      return _sum_rest(A * jnp.asarray(out)[None]).T
    return backward(out, A, bounds, stop).T
  bounds = intermediate_bounds(graph, boxes, method, chunk_size)
  A, _ = _spec_rows(out_shape, spec, interval.dtype)
  return _output_backward(out, A, bounds, chunk_size).T


def fold_frontier(out: Node) -> frozenset[int]:
  """Where IBP with a specification stops folding it backward.

  The specification is folded through the output's trailing elementwise affine
  operations and into the last matrix product or convolution (as auto_LiRPA folds
  ``C`` into a final linear layer); IBP bounds are used from there on.
  """
  stop: set[int] = set()
  stack, seen = [out], set()
  while stack:
    node = stack.pop()
    if node.index in seen:
      continue
    seen.add(node.index)
    kind = node_kind(node)
    if kind in ("affine", "identity") and primitives.flag(node, "mixing"):
      stop.update(node.inputs[p].index for p in node.bounded_inputs)
    elif kind in ("affine", "identity") and (primitives.flag(node, "one_to_one") or
                                             primitives.family(node) == "broadcast"):
      stack.extend(node.inputs[p] for p in node.bounded_inputs)
    else:
      stop.add(node.index)
  return frozenset(stop)

"""The one registry of what the bound passes know about each JAX primitive.

Every primitive that IBP, CROWN, CROWN-IBP, alpha-CROWN, the patch and row fast
paths and the MILP encoding accept has exactly one `Primitive` record here: its
interval rule, its kind for backward propagation, whether it keeps every element
in place, whether it is an elementwise affine map ``y = s * x + t`` of its bounded
operand, how the fast paths may treat it, whether its float result is exact, and
whether it keeps the examples of the batch axis apart and in order (`rows`).
Every other module asks this one (`lookup`, `kind`, `record`); nothing else in
`verify/` names a primitive. A primitive without a record is refused with an
`UnsupportedPrimitiveError` naming it and the user's source line.

The graph builder (`verify.graph`) also takes its structural knowledge from here:
which primitives are calls to inline (`CALLS`), and which are rewritten into
simpler ones before any bound is computed (`EXPANSIONS`: ``clamp``, ``max``/``min``
of two bounded values, ``optimization_barrier`` removed, ``scan`` unrolled, ``cond`` on a constant index, generic
``reduce``/``reduce_window`` with a max/min/add body).

Adding an activation is one record below (its IBP rule, ``kind="elementwise"``
and its linear relaxation in `verify.relaxations`).

Kinds for backward propagation (`kind`):
  ``identity``: passes its operand through (its VJP would be zero: stop_gradient);
  ``linear``: linear in its bounded operands (no constant term);
  ``affine``: affine in its bounded operands (a constant term, found by applying
    it to zeros);
  ``relu``: ``max``/``min`` of a bounded value and a constant;
  ``elementwise``: a nonlinear function of one bounded value with a linear
    relaxation (`relaxation`);
  ``pool``: a max over windows of one bounded value;
  ``product``: an elementwise product of two bounded values (McCormick planes);
  ``interval``: no linear relaxation (comparisons, selections by a bounded
    predicate, steps, quotients of bounded values, ...): backward passes take
    the node's interval bounds, as if it were an input;
  ``unsupported``: refused by backward passes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib import jax_internals as ji
from robustlib.checks import InputError
from verify import error_rules as er
from verify import relaxations as rx
from verify.interval import Interval


class UnsupportedPrimitiveError(InputError):
  """A primitive without a (sound) bound rule was applied to a bounded value."""


# A scan (so a fori_loop with static bounds) is unrolled when it runs at most this many steps.
MAX_UNROLL = 256

IbpRule = Callable[..., Interval]


def _is_iv(x) -> bool:
  return isinstance(x, Interval)


def _ends(x, upper: bool):
  if _is_iv(x):
    return x.upper if upper else x.lower
  return x


def is_low_float(dtype) -> bool:
  """Whether ``dtype`` is a floating type narrower than float32 (bfloat16, float16, fp8)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


# ----------------------------------------------------------------------------------------------
# IBP rules.


def monotone(*signs: int) -> IbpRule:
  """A rule for a primitive monotone in each operand (+1 increasing, -1 decreasing, 0 constant)."""

  def rule(node, *ins) -> Interval:
    lo_args, hi_args = [], []
    for i, x in enumerate(ins):
      s = signs[i] if i < len(signs) else signs[-1]
      lo_args.append(_ends(x, upper=s < 0))
      hi_args.append(_ends(x, upper=s > 0))
    return Interval(node.apply(*lo_args), node.apply(*hi_args))

  return rule


_INC = monotone(1)
_DEC = monotone(-1)


def _bilinear(node, a, b) -> Interval:
  """``f(a, b)`` bilinear (dot_general, conv): center-radius forms."""
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


def _mul(node, a, b) -> Interval:
  if _is_iv(a) and _is_iv(b):
    cands = [a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper]
    lo = jnp.minimum(jnp.minimum(cands[0], cands[1]), jnp.minimum(cands[2], cands[3]))
    hi = jnp.maximum(jnp.maximum(cands[0], cands[1]), jnp.maximum(cands[2], cands[3]))
    return Interval(lo, hi)
  x, c = (a, b) if _is_iv(a) else (b, a)
  p, q = x.lower * c, x.upper * c
  return Interval(jnp.minimum(p, q), jnp.maximum(p, q))


def _div(node, a, b) -> Interval:
  if _is_iv(b):
    # 1 / b for b of constant sign; a sign change makes the quotient unbounded.
    crosses = (b.lower <= 0) & (b.upper >= 0)
    inv = Interval(jnp.where(crosses, -jnp.inf, 1 / b.upper),
                   jnp.where(crosses, jnp.inf, 1 / b.lower))
    return _mul(node, a, inv)
  p, q = a.lower / b, a.upper / b
  return Interval(jnp.minimum(p, q), jnp.maximum(p, q))


def _abs(node, x: Interval) -> Interval:
  l, u = x.lower, x.upper
  lo = jnp.where(l >= 0, l, jnp.where(u <= 0, -u, jnp.zeros_like(l)))
  hi = jnp.maximum(jnp.abs(l), jnp.abs(u))
  return Interval(lo, hi)


def _even_power(x: Interval, n: int) -> Interval:
  a = _abs(None, x)
  return Interval(a.lower**n, a.upper**n)


def _integer_pow(node, x: Interval) -> Interval:
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


def _square(node, x: Interval) -> Interval:
  return _even_power(x, 2)


def _select_n(node, pred, *cases) -> Interval:
  """``cases[pred]``: with a bounded predicate, the hull of the cases it may pick."""
  if not _is_iv(pred):
    return monotone(0, *([1] * len(cases)))(node, pred, *cases)
  p_lo, p_hi = (jnp.asarray(v).astype(jnp.int32) for v in (pred.lower, pred.upper))
  lo = hi = None
  for k, case in enumerate(cases):
    c_lo, c_hi = _ends(case, False), _ends(case, True)
    c_lo, c_hi = jnp.broadcast_to(c_lo, node.shape), jnp.broadcast_to(c_hi, node.shape)
    may = (p_lo <= k) & (k <= p_hi)
    c_lo, c_hi = jnp.where(may, c_lo, jnp.inf), jnp.where(may, c_hi, -jnp.inf)
    lo = c_lo if lo is None else jnp.minimum(lo, c_lo)
    hi = c_hi if hi is None else jnp.maximum(hi, c_hi)
  return Interval(lo, hi)


def _const_index_op(node, x, *rest) -> Interval:
  if any(_is_iv(r) for r in rest):
    raise UnsupportedPrimitiveError(f"'{node.name}' with bounded indices at {node.source} is "
                                    "not supported")
  return monotone(1, 0)(node, x, *rest)


def _convert(node, x: Interval) -> Interval:
  """A cast: monotone (truncation to integers, rounding between floats), except to bool."""
  new = jnp.dtype(node.params["new_dtype"])
  if new == jnp.bool_:
    # x != 0: certainly True when 0 is outside [l, u], certainly False when l = u = 0.
    l, u = x.lower, x.upper
    return Interval((l > 0) | (u < 0), (l != 0) | (u != 0))
  if jnp.issubdtype(new, jnp.integer) and jnp.issubdtype(x.dtype, jnp.floating):
    info = jnp.iinfo(new)
    # Casts of out-of-range values are implementation defined: clip first, as every backend
    # then agrees (truncation towards zero, monotone).
    lo, hi = float(info.min), float(np.nextafter(np.float32(info.max), np.float32(0)))
    return Interval(node.apply(jnp.clip(x.lower, lo, hi)), node.apply(jnp.clip(x.upper, lo, hi)))
  return _INC(node, x)


def _compare(signs: tuple[int, int]) -> IbpRule:
  """A comparison as a monotone function with values False < True."""
  return monotone(*signs)


# ----------------------------------------------------------------------------------------------
# Records.


def _kind_const(kind: str) -> Callable[[Any], str]:
  return lambda node: kind


def _one_bounded(kind: str) -> Callable[[Any], str]:
  """``kind`` when exactly one operand is bounded (bilinear primitives), else an interval."""
  return lambda node: kind if len(node.bounded_inputs) == 1 else "interval"


def _first_bounded(kind: str) -> Callable[[Any], str]:
  """``kind`` when only the first operand is bounded (indices and divisors fixed), else an
  interval."""
  return lambda node: kind if node.bounded_inputs == [0] else "interval"


def _mul_kind(node) -> str:
  if len(node.bounded_inputs) == 1:
    return "linear"
  same = all(tuple(a.shape) == tuple(node.shape) for a in node.inputs)
  return "product" if same else "interval"


def _float_operands(node) -> bool:
  return all(jnp.issubdtype(a.dtype, jnp.floating)
             for a in node.inputs
             if hasattr(a, "dtype")) and (jnp.issubdtype(node.dtype, jnp.floating))


def _convert_kind(node) -> str:
  # Casts between floats of at least the bounds' precision are identities; casts to a lower
  # precision are rewritten by the graph builder into `reduce_precision`; to int or bool
  # they are step functions, bounded by IBP only.
  return "linear" if _float_operands(node) else "interval"


def _stack_kind(node) -> str:
  return "affine" if len(node.bounded_inputs) < len(node.inputs) else "linear"


def _equality(negate: bool) -> IbpRule:
  """``a == b`` (or ``!=``): certain where both are one equal value, impossible where the
  intervals are apart; a value compared with itself (a NaN test) is always equal."""

  def rule(node, a, b) -> Interval:
    if a is b:
      same = jnp.ones(node.shape, bool)
      return Interval(same != negate, same != negate)
    lo = lambda v: _ends(v, False)
    hi = lambda v: _ends(v, True)
    overlap = (lo(a) <= hi(b)) & (lo(b) <= hi(a))
    certain = (lo(a) == hi(a)) & (lo(b) == hi(b)) & (lo(a) == lo(b))
    lower, upper = (~overlap, ~certain) if negate else (certain, overlap)
    return Interval(jnp.broadcast_to(lower, node.shape), jnp.broadcast_to(upper, node.shape))

  return rule


def _is_finite(node, x: Interval) -> Interval:
  """Certainly finite where both ends are; possibly not elsewhere (an overflow)."""
  sure = jnp.isfinite(x.lower) & jnp.isfinite(x.upper)
  return Interval(sure, jnp.ones_like(sure))


def _select_kind(node) -> str:
  if 0 in node.bounded_inputs:
    return "interval"
  return "affine" if len(node.bounded_inputs) < len(node.inputs) - 1 else "linear"


def _gather_kind(node) -> str:
  if node.bounded_inputs != [0]:
    return "interval"
  # Out-of-bounds indices take the fill value: a constant term.
  mode = node.params.get("mode")
  fills = mode is not None and "FILL" in str(mode).upper()
  return "affine" if fills else "linear"


def _pow_kind(node) -> str:
  return "elementwise" if node.params["y"] >= 0 else "unsupported"


def _pool_kind(node) -> str:
  if any(d != 1 for d in node.params.get("base_dilation", ())):
    return "interval"
  return "pool"


def _relu_kind(node) -> str:
  return "relu" if len(node.bounded_inputs) == 1 else "interval"


# Rows: whether row ``i`` of a node's value (the batch axis, first) depends on row ``i`` of
# its bounded operands only. Bound passes read a node's first axis as the examples, so an
# operation that reorders, mixes, drops or moves that axis is refused (`verify.crown`).


def _each_row(node) -> bool:
  """Elementwise: every bounded operand has the node's shape, up to axes of size 1 broadcast
  (as ``lax.mul`` of ``[N, K, 1]`` and ``[1, 1, M]``) other than the batch axis."""
  out = tuple(node.shape)
  for i in node.bounded_inputs:
    shape = tuple(node.inputs[i].shape)
    if len(shape) != len(out) or shape[:1] != out[:1] or any(
        d not in (1, o) for d, o in zip(shape, out)):
      return False
  return True


def _batch_size(node) -> int:
  return node.inputs[node.bounded_inputs[0]].shape[0]


def _axis_not_first(param: str) -> Callable[[Any], bool]:
  """A primitive along one axis (``params[param]``) other than the batch axis."""
  return lambda node: node.params[param] != 0 and _each_row_count(node)


def _each_row_count(node) -> bool:
  return all(node.inputs[i].shape[:1] == node.shape[:1] for i in node.bounded_inputs)


def _axes_not_first(param: str) -> Callable[[Any], bool]:
  """A primitive over some axes (``params[param]``), none of them the batch axis."""
  return lambda node: 0 not in tuple(node.params[param]) and _each_row_count(node)


def _rows_transpose(node) -> bool:
  return tuple(node.params["permutation"])[:1] == (0,)


def _rows_reshape(node) -> bool:
  return node.params.get("dimensions") is None and _each_row_count(node)


def _rows_broadcast(node) -> bool:
  dims = tuple(node.params["broadcast_dimensions"])
  return dims[:1] == (0,) and _each_row_count(node)


def _rows_slice(node) -> bool:
  strides = node.params.get("strides") or (1,)
  return (node.params["start_indices"][0] == 0 and
          node.params["limit_indices"][0] == _batch_size(node) and strides[0] == 1)


def _rows_pad(node) -> bool:
  return tuple(node.params["padding_config"][0]) == (0, 0, 0) and node.bounded_inputs == [0]


def _rows_dynamic_slice(node) -> bool:
  return node.bounded_inputs == [0] and node.params["slice_sizes"][0] == _batch_size(node)


def _rows_gather(node) -> bool:
  """Rows kept: the batch axis fully sliced to output axis 0, or batched with the
  indices' first axis (``take_along_axis``, a vmapped index) that is output axis 0."""
  if node.bounded_inputs != [0]:
    return False
  dn = node.params["dimension_numbers"]
  if 0 in dn.start_index_map:
    return _gathers_own_row(node, dn)
  if 0 in dn.collapsed_slice_dims:
    return False
  if 0 in dn.operand_batching_dims:
    j = tuple(dn.operand_batching_dims).index(0)
    return dn.start_indices_batching_dims[j] == 0 and 0 not in dn.offset_dims
  return (node.params["slice_sizes"][0] == _batch_size(node) and tuple(dn.offset_dims)[:1] == (0,))


def _gathers_own_row(node, dn) -> bool:
  """Indices into the batch axis that are constant and pick row ``i`` for output row ``i``
  (``h[jnp.arange(n), y]``)."""
  index = node.inputs[1]
  if isinstance(index,
                jax.core.Tracer) or 0 in dn.offset_dims or node.params["slice_sizes"][0] != 1:
    return False
  rows = np.asarray(index)[..., tuple(dn.start_index_map).index(0)]
  n = node.shape[0]
  if rows.ndim < 1 or rows.shape[0] != n:
    return False
  return bool(np.all(rows == np.arange(n).reshape((n,) + (1,) * (rows.ndim - 1))))


def _rows_windows(node) -> bool:
  p = node.params
  return (p["window_dimensions"][0] == 1 and p["window_strides"][0] == 1 and
          tuple(p["padding"][0]) == (0, 0) and p.get("base_dilation", (1,))[0] == 1)


def _rows_dot(node) -> bool:
  """Each bounded operand's first axis is the output's first: the first batch dimension,
  or (without batch dimensions) a free axis coming first."""
  (lc, rc), (lb, rb) = node.params["dimension_numbers"]
  ranks = [len(a.shape) for a in node.inputs]
  lhs_free = [d for d in range(ranks[0]) if d not in lc and d not in lb]
  for pos, contract, batch in ((0, lc, lb), (1, rc, rb)):
    if pos not in node.bounded_inputs:
      continue
    if tuple(batch)[:1] == (0,):
      continue
    if batch or 0 in contract:
      return False
    if pos == 1 and lhs_free:
      return False
  return True


def _rows_conv(node) -> bool:
  lhs, _, out = node.params["dimension_numbers"]
  return (node.bounded_inputs == [0] and lhs[0] == 0 and out[0] == 0 and
          node.params.get("batch_group_count", 1) == 1)


@dataclasses.dataclass(frozen=True)
class Primitive:
  """What the bound passes know about one primitive.

  Attributes:
    name: the JAX primitive's name.
    ibp: ``rule(node, *operands) -> Interval`` (operands intervals or constants).
    kind: ``kind(node) -> str``, the node's kind for backward propagation (see the
      module docstring); may depend on which operands are bounded.
    relaxation: for ``elementwise`` kinds, ``relax(node, lower, upper) ->
      Relaxation`` of the function on the input's bounds.
    flat_order: ``f(node) -> bool``, whether it keeps every element's flat index (casts
      that are identities, copies, plain reshapes); the row fast path folds through it.
    scale_offset: for an elementwise affine map of its single bounded operand,
      ``f(node) -> (s, t)`` with ``y = s * x + t`` (constants broadcastable to the
      node); the patch and row fast paths push rows through it.
    one_to_one: maps elements one to one (IBP of it is exact on exact bounds).
    mixing: sums elements (IBP of it is exact only on a one-to-one image of a box).
    family: what the fast paths recognise structurally: ``"conv"``, ``"dense"``,
      ``"permute"``, ``"broadcast"``, ``"padding"`` or ``""``.
    precision: carries a ``precision`` parameter, set to HIGHEST in bound passes.
    exact: its float result is exactly the real one (structural moves, negation,
      max/min, selection): no rounding to account for.
    error: ``error(node, errs, boxes)``, how far its result moves when its operands
      move by ``errs`` (`verify.error_rules`); None takes the rule of its kind, or
      the IBP variation over the widened operands (sound for every primitive).
    reach: ``reach(node, mags, mag)``, the rounding of its own float result; None
      is none for an exact primitive and one rounding otherwise.
    rows: ``f(node) -> bool``, whether row ``i`` of its value depends on row ``i`` of its
      bounded operands only (the batch axis first, examples kept apart and in order);
      `_each_row` for elementwise primitives; a record without it is refused by bound
      passes.
    fenced: bound between optimization barriers (`bind`): XLA's CPU simplifier
      (jaxlib 0.10.2) folds a pad into a following windowed sum wrongly when an
      axis has size 1, as in a slice's transpose feeding a cumulative sum's in a
      backward pass (bounds of ``cumsum(h)[:, 2:3]`` were those of column 4).
  """
  name: str
  ibp: IbpRule
  kind: Callable[[Any], str]
  relaxation: Callable[..., rx.Relaxation] | None = None
  flat_order: Callable[[Any], bool] | None = None
  scale_offset: Callable[[Any], tuple[Any, Any]] | None = None
  one_to_one: bool = False
  mixing: bool = False
  family: str = ""
  precision: bool = False
  exact: bool = False
  error: Callable | None = None
  reach: Callable | None = None
  rows: Callable[[Any], bool] | None = None
  fenced: bool = False


def _const_operand(node):
  pos = node.bounded_inputs[0]
  return pos, node.inputs[1 - pos]


def _so_add(node):
  return 1.0, _const_operand(node)[1]


def _so_sub(node):
  pos, c = _const_operand(node)
  return (1.0, -jnp.asarray(c)) if pos == 0 else (-1.0, c)


def _so_mul(node):
  return _const_operand(node)[1], 0.0


def _so_div(node):
  c = node.inputs[1]
  if isinstance(c, jax.core.Tracer):
    return 1.0 / jnp.asarray(c, node.dtype), 0.0
  dtype = np.dtype(node.dtype)
  return dtype.type(1) / np.asarray(c, dtype), 0.0


def _so_neg(node):
  return -1.0, 0.0


def _so_identity(node):
  return 1.0, 0.0


def _guard(pred: Callable[[Any], bool], f):
  """``f`` where ``pred(node)`` holds, None elsewhere (as a `scale_offset` or `flat_order`)."""

  def guarded(node):
    return f(node) if pred(node) else None

  return guarded


def _single_const(node) -> bool:
  return len(node.bounded_inputs) == 1 and len(node.inputs) == 2


def _ordered(node, x: Interval) -> Interval:
  """A monotone function of one operand with its ends in order: a library function's float
  results need not be monotone at the last place (``f(l) > f(u)`` when ``u - l`` is an ulp)."""
  a, b = node.apply(x.lower), node.apply(x.upper)
  return Interval(jnp.minimum(a, b), jnp.maximum(a, b))


def _elementwise(name, ibp, relax=None, slope=None, reach=er.transcendental, **kw) -> Primitive:
  """An elementwise function: ``slope(lo, hi)`` bounds ``|f'|`` on ``[lo, hi]``."""
  if slope is not None:
    kw["error"] = er.slope(slope)
  return Primitive(name,
                   _ordered if reach is er.transcendental else ibp,
                   _kind_const("elementwise") if relax else _kind_const("interval"),
                   relaxation=relax,
                   one_to_one=True,
                   reach=reach,
                   rows=_each_row,
                   **kw)


def _relax_from(table_fn):
  return lambda node, l, u: table_fn(l, u)


def _relax_pow(node, l, u):
  return rx.power_relax(node.params["y"])(l, u)


def _round_ibp(node, x: Interval) -> Interval:
  """Rounding to a narrower format: within its rounding reach of the value, whether it keeps
  subnormals (a cast) or flushes them (XLA's reduce_precision)."""
  p = node.params
  r = rx.rounding_reach(x.lower, x.upper, p["exponent_bits"], p["mantissa_bits"])
  return Interval(x.lower - r, x.upper + r)


def _relax_round(node, l, u):
  return rx.rounding(node.params["exponent_bits"], node.params["mantissa_bits"])(l, u)


def _structural(name, ibp=_INC, kind="linear", **kw) -> Primitive:
  return Primitive(name,
                   ibp,
                   _kind_const(kind) if isinstance(kind, str) else kind,
                   exact=True,
                   **kw)


def _summing(name, rows, **kw) -> Primitive:
  """A sum of elements (rounded: its error grows with the number of terms)."""
  return Primitive(name,
                   _INC,
                   _kind_const("linear"),
                   mixing=True,
                   reach=er.reduction,
                   rows=rows,
                   **kw)


_IDENTITY_FLAT = lambda node: True
_PLAIN_RESHAPE = lambda node: node.params.get("dimensions") is None

_RECORDS = [
    # Structure: moves, copies, selections (exact; linear in the bounded operand).
    _structural("copy",
                flat_order=_IDENTITY_FLAT,
                one_to_one=True,
                scale_offset=_so_identity,
                rows=_each_row),
    _structural("copy_p",
                flat_order=_IDENTITY_FLAT,
                one_to_one=True,
                scale_offset=_so_identity,
                rows=_each_row),
    _structural("reshape", flat_order=_PLAIN_RESHAPE, one_to_one=True, rows=_rows_reshape),
    _structural("broadcast_in_dim", family="broadcast", rows=_rows_broadcast),
    _structural("transpose", family="permute", one_to_one=True, rows=_rows_transpose),
    _structural("squeeze", one_to_one=True, rows=_axes_not_first("dimensions")),
    _structural("expand_dims", one_to_one=True, rows=_axes_not_first("dimensions")),
    _structural("slice", one_to_one=True, rows=_rows_slice),
    _structural("rev", one_to_one=True, rows=_axes_not_first("dimensions")),
    _structural("concatenate", kind=_kind_const("affine"), rows=_axis_not_first("dimension")),
    _structural("stack", kind=_stack_kind, rows=_axis_not_first("axis")),
    _structural("pad", kind=_kind_const("affine"), family="padding", rows=_rows_pad),
    _structural("split", one_to_one=True, rows=_axis_not_first("axis")),
    _structural("real", one_to_one=True, rows=_each_row),
    _structural("dynamic_slice",
                ibp=_const_index_op,
                kind=_first_bounded("linear"),
                one_to_one=True,
                rows=_rows_dynamic_slice),
    _structural("gather", ibp=_const_index_op, kind=_gather_kind, rows=_rows_gather),
    _structural("select_n", ibp=_select_n, kind=_select_kind, error=er.select, rows=_each_row),
    _structural("stop_gradient",
                kind="identity",
                flat_order=_IDENTITY_FLAT,
                one_to_one=True,
                rows=_each_row),
    _structural("reduce_max", kind=_pool_kind, rows=_axes_not_first("axes")),
    _structural("reduce_window_max", kind=_pool_kind, rows=_rows_windows),
    _structural("reduce_min", kind="interval", rows=_axes_not_first("axes")),
    _structural("reduce_window_min", kind="interval", rows=_rows_windows),
    _structural("cummax", kind="interval", rows=_axis_not_first("axis")),
    _structural("cummin", kind="interval", rows=_axis_not_first("axis")),
    _structural("neg",
                ibp=_DEC,
                one_to_one=True,
                flat_order=_IDENTITY_FLAT,
                scale_offset=_so_neg,
                rows=_each_row),
    _structural("max", kind=_relu_kind, rows=_each_row),
    _structural("min", kind=_relu_kind, rows=_each_row),
    # Casts. Between floats an identity of the real-valued program (a narrowing cast is
    # rewritten into reduce_precision by the graph builder); to int and bool step functions.
    Primitive("convert_element_type",
              _convert,
              _convert_kind,
              flat_order=_guard(_float_operands, _IDENTITY_FLAT),
              one_to_one=True,
              scale_offset=_guard(_float_operands, _so_identity),
              reach=er.cast,
              rows=_each_row),
    _elementwise("reduce_precision",
                 _round_ibp,
                 _relax_round,
                 error=er.rounding_step,
                 exact=True,
                 reach=None),
    # Comparisons and logic (values False < True), for selections with a bounded predicate.
    _structural("gt", ibp=_compare((1, -1)), kind="interval", rows=_each_row),
    _structural("ge", ibp=_compare((1, -1)), kind="interval", rows=_each_row),
    _structural("lt", ibp=_compare((-1, 1)), kind="interval", rows=_each_row),
    _structural("is_finite", ibp=_is_finite, kind="interval", rows=_each_row),
    _structural("eq", ibp=_equality(negate=False), kind="interval", rows=_each_row),
    _structural("ne", ibp=_equality(negate=True), kind="interval", rows=_each_row),
    _structural("le", ibp=_compare((-1, 1)), kind="interval", rows=_each_row),
    _structural("and", kind="interval", rows=_each_row),
    _structural("or", kind="interval", rows=_each_row),
    _structural("not", ibp=_DEC, kind="interval", rows=_each_row),
    _structural("sign", kind="interval", rows=_each_row),
    _structural("floor", kind="interval", rows=_each_row),
    _structural("ceil", kind="interval", rows=_each_row),
    _structural("round", kind="interval", rows=_each_row),
    # Sums (rounded).
    Primitive("add",
              _INC,
              _kind_const("affine"),
              one_to_one=True,
              scale_offset=_guard(_single_const, _so_add),
              flat_order=_guard(_single_const, _IDENTITY_FLAT),
              rows=_each_row),
    Primitive("add_any", _INC, _kind_const("linear"), rows=_each_row),
    Primitive("sub",
              monotone(1, -1),
              _kind_const("affine"),
              one_to_one=True,
              scale_offset=_guard(_single_const, _so_sub),
              flat_order=_guard(_single_const, _IDENTITY_FLAT),
              rows=_each_row),
    _summing("reduce_sum", _axes_not_first("axes")),
    _summing("reduce_window_sum", _rows_windows, fenced=True),
    _summing("cumsum", _axis_not_first("axis"), fenced=True),
    # Products: linear in one bounded operand.
    Primitive("mul",
              _mul,
              _mul_kind,
              one_to_one=True,
              scale_offset=_guard(_single_const, _so_mul),
              error=er.products,
              rows=_each_row),
    Primitive("div",
              _div,
              _first_bounded("linear"),
              one_to_one=True,
              scale_offset=_guard(lambda n: n.bounded_inputs == [0], _so_div),
              error=er.quotient,
              rows=_each_row),
    Primitive("dot_general",
              _bilinear,
              _one_bounded("linear"),
              mixing=True,
              family="dense",
              precision=True,
              error=er.products,
              reach=er.contraction,
              rows=_rows_dot),
    Primitive("conv_general_dilated",
              _bilinear,
              _one_bounded("linear"),
              mixing=True,
              family="conv",
              precision=True,
              error=er.products,
              reach=er.contraction,
              rows=_rows_conv),
    # Elementwise nonlinearities with linear relaxations.
    _elementwise("tanh", _INC, _relax_from(rx.TANH), er.tanh_slope),
    _elementwise("logistic", _INC, _relax_from(rx.LOGISTIC), er.logistic_slope),
    _elementwise("exp", _INC, _relax_from(rx.EXP), er.exp_slope),
    _elementwise("expm1", _INC, _relax_from(rx.EXPM1), er.exp_slope),
    _elementwise("log", _INC, _relax_from(rx.LOG), er.log_slope),
    _elementwise("log1p", _INC, _relax_from(rx.LOG1P), er.log1p_slope),
    _elementwise("sqrt", _INC, _relax_from(rx.SQRT), error=er.sqrt, reach=er.once),
    _elementwise("abs", _abs, _relax_from(rx.abs_relax), er.unit_slope, exact=True, reach=None),
    _elementwise("square", _square, _relax_from(rx.SQUARE), er.square_slope, reach=er.once),
    Primitive("integer_pow",
              _integer_pow,
              _pow_kind,
              relaxation=_relax_pow,
              one_to_one=True,
              error=er.integer_pow,
              reach=er.power,
              rows=_each_row),
    # Monotone, IBP only.
    _elementwise("exp2", _INC, slope=er.exp2_slope),
    _elementwise("rsqrt", _DEC, slope=er.rsqrt_slope),
    _elementwise("cbrt", _INC),
    _elementwise("erf", _INC, slope=er.erf_slope),
    _elementwise("erfc", _DEC, slope=er.erf_slope),
    _elementwise("atan", _INC, slope=er.atan_slope),
    _elementwise("asinh", _INC, slope=er.asinh_slope),
    _elementwise("sinh", _INC, slope=er.sinh_slope),
]

REGISTRY: dict[str, Primitive] = {r.name: r for r in _RECORDS}
assert len(REGISTRY) == len(_RECORDS), "a primitive has two records"

SUPPORTED_PRIMITIVES = tuple(sorted(REGISTRY))


def lookup(name: str, source: str = "") -> Primitive:
  """The record of primitive ``name``; raises `UnsupportedPrimitiveError` naming it if none."""
  rec = REGISTRY.get(name)
  if rec is None:
    where = f" at {source}" if source else ""
    raise UnsupportedPrimitiveError(
        f"no bound rule for primitive '{name}' (applied to a bounded value{where}); "
        "supported primitives are listed in verify.SUPPORTED_PRIMITIVES")
  return rec


def bind(primitive, *args, **params):
  """``primitive.bind(*args, **params)``, between optimization barriers for a `Primitive.fenced`
  one (in the program and in every transpose, batch and derivative of it)."""
  rec = REGISTRY.get(primitive.name)
  if rec is None or not rec.fenced:
    return primitive.bind(*args, **params)
  out = primitive.bind(*lax.optimization_barrier(tuple(args)), **params)
  return lax.optimization_barrier(out)


def record(node) -> Primitive | None:
  """The record of a graph node's primitive (None for an input node)."""
  return None if node.primitive is None else REGISTRY[node.name]


def kind(node) -> str:
  """The node's kind for backward propagation (``"input"`` for an input node)."""
  rec = record(node)
  return "input" if rec is None else rec.kind(node)


def flag(node, attribute: str) -> bool:
  """A boolean attribute of the node's record (False for an input node)."""
  rec = record(node)
  if rec is None:
    return False
  value = getattr(rec, attribute)
  return bool(value(node)) if callable(value) else bool(value)


def scale_offset(node) -> tuple[Any, Any] | None:
  """``(s, t)`` with ``node = s * x + t`` for its bounded operand ``x``, or None."""
  rec = record(node)
  if rec is None or rec.scale_offset is None or len(node.bounded_inputs) != 1:
    return None
  return rec.scale_offset(node)


def family(node) -> str:
  rec = record(node)
  return "" if rec is None else rec.family


def relaxation(node, box: Interval, alpha=None) -> rx.Relaxation:
  """The linear relaxation of a ``relu`` or ``elementwise`` node on its input's ``box``."""
  l, u = box.lower, box.upper
  if kind(node) == "relu":
    pos = node.bounded_inputs[0]
    c = jnp.broadcast_to(jnp.asarray(node.inputs[1 - pos], l.dtype), l.shape)
    if _is_max(node):
      return rx.relu_like(l, u, c, alpha)
    return rx.negate_input(rx.relu_like(-u, -l, -c, alpha))
  return record(node).relaxation(node, l, u)


def _is_max(node) -> bool:
  return node.primitive is lax.max_p


def relu_threshold(node, dtype):
  """For a ``relu`` node ``max(x, c)`` or ``min(x, c)``: ``(is_max, c)``."""
  pos = node.bounded_inputs[0]
  c = jnp.broadcast_to(jnp.asarray(node.inputs[1 - pos], dtype), node.shape)
  return _is_max(node), c


def relu_alpha_init(node, box: Interval) -> jax.Array:
  """The adaptive lower slope CROWN uses for a ``relu`` node with input ``box``."""
  l, u = box.lower, box.upper
  is_max, c = relu_threshold(node, l.dtype)
  if is_max:
    return rx.relu_default_alpha(l, u, c)
  return rx.relu_default_alpha(-u, -l, -c)


def is_max_relu(node) -> bool:
  """Whether ``node`` is ``max`` of one bounded value and a constant (a ReLU when it is 0)."""
  return kind(node) == "relu" and _is_max(node)


def highest_precision(fn: Callable) -> Callable:
  """``fn`` with every matrix product and convolution it traces at HIGHEST precision.

  Bound passes never run at a backend's default precision (TF32 on recent GPUs,
  bfloat16 passes on TPUs), whose error would break the bounds.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped


def bind_params(rec: Primitive, params: dict) -> dict:
  """The parameters a node binds with in bound passes (HIGHEST precision for products)."""
  params = dict(params)
  if rec.precision and "precision" in params:
    params["precision"] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
  return params


# ----------------------------------------------------------------------------------------------
# Expansions: structural primitives the graph builder rewrites or inlines.

# Calls whose body is inlined.
CALLS = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin"
})
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def call_body(primitive, params):
  """``(jaxpr, consts)`` of a call's body."""
  for p in _CALL_JAXPR_PARAMS:
    sub = params.get(p)
    if isinstance(sub, ji.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, ji.Jaxpr):
      return sub, ()
  raise UnsupportedPrimitiveError(f"the call '{primitive.name}' has no body to inline")


def _broadcast(builder, value, shape, source):
  """``value`` (a node or a constant) broadcast to ``shape``."""
  if hasattr(value, "bounded_inputs"):
    if value.shape == tuple(shape):
      return value
    return builder.emit(
        lax.broadcast_in_dim_p, {
            "shape": tuple(shape),
            "broadcast_dimensions": tuple(range(len(shape) - len(value.shape), len(shape))),
            "sharding": None
        }, [value], source, jax.ShapeDtypeStruct(tuple(shape), value.dtype))
  return jnp.broadcast_to(jnp.asarray(value), tuple(shape))


def _expand_clamp(builder, primitive, params, invals, source, avals):
  lo, x, hi = invals
  aval = avals[0]
  lo = _broadcast(builder, lo, aval.shape, source)
  hi = _broadcast(builder, hi, aval.shape, source)
  inner = builder.emit(lax.max_p, {}, [x, lo], source, aval)
  return [builder.emit(lax.min_p, {}, [inner, hi], source, aval)]


def _neutral_constant(value, neutral: float) -> bool:
  try:
    return bool(np.all(np.asarray(value) == neutral))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def _expand_max_min(builder, primitive, params, invals, source, avals):
  aval = avals[0]
  if not all(builder.is_node(a) for a in invals):
    node = next(a for a in invals if builder.is_node(a))
    const = next(a for a in invals if not builder.is_node(a))
    if node.shape == tuple(aval.shape) and _neutral_constant(
        const, -np.inf if primitive is lax.max_p else np.inf):
      return [node]  # max(x, -inf) = x (softmax's shift), min(x, inf) = x
    return [builder.op(primitive, params, invals, source, aval)]
  # max(a, b) = b + relu(a - b); min(a, b) = a - relu(a - b).
  a, b = (_broadcast(builder, v, aval.shape, source) for v in invals)
  diff = builder.emit(lax.sub_p, {}, [a, b], source, aval)
  relu = builder.emit(lax.max_p, {}, [diff, jnp.zeros((), aval.dtype)], source, aval)
  if primitive is lax.max_p:
    return [builder.emit(lax.add_p, {}, [b, relu], source, aval)]
  return [builder.emit(lax.sub_p, {}, [a, relu], source, aval)]


def _index(builder, value, i, source):
  """``value[i]`` along the leading axis (a node or a constant)."""
  if not builder.is_node(value):
    return jnp.asarray(value)[i]
  shape = value.shape
  start = (i,) + (0,) * (len(shape) - 1)
  limit = (i + 1,) + tuple(shape[1:])
  piece = builder.emit(lax.slice_p, {
      "start_indices": start,
      "limit_indices": limit,
      "strides": None
  }, [value], source, jax.ShapeDtypeStruct((1,) + tuple(shape[1:]), value.dtype))
  return builder.emit(lax.squeeze_p, {"dimensions": (0,)}, [piece], source,
                      jax.ShapeDtypeStruct(tuple(shape[1:]), value.dtype))


def _stack(builder, values, aval, source):
  """``values`` (nodes or constants) stacked along a new leading axis, as ``aval``."""
  if not any(builder.is_node(v) for v in values):
    return jnp.stack([jnp.asarray(v, aval.dtype) for v in values])
  one = (1,) + tuple(aval.shape[1:])
  parts = []
  for v in values:
    if builder.is_node(v):
      parts.append(
          builder.emit(lax.broadcast_in_dim_p, {
              "shape": one,
              "broadcast_dimensions": tuple(range(1, len(one))),
              "sharding": None
          }, [v], source, jax.ShapeDtypeStruct(one, v.dtype)))
    else:
      parts.append(jnp.asarray(v, aval.dtype).reshape(one))
  return builder.emit(lax.concatenate_p, {"dimension": 0}, parts, source, aval)


def _expand_scan(builder, primitive, p, invals, source, avals):
  """A scan of static length unrolled, step by step (a ``fori_loop`` with static bounds)."""
  length = int(p["length"])
  if length > MAX_UNROLL:
    raise UnsupportedPrimitiveError(
        f"a scan (or fori_loop) of {length} steps on a bounded value at {source}: bound "
        f"propagation unrolls loops of at most verify.primitives.MAX_UNROLL={MAX_UNROLL} steps")
  body = p["jaxpr"]
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  carry = list(invals[n_consts:n_consts + n_carry])
  xs = invals[n_consts + n_carry:]
  ys_steps = []
  steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
  for i in steps:
    x_i = [_index(builder, x, i, source) for x in xs]
    outs = builder.walk(body.jaxpr, body.consts, list(consts) + carry + x_i, source)
    carry = list(outs[:n_carry])
    ys_steps.append(outs[n_carry:])
  if p["reverse"]:
    ys_steps.reverse()
  y_avals = avals[n_carry:]
  ys = []
  for j, aval in enumerate(y_avals):
    if length == 0:
      ys.append(jnp.zeros(aval.shape, aval.dtype))
    else:
      ys.append(_stack(builder, [s[j] for s in ys_steps], aval, source))
  return carry + ys


def _expand_cond(builder, primitive, params, invals, source, avals):
  """``cond`` on a constant index: the branch it takes; a bounded index is refused."""
  index, *ops = invals
  if builder.is_node(index):
    raise UnsupportedPrimitiveError(
        f"'cond' whose predicate depends on a bounded value at {source}: the branch taken "
        "varies over the box; write it with jnp.where (select_n) instead")
  try:
    i = int(np.clip(int(np.asarray(index)), 0, len(params["branches"]) - 1))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
    raise UnsupportedPrimitiveError(
        f"'cond' with an index that is traced outside the bound pass at {source} cannot be "
        "resolved; bound the function outside jit or make the index static") from None
  branch = params["branches"][i]
  return builder.walk(branch.jaxpr, branch.consts, ops, source)


def _refuse_while(builder, primitive, params, invals, source, avals):
  raise UnsupportedPrimitiveError(
      f"'while' on a bounded value at {source}: its trip count is not static; use "
      "lax.fori_loop with static bounds or lax.scan (unrolled up to "
      f"{MAX_UNROLL} steps)")


# The monoids a generic reduce body may be: body primitive -> (its neutral element, the
# dedicated reduction over axes, the one over windows).
_MONOIDS = {
    "max": (-np.inf, lax.reduce_max_p, lax.reduce_window_max_p),
    "min": (np.inf, lax.reduce_min_p, lax.reduce_window_min_p),
    "add": (0.0, lax.reduce_sum_p, lax.reduce_window_sum_p),
}


def _monoid(primitive, params, source):
  body = params["jaxpr"]
  jaxpr = body.jaxpr if isinstance(body, ji.ClosedJaxpr) else body
  ok = (len(jaxpr.eqns) == 1 and len(jaxpr.invars) == 2 and len(jaxpr.outvars) == 1 and
        jaxpr.eqns[0].primitive.name in _MONOIDS and
        list(jaxpr.eqns[0].invars) == list(jaxpr.invars) and
        list(jaxpr.eqns[0].outvars) == list(jaxpr.outvars))
  if not ok:
    raise UnsupportedPrimitiveError(
        f"'{primitive.name}' with a body other than max, min or add of one operand at "
        f"{source} has no bound rule")
  return jaxpr.eqns[0].primitive.name


def _neutral_or_refuse(name, init, primitive, source):
  """Whether ``init`` is the monoid's neutral element; for add any other is refused."""
  neutral = _MONOIDS[name][0]
  try:
    value = np.asarray(init)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    value = None
  if value is not None and value.size == 1 and float(value) == neutral:
    return True
  if name == "add" or value is None:
    raise UnsupportedPrimitiveError(
        f"'{primitive.name}' of {name} with an initial value other than {neutral} at "
        f"{source} has no bound rule")
  return False


_MONOID_PRIMS = {"max": lax.max_p, "min": lax.min_p, "add": lax.add_p}
_WINDOW_PARAMS = ("window_dimensions", "window_strides", "padding", "base_dilation",
                  "window_dilation")


def _generic_reduction(windows: bool) -> Callable:
  """A generic reduce (over axes, or windows) with a max/min/add body: the dedicated one.

  Padding and base dilation take the initial value, which also starts every
  reduction: for max and min the result is the dedicated reduction (whose padding
  is neutral) combined with the initial value; for add only 0 is accepted.
  """

  def expand(builder, primitive, params, invals, source, avals):
    if len(invals) != 2 or builder.is_node(invals[1]):
      raise UnsupportedPrimitiveError(
          f"'{primitive.name}' of several operands or with a bounded initial value at "
          f"{source} has no bound rule")
    x, init = invals
    name = _monoid(primitive, params, source)
    aval = avals[0]
    neutral = _neutral_or_refuse(name, init, primitive, source)
    if windows:
      new, prim = {k: params[k] for k in _WINDOW_PARAMS}, _MONOIDS[name][2]
    else:
      new, prim = {"axes": tuple(params["dimensions"])}, _MONOIDS[name][1]
      if name == "add":
        new["out_sharding"] = None
    out = builder.emit(prim, new, [x], source, aval)
    if not neutral:
      init = jnp.broadcast_to(jnp.asarray(init, aval.dtype), aval.shape)
      out = builder.emit(_MONOID_PRIMS[name], {}, [out, init], source, aval)
    return [out]

  return expand


def _expand_barrier(builder, primitive, params, invals, source, avals):
  """An optimization barrier changes no value: its results are its operands (each bound
  as its own operand, whichever the barrier groups it with)."""
  return list(invals)


EXPANSIONS: dict[str, Callable] = {
    "clamp": _expand_clamp,
    "optimization_barrier": _expand_barrier,
    "max": _expand_max_min,
    "min": _expand_max_min,
    "scan": _expand_scan,
    "cond": _expand_cond,
    "while": _refuse_while,
    "reduce": _generic_reduction(windows=False),
    "reduce_window": _generic_reduction(windows=True),
}

"""Backward bounds of convolution neurons kept as patches: each row only over its receptive field.

CROWN bounds every neuron of an intermediate convolution with its own backward
pass. As dense arrays, each row spans whole feature maps although only the
neuron's receptive field is non-zero, so memory traffic, not arithmetic, sets
the cost. Here (as auto_LiRPA's "patches" mode, Xu et al. 2020) a row is the
window of its receptive field, ``[C, *K]`` in the canonical ``(feature,
*spatial)`` order, plus the window's start in the node's spatial coordinates.
Through a convolution the window grows to ``(K - 1) * stride + kernel``; an
elementwise relaxation or a constant multiplies by the window of its values.

The chain from the convolution back to the network input may hold elementwise
relaxations (ReLU, tanh, ...), additions, subtractions, multiplications and
divisions by constants, negations, casts, transposes that keep the batch axis
first (a change of layout), and convolutions with fixed kernels
(any layout, stride, padding, kernel dilation; one feature group). `plan`
returns None for anything else, or when patches would not be much smaller than
the dense rows; the caller then takes the dense path. Both give the same bounds
up to float rounding.

The most common chain, a convolution of a ReLU (or other relaxation) of an affine
map of the input that is the same at every position (the second layer of a CNN,
after convolutions, per-channel normalization and biases), takes a shorter way
(`static_sign_applies`): the rows reaching the relaxation are the kernel itself,
so which line of the relaxation each row takes is known in advance, and every
window's bounds come from two matrix products with constant matrices instead of
pushing each example's rows through every operation.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from verify import primitives
from verify import relaxations as rx
from verify.graph import Node
from verify.rows import balanced_chunks
from verify.rows import map_chunks
from verify.rows import fold_affine_tail

# Use patches when their elements per row are at most this fraction of the dense rows'.
_MAX_FRACTION = 0.5
# A window's transposed convolution is one matrix product when the matrix has at most this many
# times the convolution's multiply-adds.
_MATRIX_FACTOR = 8


class Plan(NamedTuple):
  """The chain a patch row is pushed through, from a convolution to the input.

  Attributes:
    conv: the convolution whose output neurons are bounded (after the node's
      trailing bias and casts, see `verify.rows.fold_affine_tail`).
    chain: the nodes from ``conv`` back to the input node, inclusive.
    patch_elements: the largest window ``C * prod(K)`` along the chain.
  """
  conv: Node
  chain: tuple[Node, ...]
  patch_elements: int


def _conv_ok(node: Node) -> bool:
  """A fixed-kernel convolution of one bounded input whose padding is narrower than its kernel."""
  p = node.params
  if (node.bounded_inputs != [0] or p["batch_group_count"] != 1 or p["feature_group_count"] != 1 or
      any(d != 1 for d in p["lhs_dilation"])):
    return False
  rhs = p["dimension_numbers"].rhs_spec
  kernel = [(node.inputs[1].shape[a] - 1) * d + 1 for a, d in zip(rhs[2:], p["rhs_dilation"])]
  return all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(p["padding"], kernel))


def _is_relaxed(node: Node) -> bool:
  return primitives.kind(node) in ("relu", "elementwise")


def _is_number(v, value: float | None = None) -> bool:
  """Whether ``v`` is a Python number (equal to ``value`` if given): a scale or offset that
  is the same everywhere."""
  return isinstance(v, (int, float)) and (value is None or v == value)


def _steps_back(node: Node) -> Node | None:
  """The operand a supported chain step continues to, or None."""
  pos = node.bounded_inputs
  if len(pos) != 1:
    return None
  x = node.inputs[pos[0]]
  if x.shape != node.shape:
    return None
  if _is_relaxed(node) or primitives.scale_offset(node) is not None:
    return x
  return None


def plan(node: Node) -> Plan | None:
  """How to bound ``node``'s neurons in patches, or None where it does not apply or pay."""
  if not node.shape:
    return None
  n = node.shape[0]
  conv, _ = fold_affine_tail(node, None)
  if primitives.family(conv) != "conv" or not _conv_ok(conv):
    return None
  layout = tuple(conv.params["dimension_numbers"].out_spec)
  chain, cur = [], conv
  window = (1,) * (len(layout) - 2)
  largest, dense = 0, 0
  while cur.primitive is not None:
    if primitives.family(cur) == "conv":
      p = cur.params
      lhs, rhs, out = p["dimension_numbers"]
      if not _conv_ok(cur) or tuple(out) != layout:
        return None
      kernel = tuple(cur.inputs[1].shape[d] for d in rhs[2:])
      window = tuple((k - 1) * s + (w - 1) * d + 1
                     for k, s, w, d in zip(window, p["window_strides"], kernel, p["rhs_dilation"]))
      layout = tuple(lhs)
      x = cur.inputs[0]
      largest = max(largest, x.shape[layout[1]] * math.prod(window))
      dense = max(dense, math.prod(x.shape[1:]))
    elif primitives.family(cur) == "permute":
      perm = cur.params["permutation"]
      if perm[0] != 0 or cur.bounded_inputs != [0]:
        return None
      x = cur.inputs[0]
      layout = tuple(perm[a] for a in layout)
    else:
      x = _steps_back(cur)
      if x is None or x.shape[0] != n:
        return None
    chain.append(cur)
    cur = x
  chain.append(cur)
  if largest > _MAX_FRACTION * dense:
    return None
  return Plan(conv, tuple(chain), largest)


def _canonical(value, node: Node, layout) -> jax.Array:
  """``value`` broadcast to ``node.shape`` and laid out as ``[N, C, *S]``."""
  return jnp.transpose(jnp.broadcast_to(jnp.asarray(value, node.dtype), node.shape), layout)


def _windows(v: jax.Array, start: jax.Array, size: tuple[int, ...]) -> jax.Array:
  """Windows of ``v [N, C, *S]`` at ``start [W, d]``: ``[W, N, 1, C, *size]``, zero outside."""
  vp = jnp.pad(v, [(0, 0), (0, 0)] + [(k, k) for k in size])
  n, c = v.shape[:2]

  def one(st):
    zero = jnp.zeros((), st.dtype)  # one index dtype (Python ints are int64 under x64)
    return lax.dynamic_slice(vp, (zero, zero) + tuple(st[i] + size[i] for i in range(len(size))),
                             (n, c) + size)

  return jax.vmap(one)(start)[:, :, None]


def _inside(start: jax.Array, size: tuple[int, ...], spatial: tuple[int, ...]) -> jax.Array:
  """``[W, 1, 1, 1, *size]``: whether each window element lies inside the feature map."""
  mask = jnp.ones((start.shape[0],) + (1,) * 3 + size, bool)
  for d, (k, s) in enumerate(zip(size, spatial)):
    pos = start[:, d, None] + jnp.arange(k)  # [W, k]
    shape = (start.shape[0],) + (1,) * (3 + d) + (k,) + (1,) * (len(size) - d - 1)
    mask = mask & ((pos >= 0) & (pos < s)).reshape(shape)
  return mask


def _sum_rest(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(3, x.ndim)))


def _start_back(start: jax.Array, node: Node) -> jax.Array:
  """Window starts ``[W, d]`` at a convolution's output -> at its (unpadded) input."""
  p = node.params
  return start * jnp.asarray(p["window_strides"], start.dtype) - jnp.asarray(
      [lo for lo, _ in p["padding"]], start.dtype)


def _conv_back(P: jax.Array, start: jax.Array, node: Node, masked: bool = True):
  """Pushes patches ``P [W, N, R, O, *K]`` at a convolution's output to its input.

  ``masked=False`` keeps the window elements that fall outside the input (where
  the caller multiplies them by zero-padded windows anyway).
  """
  p = node.params
  lhs, rhs, _ = p["dimension_numbers"]
  w = jnp.transpose(jnp.asarray(node.inputs[1], P.dtype), tuple(rhs))  # [O, I, *k]
  strides, dil = p["window_strides"], p["rhs_dilation"]
  new = tuple(
      (k - 1) * s + (kk - 1) * d + 1 for k, s, kk, d in zip(P.shape[4:], strides, w.shape[2:], dil))
  canon = tuple(range(len(new) + 2))
  lead = P.shape[:3]

  def conv(z):
    return lax.conv_general_dilated(z,
                                    w,
                                    strides,
                                    "VALID",
                                    rhs_dilation=dil,
                                    dimension_numbers=lax.ConvDimensionNumbers(canon, canon, canon))

  rows, out_size = P.reshape((-1,) + P.shape[3:]), math.prod(P.shape[3:])
  in_size = w.shape[1] * math.prod(new)
  if in_size * out_size <= _MATRIX_FACTOR * out_size * math.prod(w.shape[1:]):
    # Small windows: the transposed convolution as one matrix (built by transposing a basis),
    # a single matrix product instead of XLA's strided transposed convolution.
    _, vjp = jax.vjp(conv, jnp.zeros((out_size, w.shape[1]) + new, P.dtype))
    (matrix,) = vjp(jnp.eye(out_size, dtype=P.dtype).reshape((out_size,) + P.shape[3:]))
    Q = (rows.reshape(rows.shape[0], out_size) @ matrix.reshape(
        out_size, in_size)).reshape((rows.shape[0], w.shape[1]) + new)
  else:
    _, vjp = jax.vjp(conv, jnp.zeros((rows.shape[0], w.shape[1]) + new, P.dtype))
    (Q,) = vjp(rows)
  start = _start_back(start, node)
  Q = Q.reshape(lead + Q.shape[1:])
  if masked:
    x = node.inputs[0]
    Q = Q * _inside(start, new, tuple(x.shape[d] for d in lhs[2:]))
  return Q, start, tuple(lhs)


def _bound_windows(pl: Plan, start: jax.Array, bounds: dict,
                   relaxation: Callable[[Node], rx.Relaxation]) -> jax.Array:
  """Lower bounds ``[W, N, 2 O]`` of every channel of the convolution (then negated) at the
  output positions whose windows start at ``start [W, d]``."""
  conv = pl.conv
  layout = tuple(conv.params["dimension_numbers"].out_spec)
  o, n = conv.shape[layout[1]], conv.shape[0]
  eye = jnp.eye(o, dtype=conv.dtype)
  ones = (1,) * start.shape[1]
  P = jnp.broadcast_to(
      jnp.concatenate([eye, -eye]).reshape((1, 1, 2 * o, o) + ones),
      (start.shape[0], n, 2 * o, o) + ones)
  total = jnp.zeros(P.shape[:3], conv.dtype)
  for cur in pl.chain:
    size = P.shape[4:]
    if cur.primitive is None:
      box = bounds[cur.index]
      c = _windows(_canonical(box.center, cur, layout), start, size)
      rad = _windows(_canonical(box.radius, cur, layout), start, size)
      return total + _sum_rest(P * c) - _sum_rest(jnp.abs(P) * rad)
    if primitives.family(cur) == "conv":
      P, start, layout = _conv_back(P, start, cur)
    elif primitives.family(cur) == "permute":
      layout = tuple(cur.params["permutation"][a] for a in layout)
    elif not _is_relaxed(cur):  # y = s x + t
      scale, offset = primitives.scale_offset(cur)
      if not _is_number(offset, 0.0):
        total = total + _sum_rest(P * _windows(_canonical(offset, cur, layout), start, size))
      if _is_number(scale):
        P = P * scale if scale != 1 else P
      else:
        P = P * _windows(_canonical(scale, cur, layout), start, size)
    else:
      x = cur.inputs[cur.bounded_inputs[0]]
      stacked = jnp.concatenate([_canonical(v, x, layout) for v in relaxation(cur)], axis=1)
      lw, lb, uw, ub = jnp.split(_windows(stacked, start, size), 4, axis=3)
      pos = P >= 0
      total = total + _sum_rest(rx.line_terms(P, lb, ub))
      P = jnp.where(pos, P * lw, P * uw)
  raise AssertionError("a patch chain ends at an input node")


def _channel_vector(node: Node, layout) -> jax.Array | None:
  """The scale of an elementwise affine node as ``[C]`` when it is one value per channel
  (the same at every example and position), else None (also for traced constants)."""
  scale, _ = primitives.scale_offset(node)
  try:
    c = np.asarray(scale, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  c = np.transpose(np.broadcast_to(c, node.shape), layout)  # [N, C, *S]
  first = c[(slice(0, 1), slice(None)) + (slice(0, 1),) * (c.ndim - 2)]
  if not np.all(c == first):
    return None
  return jnp.asarray(first.reshape(-1), node.dtype)


def static_sign_applies(pl: Plan) -> bool:
  """Whether `_static_windows` applies: the convolution's input is a relaxation, and
  from there to the network input only position-independent linear maps and constant
  additions follow (convolutions, transposes, casts, negations, additions, and
  multiplications or divisions by one value per channel)."""
  chain = pl.chain
  if len(chain) < 3 or not _is_relaxed(chain[1]):
    return False
  layout = tuple(pl.conv.params["dimension_numbers"].lhs_spec)
  for cur in chain[2:-1]:
    if _is_relaxed(cur):
      return False
    if primitives.family(cur) == "conv":
      layout = tuple(cur.params["dimension_numbers"].lhs_spec)
    elif primitives.family(cur) == "permute":
      layout = tuple(cur.params["permutation"][a] for a in layout)
    elif (not _is_number(primitives.scale_offset(cur)[0]) and _channel_vector(cur, layout) is None):
      return False
  return True


def _push_linear(P: jax.Array, start: jax.Array, layout, nodes) -> tuple:
  """Pushes patches through the linear part of ``nodes`` (constant additions are left out),
  without masking window elements outside the feature maps."""
  for cur in nodes:
    if primitives.family(cur) == "conv":
      P, start, layout = _conv_back(P, start, cur, masked=False)
    elif primitives.family(cur) == "permute":
      layout = tuple(cur.params["permutation"][a] for a in layout)
    else:
      scale, _ = primitives.scale_offset(cur)
      if _is_number(scale):
        P = P * scale if scale != 1 else P
      else:
        vec = _channel_vector(cur, layout)
        P = P * vec.reshape((1, 1, 1, -1) + (1,) * (P.ndim - 4))
  return P, start, layout


def _static_windows(
    pl: Plan, bounds: dict,
    relaxation: Callable[[Node], rx.Relaxation]) -> Callable[[jax.Array], jax.Array]:
  """`_bound_windows` for a convolution of a relaxation of an affine function of the input.

  The rows reaching the relaxation are the convolution's kernel ``K [O, J]`` (window
  ``J``), with signs known before any bound is: a row's lower line is taken where
  ``K >= 0``. With ``S = lw + uw`` and ``D = lw - uw`` per window element, the rows
  after the relaxation are ``(K S +- |K| D) / 2`` for the lower (+) and upper (-)
  bounds, and the affine map ``h`` from the input to the relaxation (the same at every
  position, ``h(x) = L x + h(0)``) turns them into input rows through the constant
  matrices ``T = K L^T`` and ``|K| L^T``: two matrix products per window position
  instead of pushing ``2 O`` rows of every example through each operation. The
  centre terms use ``h`` at the box centre; only the radius term needs the input rows.

  Returns ``windows(start [W, d]) -> [W, N, 2 O]``; everything that does not depend
  on the window positions is computed here, once, outside the loop over them.
  """
  conv, relaxed, rest, inp = pl.chain[0], pl.chain[1], pl.chain[2:-1], pl.chain[-1]
  out_spec = tuple(conv.params["dimension_numbers"].out_spec)
  o = conv.shape[out_spec[1]]
  origin = jnp.zeros((1, len(out_spec) - 2), jnp.int32)  # only shapes and layouts are used
  eye = jnp.eye(o, dtype=conv.dtype).reshape((1, 1, o, o) + (1,) * origin.shape[1])
  K, _, layout_r = _conv_back(eye, origin, conv, masked=False)  # [1, 1, O, I, *k]
  window_r = K.shape[3:]  # (I, *k)
  size_r = window_r[1:]
  j = math.prod(window_r)
  K = K.reshape(o, j)
  x = relaxed.inputs[relaxed.bounded_inputs[0]]
  centre = bounds[inp.index].center
  for cur in reversed(rest):
    centre = cur.apply_bounded(centre)
  # [N, 5 I, *S]: lw, lb, uw, ub and h at the box centre, in the relaxation's canonical layout.
  per_example = jnp.concatenate([_canonical(v, x, layout_r) for v in relaxation(relaxed)] +
                                [_canonical(centre, x, layout_r)],
                                axis=1)
  basis = jnp.eye(j, dtype=conv.dtype).reshape((1, 1, j) + window_r)
  L, _, layout_in = _push_linear(basis, origin, layout_r, rest)  # [1, 1, J, C, *k_in]
  size_in = L.shape[4:]
  L = L.reshape(j, -1)  # [J, J_in]
  j_in = L.shape[1]
  T = (K.T[:, :, None] * L[:, None, :]).reshape(j, o * j_in)
  T_abs = (jnp.abs(K).T[:, :, None] * L[:, None, :]).reshape(j, o * j_in)
  radius = _canonical(bounds[inp.index].radius, inp, layout_in)
  convs = [cur for cur in rest if primitives.family(cur) == "conv"]

  def windows(start: jax.Array) -> jax.Array:
    start_r = _start_back(start, conv)
    lw, lb, uw, ub, hc = [
        v.reshape(v.shape[:2] + (j,))
        for v in jnp.split(_windows(per_example, start_r, size_r)[:, :, 0], 5, axis=2)
    ]
    start_in = start_r
    for cur in convs:
      start_in = _start_back(start_in, cur)
    S, D = lw + uw, lw - uw
    lead = S.shape[:2]
    U = (S.reshape(-1, j) @ T).reshape(lead + (o, j_in))
    V = (D.reshape(-1, j) @ T_abs).reshape(lead + (o, j_in))
    rad = _windows(radius, start_in, size_in).reshape(lead + (1, j_in))
    a = (S * hc + lb + ub) @ K.T  # [W, N, O]
    b = (D * hc + lb - ub) @ jnp.abs(K).T
    lower = 0.5 * (a + b - jnp.sum(jnp.abs(U + V) * rad, axis=-1))
    upper_neg = -0.5 * (a - b + jnp.sum(jnp.abs(U - V) * rad, axis=-1))
    return jnp.concatenate([lower, upper_neg], axis=-1)

  return windows


def bound_node(pl: Plan, node: Node, bounds: dict, relaxation: Callable[[Node], rx.Relaxation],
               chunk_size: int | None, budget: int) -> tuple[jax.Array, jax.Array]:
  """CROWN bounds of every element of ``node``, computed in patches.

  Args:
    pl: `plan(node)`.
    node: the node whose elements are bounded.
    bounds: intervals of the input node and of every relaxed node's input.
    relaxation: the linear relaxation of a relaxed node (from its input's bounds).
    chunk_size: neurons per pass (rounded to whole output positions); None keeps
      the largest array under ``budget`` elements.

  Returns:
    ``(lower, upper)``, each of ``node.shape``.
  """
  conv = pl.conv
  n = node.shape[0]
  m = math.prod(node.shape[1:])
  _, bias = fold_affine_tail(node, jnp.broadcast_to(jnp.arange(m), (n, m)))  # [m, N]
  out_spec = tuple(conv.params["dimension_numbers"].out_spec)
  o = conv.shape[out_spec[1]]
  spatial = tuple(conv.shape[d] for d in out_spec[2:])
  # The biggest arrays are the patches of both signs, [per_pass, N, 2 O, *window], and temporaries.
  per_pass = (chunk_size // o if chunk_size else budget // (4 * n * o * pl.patch_elements))
  positions = jnp.stack(jnp.unravel_index(jnp.arange(math.prod(spatial)), spatial), axis=-1)
  per_pass, num = balanced_chunks(positions.shape[0], per_pass)
  padded = jnp.pad(positions, ((0, num * per_pass - positions.shape[0]), (0, 0)))
  if static_sign_applies(pl):
    windows = _static_windows(pl, bounds, relaxation)
  else:
    windows = lambda st: _bound_windows(pl, st, bounds, relaxation)
  out = map_chunks(windows,
                   padded.reshape(num, per_pass, -1).astype(jnp.int32))  # [num, per_pass, N, 2 O]
  out = out.reshape((-1, n, 2 * o))[:positions.shape[0]]  # [positions, N, 2 O]
  lower, upper = out[..., :o], -out[..., o:]

  def to_node(v):  # [positions, N, O] -> the convolution's layout, flat -> the node's shape
    canon = jnp.moveaxis(v, 0, -1).reshape((n, o) + spatial)
    flat = jnp.transpose(canon, tuple(int(a) for a in np.argsort(out_spec))).reshape(n, m)
    return (flat + bias.T).reshape(node.shape)

  return to_node(lower), to_node(upper)

"""Rows of the identity specification pushed through a node's own affine operations, cheaply.

Bounding every neuron of an intermediate node starts the backward pass from
one-hot rows ``e_j``. Pushed through a dense layer or a convolution by the
operation's transpose, a one-hot row costs a full transposed layer, although its
result is only one row of the layer's Jacobian: a column of the weight matrix,
or the kernel of one output channel placed at one window of the input. This
module computes those rows directly (gathering weights), for the chain of
operations that ends the node: bias additions, casts, reshapes, then one dense
layer or convolution with a fixed kernel. The backward pass goes on from there.
On the small CNN this removes most of CROWN's cost for intermediate bounds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib import backend
from verify import primitives
from verify.graph import Node


class Rows(NamedTuple):
  """``A . node == rows . start + bias`` for the chosen neurons of ``node``.

  Attributes:
    start: the node the backward pass continues from.
    rows: ``[R, N, *start.shape[1:]]`` coefficients.
    bias: ``[R, N]`` constant terms.
  """
  start: Node
  rows: jax.Array
  bias: jax.Array


def _gather(values: jax.Array, idx: jax.Array) -> jax.Array:
  """``values [N, m]``, ``idx [N, R]`` -> ``[R, N]``."""
  return jnp.take_along_axis(values, idx, axis=1).T


def _one_hot(node: Node, idx: jax.Array, bias: jax.Array) -> Rows:
  n, rest = node.shape[0], node.shape[1:]
  rows = jnp.transpose(jax.nn.one_hot(idx, math.prod(rest), dtype=node.dtype), (1, 0, 2))
  return Rows(node, rows.reshape((idx.shape[1], n) + tuple(rest)), bias)


def _dense_rows(node: Node, idx: jax.Array) -> jax.Array | None:
  """Rows of ``x [N, in] . W`` for output neurons ``idx [N, R]``: ``[R, N, in]``."""
  (lc, rc), (lb, rb) = node.params["dimension_numbers"]
  x, w = node.inputs
  if node.bounded_inputs != [0] or lb or rb or len(x.shape) != 2 or np.ndim(w) != 2:
    return None
  if tuple(lc) != (1,):
    return None
  w = jnp.asarray(w, node.dtype)
  w = w if tuple(rc) == (0,) else w.T  # [in, out]
  return jnp.transpose(jnp.take(w, idx, axis=1), (2, 1, 0))


def _conv_rows(node: Node, idx: jax.Array) -> jax.Array | None:
  """Rows of a convolution for output neurons ``idx [N, R]``: ``[R, N, *input.shape[1:]]``.

  Each row is the kernel of the neuron's output channel (dilated by
  ``rhs_dilation``) placed at the neuron's window of the padded input, then cropped.
  """
  p = node.params
  x, w = node.inputs
  if (node.bounded_inputs != [0] or p["batch_group_count"] != 1 or
      any(d != 1 for d in p["lhs_dilation"]) or any(lo < 0 or hi < 0 for lo, hi in p["padding"])):
    return None
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  groups = p["feature_group_count"]
  # Canonical layouts: input [N, C, *S], kernel [O, I, *K], output [N, O, *S'].
  w = jnp.transpose(jnp.asarray(w, node.dtype), tuple(rhs_spec))
  in_canon = tuple(x.shape[d] for d in lhs_spec)
  dil = tuple(p["rhs_dilation"])
  if any(d != 1 for d in dil):
    ksize = tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], dil))
    w = jnp.zeros(w.shape[:2] + ksize, w.dtype).at[(slice(None), slice(None)) +
                                                   tuple(slice(None, None, d) for d in dil)].set(w)
  o, i_per_group = w.shape[:2]
  o_per_group = o // groups
  # The flat index of the node (its own layout) -> canonical (channel, *position).
  coords = jnp.unravel_index(idx, tuple(node.shape[1:]))  # per non-batch axis of the node
  by_axis = {axis: c for axis, c in zip(range(1, len(node.shape)), coords)}
  channel = by_axis[out_spec[1]]
  position = [by_axis[d] for d in out_spec[2:]]
  pads = [lo for lo, _ in p["padding"]]
  padded = (i_per_group * groups,) + tuple(
      s + lo + hi for s, (lo, hi) in zip(in_canon[2:], p["padding"]))
  # The placed kernel must fit the padded input even for windows that run past it (VALID tails).
  canvas = (padded[0],) + tuple(s + k for s, k in zip(padded[1:], w.shape[2:]))

  def place(c, *pos):
    start = (c // o_per_group * i_per_group,) + tuple(
        q * s for q, s in zip(pos, p["window_strides"]))
    return lax.dynamic_update_slice(jnp.zeros(canvas, w.dtype), w[c], start)

  placed = jax.vmap(jax.vmap(place))(channel, *position)  # [N, R, C, *canvas spatial]
  crop = (slice(None), slice(None), slice(None)) + tuple(
      slice(lo, lo + s) for lo, s in zip(pads, in_canon[2:]))
  rows = placed[crop]  # [N, R, C, *S]
  # Back to the input's own layout (batch axis kept second-to-first as [R, N, ...]).
  inverse = np.argsort(lhs_spec)  # canonical axis of each input axis
  rows = jnp.moveaxis(rows, 1, 0)  # [R, N, C, *S] canonical
  perm = (0,) + tuple(1 + int(a) for a in inverse)
  return jnp.transpose(rows, perm)


def balanced_chunks(total: int, most: int) -> tuple[int, int]:
  """``(size, count)``: the fewest chunks of at most ``most`` covering ``total``, evenly sized."""
  count = -(-total // max(1, min(most, total)))
  return -(-total // count), count


def map_chunks(fn, chunks: jax.Array) -> jax.Array:
  """``fn`` over the leading axis of ``chunks``: one chunk after another (``lax.map``), or
  all together (``vmap``) where the backend policy says so (`robustlib.backend`:
  ``parallel_chunks``)."""
  return jax.vmap(fn)(chunks) if backend.fast_paths().parallel_chunks else lax.map(fn, chunks)


def fold_affine_tail(node: Node, idx: jax.Array | None) -> tuple[Node, jax.Array | None]:
  """Follows ``node``'s trailing casts, plain reshapes and constant additions back.

  Returns the first node that is none of those and the constant ``[R, N]`` that
  the additions contribute: ``node[idx] == returned_node[idx] + bias`` (a plain
  reshape keeps every element's flat index). With ``idx`` None only the node
  is found (bias None).
  """
  n = node.shape[0]
  bias = None if idx is None else jnp.zeros((idx.shape[1], n), node.dtype)
  while True:
    pos = node.bounded_inputs
    if len(pos) != 1 or node.primitive is None:
      return node, bias
    x = node.inputs[pos[0]]
    if not x.shape or x.shape[0] != n:
      return node, bias
    if not primitives.flag(node, "flat_order"):
      return node, bias
    so = primitives.scale_offset(node)
    if so is not None:
      scale, offset = so
      if not (isinstance(scale, float) and scale == 1.0):
        return node, bias
      if idx is not None and not (isinstance(offset, float) and offset == 0.0):
        const = jnp.broadcast_to(jnp.asarray(offset, node.dtype), node.shape)
        bias = bias + _gather(const.reshape(n, -1), idx)
    node = x


def identity_rows(node: Node, idx: jax.Array) -> Rows:
  """``e_j`` rows for the neurons ``idx [N, R]`` of ``node``, pushed as far as is cheap.

  Args:
    node: a node ``[N, ...]``.
    idx: flat indices (over ``node.shape[1:]``) of the neurons to bound, per example.

  Returns:
    `Rows` with ``rows . start + bias == node[idx]`` for every input.
  """
  node, bias = fold_affine_tail(node, idx)
  rows = None
  if primitives.family(node) == "dense":
    rows = _dense_rows(node, idx)
  elif primitives.family(node) == "conv":
    rows = _conv_rows(node, idx)
  if rows is None:
    return _one_hot(node, idx, bias)
  return Rows(node.inputs[node.bounded_inputs[0]], rows, bias)

"""Branch and bound on ReLU splits, bounded by β-CROWN: complete verification of ReLU networks.

A subdomain is the input box with the signs of some ReLU inputs fixed
(`verify.beta_crown`). The search keeps a pool of open subdomains of fixed
capacity on the device and repeats one jitted step until the pool is empty
(verified), a counterexample is confirmed, or time runs out:

1. take the ``batch_size`` open subdomains of lowest bound;
2. split each on its chosen neuron into two children (the neuron's input at
   least, or at most, its threshold);
3. bound the children with β-CROWN: the root's optimised slopes and the
   parent's multipliers as the warm start, intermediate bounds the root's
   (CROWN's, tightened by alpha-CROWN per neuron) clamped by the splits; a child
   keeps its parent's bound where that is higher (it lies inside the parent);
4. for each child, choose the neuron to split next: BaBSR (Bunel et al. 2020),
   the unstable neuron whose relaxation costs the bound most (the gap of its
   upper line at the threshold, weighted by the negative part of its
   coefficient in the worst row), or FSB (De Palma et al. 2021), the BaBSR
   candidates' children bounded cheaply (no optimisation) and the candidate whose
   worse child is best kept;
5. the input minimising each child's worst bound row is a counterexample
   candidate, checked on the network; the unproven children join the pool, but
   for a child with no neuron left to split (every unstable one split, or the
   depth limit), decided by the MILP restricted to its splits (`verify.milp`; a
   linear program once every unstable neuron is split).

A child is proven when its lower bound on the safety (`verify.unsafe`), less
the rounding allowance of the root box (`verify.rounding`), is positive; the
children of a subdomain cover it, so when every subdomain is proven the box is.

References:
  Wang et al., "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
  Constraints for Neural Network Robustness Verification", NeurIPS 2021.
  Bunel et al., "Branch and Bound for Piecewise Linear Neural Network
  Verification", JMLR 2020 (BaBSR).
  De Palma et al., "Improved Branch and Bound for Neural Network Verification
  via Lagrangian Decomposition", 2021 (filtered smart branching).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import backend
from robustlib import compilation
from robustlib.checks import InputError
from verify import error_rules as er
from verify import primitives
from verify import rounding
from verify.alpha_crown import relu_nodes
from verify.beta_crown import bound_subdomains
from verify.beta_crown import clamp
from verify.beta_crown import split_masks
from verify.alpha_crown import optimise
from verify.alpha_crown import optimise_intermediate
from verify.crown import intermediate_bounds
from verify.ibp import propagate as ibp_propagate
from verify.graph import build_graph
from verify.interval import Interval
from verify.interval import round_outward
from verify.unsafe import UnsafeSet

BRANCHING = ("babsr", "fsb")
# Seconds at most for the exact program of a subdomain with no split left.
EXACT_SECONDS = 30.0
# Subdomains split per step: the backend policy's (`robustlib.backend`: ``bab_batch_size``),
# 32 on CPU: small batches stay in its caches and keep the search nearer best-first (MNIST MLP
# 2x256, one core, 5 Adam steps, 45 s: 1261 subdomains bounded per second at 32, 1038 at 64,
# 972 at 128, and the lowest open bound -0.16, -0.22, -0.23; 294/s at 512 with 10 steps).
# Elsewhere the memory budget decides.
MAX_BATCH_SIZE = 1024
# Elements of the parameters, gradients and Adam states of one step, on an accelerator.
ACCELERATOR_BUDGET = 1 << 28


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
  """Open subdomains, ``P`` slots.

  Attributes:
    splits: ``int32 [P, D, 3]`` each subdomain's splits (`verify.beta_crown`).
    depth: ``int32 [P]`` splits in use.
    bound: ``[P]`` lower bound on the safety.
    beta: ``[P, S, D]`` the multiplier of each split per row (the warm start).
    branch: ``int32 [P, 2]`` the (layer, neuron) to split next; -1 when none is left.
    live: ``bool [P]`` the slot holds an open subdomain.
  """
  splits: jax.Array
  depth: jax.Array
  bound: jax.Array
  beta: jax.Array
  branch: jax.Array
  live: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Root:
  """What every subdomain shares: the box, its CROWN intermediate bounds, the slopes
  alpha-CROWN optimised over it, the rows' offsets, the rounding allowance and, per ReLU
  input, what each unit of a split's multiplier adds to it (`beta_allowance`)."""
  lower: jax.Array  # [1, ...]
  upper: jax.Array
  bounds: dict
  alpha: dict
  unsafe: UnsafeSet
  allowance: jax.Array  # [1, S]
  beta_error: dict  # str(ReLU node index) -> [1, *shape]


def _graph(fn, n: int, root: Root):
  shape = (n,) + root.lower.shape[1:]
  zeros = jnp.zeros(shape, root.lower.dtype)
  graph, _ = build_graph(fn, [Interval(zeros, zeros)])
  out = graph.outputs[0]
  return out, relu_nodes(out)


def _broadcast(tree, n: int, axis: int):
  return jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(v, v.shape[:axis] + (n,) + v.shape[axis + 1:]), tree)


def _safety(root: Root, rows: jax.Array, params: dict | None = None, masks=None) -> jax.Array:
  """``[N]`` proven safety from lower bounds ``[S, N]`` of the rows (found with the split
  multipliers ``params["beta"]`` on ``masks``, whose terms' rounding is allowed for too)."""
  u = er.unit_roundoff(root.unsafe.d.dtype)
  rows = rows.T - root.allowance - 2 * u * jnp.abs(root.unsafe.d)
  if params is not None:
    rows = rows - beta_allowance(root, params["beta"], masks).T
  return root.unsafe.proven(rows)


def beta_allowance(root: Root, beta: dict, masks: dict) -> jax.Array:
  """``[S, N]``: the rounding allowance of the split terms ``-sum beta s (x - c)``.

  The terms are bounded by the same backward pass as the specification, so under
  `verify.rounding`'s first-order model their evaluation and computation errors are
  those of ``beta`` times the ReLU input's value: ``beta (e + 2 e' + 2 u (|x| + |c|))``
  per split (``e`` the input's evaluation error bound, ``e'`` a linear pass's
  computation error of it, `verify.rounding.ErrorModel`; ``|x|`` its magnitude).
  """
  total = 0.0
  for k, b in beta.items():
    w = root.beta_error[k] * jnp.abs(masks[int(k)]).astype(b.dtype)
    term = jnp.where(b > 0, b * w[None], 0.0)  # no 0 * inf where a split is absent
    total = total + jnp.sum(term.reshape(b.shape[:2] + (-1,)), axis=-1)
  return total


def _worst_row(root: Root, rows: jax.Array) -> jax.Array:
  """``[N]`` the row that sets each subdomain's safety bound."""
  unsafe = root.unsafe
  v = jnp.where(unsafe.member[None], (rows.T - unsafe.d)[:, None, :], -jnp.inf)  # [N, P, S]
  p = jnp.argmin(jnp.max(v, axis=-1), axis=-1)  # the least proven polytope
  return jnp.argmax(jnp.take_along_axis(v, p[:, None, None], axis=1)[:, 0], axis=-1)


def _scores(relus, bounds, masks, record, row):
  """BaBSR's score ``[N, M]`` of every neuron (all layers, flattened); -inf where not
  splittable (stable or split already)."""
  out = []
  for node in relus:
    box = bounds[node.inputs[node.bounded_inputs[0]].index]
    _, c = primitives.relu_threshold(node, box.lower.dtype)
    l, u = box.lower, box.upper
    gap = (u - c) * (c - l) / jnp.where(u > l, u - l, 1.0)  # the upper line's height at c
    coef = jnp.take_along_axis(record[node.index], row[None, :, *(None,) * (l.ndim - 1)], 0)[0]
    score = jnp.maximum(-coef, 0.0) * gap + 1e-3 * jnp.abs(coef) * gap
    open_ = (l < c) & (u > c) & (masks[node.index] == 0)
    out.append(jnp.where(open_, score, -jnp.inf).reshape(l.shape[0], -1))
  return jnp.concatenate(out, axis=1)


def _neuron_of(relus, flat: jax.Array) -> jax.Array:
  """``[..., 2]`` (layer, neuron) of indices into the concatenation of all layers."""
  sizes = np.asarray([int(np.prod(n.shape[1:])) for n in relus])
  starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
  layer = jnp.searchsorted(jnp.asarray(np.cumsum(sizes)), flat, side="right")
  return jnp.stack([layer, flat - starts[layer]], axis=-1).astype(jnp.int32)


def _with_split(splits, depth, branch, sign):
  """Children ``[N, D, 3]``: each subdomain's splits and one more at position ``depth``."""
  row = jnp.concatenate([branch, jnp.full(branch.shape[:1] + (1,), sign, jnp.int32)], axis=1)
  at = jnp.arange(splits.shape[1])[None, :, None] == depth[:, None, None]
  return jnp.where(at, row[:, None, :], splits)


def _dense_beta(relus, splits, beta, n):
  """Sparse multipliers ``[N, S, D]`` at the splits -> dense ``[S, N, *shape]`` per node."""
  out = {}
  s_rows = beta.shape[1]
  layer, neuron, sign = splits[..., 0], splits[..., 1], splits[..., 2]
  b_idx = jnp.broadcast_to(jnp.arange(n)[:, None], layer.shape)
  for i, node in enumerate(relus):
    size = int(np.prod(node.shape[1:]))
    here = (layer == i) & (sign != 0)
    dense = jnp.zeros((s_rows, n, size), beta.dtype)
    dense = dense.at[:, b_idx, jnp.where(here, neuron, size)].set(jnp.transpose(beta, (1, 0, 2)),
                                                                  mode="drop")
    out[str(node.index)] = dense.reshape((s_rows, n) + tuple(node.shape[1:]))
  return out


def _sparse_beta(relus, splits, dense):
  """Dense multipliers per node -> ``[N, S, D]`` at the splits."""
  layer, neuron = splits[..., 0], splits[..., 1]
  out = jnp.zeros((splits.shape[0], next(iter(dense.values())).shape[0], splits.shape[1]),
                  next(iter(dense.values())).dtype) if dense else None
  for i, node in enumerate(relus):
    flat = dense[str(node.index)].reshape(dense[str(node.index)].shape[:2] + (-1,))  # [S, N, M]
    picked = jnp.take_along_axis(flat, jnp.clip(neuron, 0, flat.shape[2] - 1)[None], axis=2)
    out = jnp.where(((layer == i) & (splits[..., 2] != 0))[:, None, :],
                    jnp.transpose(picked, (1, 0, 2)), out)
  return out


def _spec(root: Root, n: int) -> jax.Array:
  """The unsafe set's rows ``[S, N, K]`` for ``n`` subdomains."""
  c = root.unsafe.C
  return jnp.broadcast_to(c[:, None, :], (c.shape[0], n) + c.shape[1:]).astype(root.lower.dtype)


@primitives.highest_precision
def bound_batch(fn: Callable,
                root: Root,
                splits: jax.Array,
                beta: jax.Array | None = None,
                *,
                steps: int,
                lr: float = 0.1,
                lr_beta: float = 0.05,
                record: dict | None = None) -> tuple[jax.Array, jax.Array, dict, dict]:
  """β-CROWN over subdomains ``splits [N, D, 3]`` of the root box (jittable).

  The slopes start at the root's, the multipliers at ``beta [N, S, D]`` (one per
  split; zeros if None). Returns the safety bounds ``[N]`` (the rounding allowances
  subtracted: positive is a proof), the rows' lower bounds ``[S, N]``, the
  optimised parameters and the split masks.
  """
  n = splits.shape[0]
  out, relus = _graph(fn, n, root)
  masks = split_masks(relus, splits)
  init = {"alpha": _broadcast(root.alpha, n, 1)}
  if beta is not None:
    init["beta"] = _dense_beta(relus, splits, beta, n)
  rows, params = bound_subdomains(out,
                                  _spec(root, n),
                                  _broadcast(root.bounds, n, 0),
                                  masks,
                                  steps=steps,
                                  lr=lr,
                                  lr_beta=lr_beta,
                                  init=init,
                                  record=record)
  return _safety(root, rows, params, masks), rows, params, masks


@primitives.highest_precision
def bound_and_branch(fn, root: Root, splits, beta, *, steps, lr, lr_beta, branching, candidates):
  """Bounds subdomains ``splits [N, D, 3]``; returns their safety bounds ``[N]``, multipliers
  ``[N, S, D]``, next branches ``[N, 2]``, candidate inputs ``[N, ...]`` and their safety."""
  n = splits.shape[0]
  _, relus = _graph(fn, n, root)
  bounds = _broadcast(root.bounds, n, 0)
  A = _spec(root, n)
  record: dict = {}
  safety, rows, params, masks = bound_batch(fn,
                                            root,
                                            splits,
                                            beta,
                                            steps=steps,
                                            lr=lr,
                                            lr_beta=lr_beta,
                                            record=record)
  row = _worst_row(root, rows)
  clamped = clamp(relus, bounds, masks)
  scores = _scores(relus, clamped, masks, record, row)
  depth = jnp.sum(splits[..., 2] != 0, axis=1)
  scores = jnp.where((depth < splits.shape[1])[:, None], scores, -jnp.inf)  # no room: no split
  if branching == "babsr":
    best = jnp.argmax(scores, axis=1)
  else:  # FSB: the top BaBSR candidates' children, bounded without optimisation
    k = min(candidates, scores.shape[1])
    top_scores, top = jax.lax.top_k(scores, k)  # [N, k]
    parent = jnp.repeat(jnp.arange(n), k)
    tried = _neuron_of(relus, top.reshape(-1))
    at = jnp.minimum(depth, splits.shape[1] - 1)[parent]
    kids = jnp.concatenate([_with_split(splits[parent], at, tried, sign) for sign in (1, -1)])
    order = jnp.tile(parent, 2)
    kid_out, _ = _graph(fn, 2 * n * k, root)
    kid_masks = split_masks(relus, kids)
    kid_rows, _ = bound_subdomains(kid_out,
                                   jnp.take(A, order, axis=1),
                                   _broadcast(root.bounds, 2 * n * k, 0),
                                   kid_masks,
                                   steps=0,
                                   lr=lr,
                                   lr_beta=lr_beta,
                                   init=jax.tree_util.tree_map(lambda v: jnp.take(v, order, axis=1),
                                                               params))
    worse = jnp.min(_safety(root, kid_rows).reshape(2, n, k), axis=0)  # [N, k]
    worse = jnp.where(top_scores > -jnp.inf, worse, -jnp.inf)
    best = jnp.take_along_axis(top, jnp.argmax(worse, axis=1)[:, None], axis=1)[:, 0]
  branch = jnp.where((jnp.max(scores, axis=1) > -jnp.inf)[:, None], _neuron_of(relus, best), -1)
  # The box corner minimising the worst row's linear bound: a counterexample candidate.
  coef = record.get("input")
  if coef is None:
    x = (root.lower + root.upper) / 2 * jnp.ones((n,) + root.lower.shape[1:], root.lower.dtype)
  else:
    c = jnp.take_along_axis(coef, row[None, :, *(None,) * (coef.ndim - 2)], 0)[0]
    x = jnp.where(c >= 0, root.lower, root.upper)
  x_safety = root.unsafe.safety(fn(x))
  return safety, _sparse_beta(relus, splits, params["beta"]), branch, x, x_safety


# A network's weights are constants of these programs: XLA would fold every bound that
# depends on them alone (the root's intermediate bounds of each convolution's neurons:
# some 25 s of compilation apiece on a small CNN), which they compute once anyway.
NO_CONSTANT_FOLDING = {"xla_disable_hlo_passes": "constant_folding"}

_bound_root = compilation.jit(bound_and_branch,
                              static_argnames=("fn", "steps", "lr", "lr_beta", "branching",
                                               "candidates"))


@compilation.jit(static_argnames=("fn", "batch_size", "steps", "lr", "lr_beta", "branching",
                                  "candidates"),
                 donate_argnames=("pool",))
def _step(fn, root: Root, pool: Pool, *, batch_size, steps, lr, lr_beta, branching, candidates):
  """One round: split the ``batch_size`` open subdomains of lowest bound, bound the children,
  keep the unproven ones. Returns the pool and the round's counts and best candidate."""
  capacity = pool.live.shape[0]
  _, parents = jax.lax.top_k(-jnp.where(pool.live, pool.bound, jnp.inf), batch_size)
  valid = pool.live[parents]
  live = pool.live.at[parents].set(False)
  branch = pool.branch[parents]
  splits = pool.splits[parents]
  depth = pool.depth[parents]
  kids = jnp.concatenate([_with_split(splits, depth, branch, sign) for sign in (1, -1)])
  kid_beta = jnp.concatenate([pool.beta[parents]] * 2)
  kid_valid = jnp.concatenate([valid] * 2)
  safety, beta, next_branch, x, x_safety = bound_and_branch(fn,
                                                            root,
                                                            kids,
                                                            kid_beta,
                                                            steps=steps,
                                                            lr=lr,
                                                            lr_beta=lr_beta,
                                                            branching=branching,
                                                            candidates=candidates)
  # A child lies inside its parent: the parent's bound holds on it too.
  safety = jnp.maximum(safety, jnp.concatenate([pool.bound[parents]] * 2))
  open_ = kid_valid & ~(safety > 0)
  stuck = open_ & (next_branch[:, 0] < 0)  # unproven with no neuron left to split
  keep = open_ & ~stuck
  free = jnp.nonzero(~live, size=2 * batch_size, fill_value=capacity)[0]
  rank = jnp.cumsum(keep) - 1
  dest = jnp.where(keep, free[jnp.clip(rank, 0, 2 * batch_size - 1)], capacity)
  put = lambda a, v: a.at[dest].set(v, mode="drop")
  pool = Pool(splits=put(pool.splits, kids),
              depth=put(pool.depth, jnp.concatenate([depth + 1] * 2)),
              bound=put(pool.bound, safety),
              beta=put(pool.beta, beta),
              branch=put(pool.branch, next_branch),
              live=put(live, keep))
  x_safety = jnp.where(kid_valid, x_safety, jnp.inf)
  worst = jnp.argmin(x_safety)
  stats = dict(bounded=jnp.sum(kid_valid),
               proven=jnp.sum(kid_valid & (safety > 0)),
               stuck=jnp.sum(stuck),
               stuck_flags=stuck,
               stuck_splits=kids,
               overflow=jnp.sum(keep) > jnp.sum(free < capacity),
               open=jnp.sum(pool.live),
               lowest=jnp.min(jnp.where(pool.live, pool.bound, jnp.inf)),
               candidate=x[worst],
               candidate_safety=x_safety[worst])
  return pool, stats


@dataclasses.dataclass(frozen=True)
class Setup:
  """A property prepared for the search: the root and its bound."""
  root: Root
  safety: float
  num_unstable: int


@compilation.jit(static_argnames=("fn", "root_steps", "lr"), compiler_options=NO_CONSTANT_FOLDING)
@primitives.highest_precision
def _root(fn, lo, hi, unsafe: UnsafeSet, *, root_steps, lr):
  box = Interval(lo, hi)
  graph, boxes = build_graph(fn, [box])
  out = graph.outputs[0]
  bounds = optimise_intermediate(relu_nodes(out), intermediate_bounds(graph, boxes, "crown"),
                                 root_steps, lr)
  spec = jnp.broadcast_to(unsafe.C, (1,) + unsafe.C.shape)
  A = jnp.transpose(spec, (1, 0, 2)).astype(lo.dtype)
  rows, params = optimise(out, A, bounds, root_steps, lr)
  # Magnitudes for the rounding model: IBP's within the bounds above.
  magnitudes = ibp_propagate(graph, boxes, bounds)
  passes = rounding.PassBounds(ibp_propagate(graph, boxes), bounds)
  model = rounding.ErrorModel.refined(graph, magnitudes, passes)
  u = er.unit_roundoff(lo.dtype)
  beta_error = {}
  for node in relu_nodes(out):
    x = node.inputs[node.bounded_inputs[0]]
    b = bounds[x.index]
    _, c = primitives.relu_threshold(node, b.lower.dtype)
    e = model.errs[x.index]
    size = jnp.maximum(jnp.abs(b.lower), jnp.abs(b.upper)) + e
    beta_error[str(node.index)] = (e + (rounding.ERROR_FACTOR - 1) * model.computed[x.index] +
                                   2 * u * (size + jnp.abs(c))).astype(lo.dtype)
  allowance = rounding.output_allowance(graph, magnitudes, out, spec, passes, model)
  root = Root(lo, hi, bounds, params["alpha"], unsafe, allowance, beta_error)
  return root, _safety(root, rows)[0], _unstable(relu_nodes(out), bounds)


def prepare(fn: Callable,
            lower: np.ndarray,
            upper: np.ndarray,
            unsafe: UnsafeSet,
            *,
            root_steps: int,
            lr: float,
            dtype: np.dtype = np.float32) -> Setup:
  """CROWN's intermediate bounds and alpha-CROWN's slopes over the box ``[...]``, in
  ``dtype`` (the box rounded outward to it)."""
  lo, hi = (jnp.asarray(v)[None] for v in round_outward(lower, upper, dtype))
  graph, _ = build_graph(fn, [Interval(lo, hi)])
  if len(graph.outputs) != 1 or not hasattr(graph.outputs[0], "index"):
    raise InputError("fn must return one array [N, K] that depends on its input")
  if not relu_nodes(graph.outputs[0]):
    raise InputError("split='relu' needs a network with ReLU (max(x, c)) nodes; this one has "
                     "none (split='input' splits the box)")
  root, safety, unstable = _root(fn, lo, hi, unsafe, root_steps=root_steps, lr=float(lr))
  return Setup(root, float(safety), int(unstable))


def initial_pool(fn: Callable, setup: Setup, *, capacity: int, max_depth: int,
                 **options) -> tuple[Pool, np.ndarray | None]:
  """The pool holding the root subdomain, bounded (live unless proven or unsplittable), and
  the root's counterexample candidate when the network puts it in the unsafe set."""
  s_rows = setup.root.unsafe.C.shape[0]
  root_splits = jnp.zeros((1, max_depth, 3), jnp.int32)
  dtype = setup.root.lower.dtype
  root_beta = jnp.zeros((1, s_rows, max_depth), dtype)
  safety, _, branch, x, x_safety = _bound_root(fn, setup.root, root_splits, root_beta, **options)
  fill = lambda shape, value, dtype: jnp.full((capacity,) + shape, value, dtype)
  live = (safety[0] <= 0) & (branch[0, 0] >= 0)
  pool = Pool(splits=fill((max_depth, 3), 0, jnp.int32),
              depth=fill((), 0, jnp.int32),
              bound=fill((), jnp.inf, dtype).at[0].set(safety[0]),
              beta=fill((s_rows, max_depth), 0.0, dtype),
              branch=fill((2,), -1, jnp.int32).at[0].set(branch[0]),
              live=fill((), False, bool).at[0].set(live))
  return pool, (np.asarray(x[0]) if float(x_safety[0]) <= 0 else None)


def _decide_exactly(fn, lower, upper, unsafe: UnsafeSet, splits: np.ndarray, deadline: float,
                    allowance: np.ndarray) -> tuple[str, np.ndarray | None]:
  """A subdomain no split is left for, decided by the MILP restricted to its splits (a
  linear program when every unstable neuron is split; `verify.milp`)."""
  from verify import milp  # pylint: disable=import-outside-toplevel
  remaining = min(deadline - time.monotonic(), EXACT_SECONDS)
  if remaining <= 0:
    return "unknown", None
  used = splits[splits[:, 2] != 0]
  layers = {}
  for layer, neuron, sign in used:
    layers.setdefault(int(layer), {})[int(neuron)] = int(sign)
  sizes = milp.relu_sizes(fn, lower)
  fixed = {}
  for layer, signs in layers.items():
    fixed[layer] = np.zeros(sizes[layer], np.int8)
    fixed[layer][list(signs)] = list(signs.values())
  try:
    result = milp.milp_verify(fn,
                              lower,
                              upper,
                              unsafe,
                              time_limit=remaining,
                              fixed=fixed,
                              allowance=allowance)
  except (primitives.UnsupportedPrimitiveError, InputError):
    return "unknown", None
  return result.status, result.counterexample


def count_unstable(fn: Callable, lower: np.ndarray, upper: np.ndarray) -> int:
  """Unstable ReLUs of ``fn`` over the box ``[...]`` (rounded outward to float32) by CROWN's
  intermediate bounds."""
  lo, hi = (jnp.asarray(v)[None] for v in round_outward(lower, upper))
  graph, boxes = build_graph(fn, [Interval(lo, hi)])
  if len(graph.outputs) != 1 or not hasattr(graph.outputs[0], "index"):
    raise InputError("fn must return one array [N, K] that depends on its input")
  return int(_count(fn, lo, hi))


@compilation.jit(static_argnames=("fn",))
@primitives.highest_precision
def _count(fn, lo, hi):
  graph, boxes = build_graph(fn, [Interval(lo, hi)])
  bounds = intermediate_bounds(graph, boxes, "crown")
  return _unstable(relu_nodes(graph.outputs[0]), bounds)


def _unstable(relus, bounds) -> jax.Array:
  count = jnp.zeros((), jnp.int32)
  for node in relus:
    b = bounds[node.inputs[node.bounded_inputs[0]].index]
    _, c = primitives.relu_threshold(node, b.lower.dtype)
    count += jnp.sum((b.lower < c) & (b.upper > c))
  return count


def default_batch_size(setup: Setup) -> int:
  """Subdomains split per step: the backend policy's ``bab_batch_size`` (32 on CPU); where it
  is 0, the largest power of two up to `MAX_BATCH_SIZE` whose children's slopes, multipliers,
  gradients and Adam states (about 8 values per specification row and ReLU neuron each) fit
  `ACCELERATOR_BUDGET`."""
  if backend.fast_paths().bab_batch_size:
    return backend.fast_paths().bab_batch_size
  rows = setup.root.unsafe.C.shape[0]
  neurons = sum(int(np.prod(b.shape[2:])) for b in setup.root.alpha.values())
  per_child = 8 * rows * max(neurons, 1)
  batch = MAX_BATCH_SIZE
  while batch > 1 and 2 * batch * per_child > ACCELERATOR_BUDGET:
    batch //= 2
  return batch


def search(fn: Callable,
           lower: np.ndarray,
           upper: np.ndarray,
           unsafe: UnsafeSet,
           *,
           deadline: float,
           confirm: Callable[[np.ndarray], bool],
           batch_size: int | None = None,
           capacity: int = 65536,
           max_depth: int = 64,
           branching: str = "babsr",
           candidates: int = 3,
           steps: int = 5,
           root_steps: int = 50,
           lr: float = 0.1,
           lr_beta: float = 0.05,
           log_every: float = 10.0,
           dtype: np.dtype = np.float32):
  """ReLU-split branch and bound over the box ``[lower, upper]`` (one input ``[...]``).

  Args:
    fn: ``fn(x [B, ...]) -> [B, K]``, affine operations and ReLUs (any primitive
      `verify.crown` bounds, with at least one ReLU).
    lower, upper: ``[...]`` the box.
    unsafe: the unsafe set of outputs.
    deadline: ``time.monotonic()`` value at which to stop with ``"timeout"``.
    confirm: ``confirm(x [...]) -> bool``, whether a candidate counterexample is one.
    batch_size: subdomains split per step (``2 * batch_size`` children bounded at once);
      None: `default_batch_size`.
    capacity: open subdomains the pool holds.
    max_depth: splits per subdomain at most.
    branching: ``"babsr"`` or ``"fsb"``.
    candidates: FSB's candidates per subdomain.
    steps: Adam steps of β-CROWN per batch of children.
    root_steps: alpha-CROWN's steps over the root box.
    lr, lr_beta: Adam's learning rates for the slopes and the multipliers.
    log_every: seconds between progress lines.
    dtype: the bound passes' (`verify.interval.precision_dtype`).

  Returns:
    ``(status, counterexample, subdomains bounded)``: ``"verified"``,
    ``"falsified"``, ``"timeout"`` or ``"unknown"`` (the pool overflowed, or an
    unproven subdomain has every unstable neuron split or ``max_depth`` splits).
  """
  if branching not in BRANCHING:
    raise InputError(f"branching must be one of {BRANCHING}, got {branching!r}")
  for value, name in ((1 if batch_size is None else batch_size,
                       "batch_size"), (capacity, "capacity"), (candidates, "candidates"),
                      (max_depth, "max_depth"), (steps, "steps"), (root_steps, "root_steps")):
    if isinstance(
        value, bool) or not isinstance(value,
                                       (int, np.integer)) or value < (0 if "steps" in name else 1):
      raise InputError(f"{name} must be a positive integer, got {value!r}")
  if batch_size is not None and capacity < 2 * batch_size:
    raise InputError(f"capacity ({capacity}) must hold at least two batches of children "
                     f"(2 * batch_size = {2 * batch_size})")
  start = time.monotonic()
  if start > deadline:
    return "timeout", None, 0
  setup = prepare(fn, lower, upper, unsafe, root_steps=root_steps, lr=lr, dtype=dtype)
  if setup.safety > 0:
    return "verified", None, 1
  if batch_size is None:
    batch_size = min(default_batch_size(setup), capacity // 2)
  options = dict(steps=steps,
                 lr=float(lr),
                 lr_beta=float(lr_beta),
                 branching=branching,
                 candidates=candidates)
  # One shape of pool for every property of a network: one compilation.
  pool, x = initial_pool(fn, setup, capacity=capacity, max_depth=max_depth, **options)
  if x is not None and confirm(x):
    return "falsified", x, 1
  if not bool(pool.live[0]):
    return ("verified" if float(pool.bound[0]) > 0 else "unknown"), None, 1
  bounded, stuck, last_log = 1, 0, start
  while True:
    if time.monotonic() > deadline:
      return "timeout", None, bounded
    pool, stats = _step(fn, setup.root, pool, batch_size=batch_size, **options)
    stats = jax.device_get(stats)
    bounded += int(stats["bounded"])
    if stats["candidate_safety"] <= 0 and confirm(np.asarray(stats["candidate"])):
      return "falsified", np.asarray(stats["candidate"]), bounded
    for splits in stats["stuck_splits"][stats["stuck_flags"]]:
      status, x = _decide_exactly(fn, lower, upper, unsafe, splits, deadline,
                                  np.asarray(setup.root.allowance)[0])
      if status == "falsified" and confirm(x):
        return "falsified", x, bounded
      stuck += status != "verified"
    if stats["overflow"]:
      return "unknown", None, bounded
    now = time.monotonic()
    if now - last_log > log_every:
      last_log = now
      logging.info(
          "relu branch and bound: %d subdomains bounded (%.0f/s), %d open, lowest "
          "bound %.4g", bounded, bounded / (now - start), int(stats["open"]),
          float(stats["lowest"]))
    if int(stats["open"]) == 0:
      return ("unknown" if stuck else "verified"), None, bounded

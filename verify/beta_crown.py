"""β-CROWN: bounds over subdomains of ReLU splits, the splits carried by optimised multipliers.

A subdomain is the input box where some ReLU inputs have a fixed side of their
threshold: the split ``(layer, neuron, +1)`` keeps the points where that
neuron's input ``x`` is at least the threshold ``c`` of its ``max(x, c)`` or
``min(x, c)`` (0 for a ReLU: the neuron is active), ``(layer, neuron, -1)`` those
where it is at most ``c``. ``layer`` counts the function's ReLU nodes in order
(`relu_layers`), ``neuron`` is an index into one example's flattened node.

Over a subdomain the split neurons' input bounds are clamped at ``c`` (their
relaxations become exact), and for any multipliers ``beta >= 0``

    min_{x in subdomain} A.f(x) >= min_{x in box} [A.f(x) - sum_j beta_j s_j (x_j - c_j)]

since every term of the sum is non-negative on the subdomain. The right side
is bounded by CROWN's backward pass with the term folded in at each split
neuron (`verify.crown.backward`'s ``betas``); the lower slopes (alpha) and the
multipliers (beta) are optimised together by Adam (optax), per row and
subdomain, keeping the best bound seen, the unoptimised one included. Every
``beta >= 0`` gives a sound bound, so the optimisation only tightens it.
Intermediate bounds are CROWN's over the box (or given), clamped by the splits.

Reference:
  Wang et al., "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
  Constraints for Neural Network Robustness Verification", NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustlib.checks import InputError
from verify import primitives
from verify.alpha_crown import optimise
from verify.alpha_crown import relu_nodes
from verify.crown import _prepare
from verify.crown import _spec_rows
from verify.crown import intermediate_bounds
from verify.graph import Node
from verify.graph import build_graph
from verify.interval import Interval


@dataclasses.dataclass(frozen=True)
class ReluLayer:
  """One ReLU (``max(x, c)`` or ``min(x, c)`` of a bounded ``x``) node of a traced function.

  Attributes:
    layer: its position among the function's ReLU nodes (a split's ``layer``).
    shape: one example's shape ``(...)``.
    size: neurons per example (a split's ``neuron`` is below it).
    where: the operation and the user's source line.
  """
  layer: int
  shape: tuple[int, ...]
  size: int
  where: str


def layers_of(out: Node) -> list[ReluLayer]:
  """The `ReluLayer` of every ReLU node the bound of ``out`` passes through."""
  return [
      ReluLayer(i, tuple(n.shape[1:]), int(np.prod(n.shape[1:], dtype=np.int64)), n.describe())
      for i, n in enumerate(relu_nodes(out))
  ]


def relu_layers(fn: Callable, interval: Interval) -> list[ReluLayer]:
  """The ReLU layers of ``fn`` that splits may name, in order.

  Args:
    fn: ``fn(x) -> [N, K]``.
    interval: an input box ``[N, ...]`` (its shape and dtype).
  """
  graph, _ = build_graph(fn, [interval])
  if len(graph.outputs) != 1 or not isinstance(graph.outputs[0], Node):
    raise InputError("fn must return one array [N, K] that depends on its input")
  return layers_of(graph.outputs[0])


def split_masks(relus: list[Node], splits: jax.Array) -> dict[int, jax.Array]:
  """Per ReLU node (by graph index) its split signs ``int8 [N, *shape]`` in {-1, 0, 1}.

  Args:
    relus: the ReLU nodes, in `relu_layers`' order.
    splits: ``int [N, D, 3]`` rows ``(layer, neuron, sign)``; sign 0 rows are padding.
  """
  n = splits.shape[0]
  layer, neuron, sign = splits[..., 0], splits[..., 1], splits[..., 2]
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], layer.shape)
  masks = {}
  for i, node in enumerate(relus):
    size = int(np.prod(node.shape[1:], dtype=np.int64))
    here = (layer == i) & (sign != 0)
    flat = jnp.zeros((n, size),
                     jnp.int8).at[rows, jnp.where(here, neuron, size)].set(sign.astype(jnp.int8),
                                                                           mode="drop")
    masks[node.index] = flat.reshape((n,) + tuple(node.shape[1:]))
  return masks


def clamp(relus: list[Node], bounds: dict[int, Interval],
          masks: dict[int, jax.Array]) -> dict[int, Interval]:
  """The bounds with every split neuron's input clamped at its threshold (splits are on
  neurons whose bounds straddle it, so the clamped bounds stay ordered)."""
  bounds = dict(bounds)
  for node in relus:
    x = node.inputs[node.bounded_inputs[0]]
    box = bounds[x.index]
    _, c = primitives.relu_threshold(node, box.lower.dtype)
    m = masks[node.index]
    lower = jnp.where(m > 0, jnp.maximum(box.lower, c), box.lower)
    upper = jnp.where(m < 0, jnp.minimum(box.upper, c), box.upper)
    bounds[x.index] = Interval(lower, jnp.maximum(lower, upper))
  return bounds


def bound_subdomains(out: Node,
                     A: jax.Array,
                     bounds: dict[int, Interval],
                     masks: dict[int, jax.Array],
                     *,
                     steps: int,
                     lr: float,
                     lr_beta: float,
                     init: dict | None = None,
                     record: dict | None = None) -> tuple[jax.Array, dict]:
  """Lower bounds ``[S, N]`` of the rows ``A`` over each subdomain and the optimised
  parameters (`verify.alpha_crown.optimise`)."""
  return optimise(out,
                  A,
                  clamp(relu_nodes(out), bounds, masks),
                  steps,
                  lr,
                  masks=masks,
                  lr_beta=lr_beta,
                  init=init,
                  record=record)


def check_splits(layers: list[ReluLayer], splits, n: int) -> None:
  """Clear errors for splits of the wrong shape or on neurons that do not exist."""
  shape = jnp.shape(splits)
  if len(shape) != 3 or shape[0] != n or shape[2] != 3:
    raise InputError(f"splits must have shape [N={n}, D, 3] (layer, neuron, sign), got {shape}")
  if not jnp.issubdtype(jnp.result_type(splits), jnp.integer):
    raise InputError(f"splits must be integers, got dtype {jnp.result_type(splits)}")
  if isinstance(splits, jax.core.Tracer):
    return
  s = np.asarray(splits)
  bad_sign = ~np.isin(s[..., 2], (-1, 0, 1))
  if bad_sign.any():
    raise InputError(f"a split's sign must be -1, 0 (padding) or 1, got {s[..., 2][bad_sign][0]}")
  used = s[..., 2] != 0
  layer, neuron = s[..., 0][used], s[..., 1][used]
  if used.any() and (layer.min() < 0 or layer.max() >= len(layers)):
    raise InputError(f"a split names ReLU layer {layer[(layer < 0) | (layer >= len(layers))][0]}, "
                     f"but the function has {len(layers)} (verify.relu_layers)")
  for ly in layers:
    here = neuron[layer == ly.layer]
    if here.size and (here.min() < 0 or here.max() >= ly.size):
      raise InputError(f"a split names neuron {here[(here < 0) | (here >= ly.size)][0]} of ReLU "
                       f"layer {ly.layer} ({ly.where}), which has {ly.size}")


def check_unstable(relus: list[Node], bounds: dict[int, Interval], splits) -> None:
  """Refuses a split on a neuron the bounds already find stable (a split that cannot help,
  or an empty subdomain the caller did not mean)."""
  if isinstance(splits, jax.core.Tracer):
    return
  s = np.asarray(splits)
  for b, d in zip(*np.nonzero(s[..., 2])):
    layer, neuron, _ = s[b, d]
    node = relus[layer]
    box = bounds[node.inputs[node.bounded_inputs[0]].index]
    _, c = primitives.relu_threshold(node, box.lower.dtype)
    lo = float(box.lower[b].reshape(-1)[neuron])
    hi = float(box.upper[b].reshape(-1)[neuron])
    cv = float(c[b].reshape(-1)[neuron])
    if lo >= cv or hi <= cv:
      raise InputError(f"split {d} of subdomain {b} is on a stable neuron: neuron {neuron} of ReLU "
                       f"layer {layer} ({node.describe()}) has input bounds [{lo:.6g}, {hi:.6g}] "
                       f"on one side of its threshold {cv:g}")


@primitives.highest_precision
def beta_crown(fn: Callable,
               interval: Interval,
               spec: jax.typing.ArrayLike,
               splits: jax.typing.ArrayLike,
               *,
               steps: int = 20,
               lr: float = 0.1,
               lr_beta: float = 0.05,
               chunk_size: int | None = None) -> jax.Array:
  """β-CROWN lower bounds on ``spec @ fn(x)`` over each subdomain of ReLU splits.

  Args:
    fn: ``fn(x) -> [N, K]`` made of supported primitives.
    interval: the input box of each subdomain ``[N, ...]``.
    spec: ``C`` ``[N, S, K]``.
    splits: ``int [N, D, 3]``: subdomain ``n`` keeps the points of its box where,
      for each row ``(layer, neuron, sign)`` with ``sign`` in {-1, 1}, the input of
      that neuron is on that side of its threshold (0: a padding row). Splits must
      name unstable neurons of `relu_layers` (their CROWN bounds over the box
      straddle the threshold).
    steps: Adam steps on alpha and beta (0: CROWN over the clamped bounds).
    lr: Adam's learning rate for the slopes.
    lr_beta: Adam's learning rate for the multipliers.
    chunk_size: as in `verify.crown`, for the intermediate bounds.

  Returns:
    ``[N, S]`` lower bounds of the real-valued function, as `verify.crown`'s. A proof
    from them subtracts `verify.rounding_allowance` and the allowance of the split
    terms (`verify.relu_bab.beta_allowance`), as ``branch_and_bound(split="relu")`` does.

  Raises:
    InputError: for bad shapes, splits on neurons that do not exist or are stable.
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise InputError(f"steps must be an integer >= 0, got {steps!r}")
  for value, name in ((lr, "lr"), (lr_beta, "lr_beta")):
    if isinstance(value, bool) or not np.isscalar(value) or not float(value) > 0:
      raise InputError(f"{name} must be a positive number, got {value!r}")
  if spec is None:
    raise InputError("beta_crown needs a spec [N, S, K]")
  graph, boxes, out, out_shape, spec = _prepare(fn, interval, spec)
  if not isinstance(out, Node):
    raise InputError("fn's output does not depend on its input: nothing to split")
  n = interval.shape[0]
  layers = layers_of(out)
  check_splits(layers, splits, n)
  splits = jnp.asarray(splits, jnp.int32)
  relus = relu_nodes(out)
  bounds = intermediate_bounds(graph, boxes, "crown", chunk_size)
  check_unstable(relus, bounds, splits)
  A, _ = _spec_rows(out_shape, spec, interval.dtype)
  rows, _ = bound_subdomains(out,
                             A,
                             bounds,
                             split_masks(relus, splits),
                             steps=steps,
                             lr=lr,
                             lr_beta=lr_beta)
  return rows.T

"""A branch-and-bound attack: counterexamples where gradient attacks stop.

Zhang et al. 2022 search the tree of ReLU splits for adversarial examples,
guided by bounds. This attack keeps their ingredients in a compact loop:

1. a pool of adversarial candidates: projected gradient descent towards every
   other class from many random starts (`verify.falsification`, one batched
   call); the candidates of least safety are kept;
2. for a candidate, its activation pattern steers the splits: the unstable
   ReLUs (CROWN's bounds over the ball) are fixed to the sides the candidate
   puts them on, except the ``free`` ones nearest their thresholds there
   (relative to their bounds' width): a subdomain around the candidate;
3. β-CROWN bounds every such subdomain of the beam (one batched call); those
   it proves safe are skipped, the others are taken lowest bound first;
4. a small mixed-integer program "dives" into the subdomain (`verify.milp`
   with those neurons fixed: ``free`` binaries only), exactly, under a short
   time limit; its solution, when the network confirms it, is the adversarial
   example, else it joins the candidates;
5. subdomains widen (more free neurons) while time is left.

Every counterexample returned is the network's own misclassification of a
point of the ball (and box). Not finding one proves nothing, unless the
root's bounds or a full-width dive (every unstable neuron free, the complete
MILP) did: then the status says ``"verified"``.

Reference:
  Zhang et al., "A Branch and Bound Framework for Stronger Adversarial Attacks
  of ReLU Networks", ICML 2022.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib.checks import InputError
from verify import primitives
from verify import relu_bab
from verify.alpha_crown import relu_nodes
from verify.graph import build_graph
from verify.graph import evaluate
from verify.interval import Interval
from verify.falsification import falsify_runs
from verify.milp import milp_verify
from verify.unsafe import UnsafeSet


@dataclasses.dataclass(frozen=True)
class BabAttackResult:
  """The outcome of `bab_attack` for one point.

  Attributes:
    status: ``"broken"`` (``x_adv`` is misclassified), ``"verified"`` (the bounds
      or the complete program proved the ball safe) or ``"unknown"``.
    x_adv: the adversarial input ``[...]`` when broken, else None.
    stage: what found it: ``"descent"``, ``"dive"``, or where the search stopped.
    dives: programs solved.
    seconds: wall time.
  """
  status: str
  x_adv: np.ndarray | None
  stage: str
  dives: int
  seconds: float


def _pre_activations(fn: Callable, relus, points: jax.Array) -> list[np.ndarray]:
  graph, _ = build_graph(fn, [Interval(points, points)])
  values = evaluate(graph, [points])
  return [
      np.asarray(values[r.inputs[r.bounded_inputs[0]].index]).reshape(points.shape[0], -1)
      for r in relu_nodes(graph.outputs[0])
  ]


def bab_attack(fn: Callable[[jax.Array], jax.Array],
               x: jax.typing.ArrayLike,
               y: int,
               eps: float,
               key: jax.Array,
               *,
               time_limit: float = 60.0,
               restarts: int = 64,
               pgd_steps: int = 100,
               candidates: int = 4,
               free: Sequence[int] = (12, 24, 48, 96),
               dive_limit: float = 10.0,
               bounds: Sequence[float] = (0.0, 1.0)) -> BabAttackResult:
  """Searches the L-inf ball of ``x`` (within ``bounds``) for a point ``fn`` misclassifies.

  Args:
    fn: ``fn(x [B, ...]) -> [B, K]``, affine operations and ReLUs.
    x: one input ``[...]``.
    y: its label.
    eps: the radius.
    key: PRNG key of the random starts.
    time_limit: seconds in all.
    restarts: descent runs from random starts (batched) filling the candidate pool.
    pgd_steps: steps per run.
    candidates: candidates (lowest margins first) whose patterns steer the dives.
    free: the numbers of unstable neurons left free in the dives, in turn.
    dive_limit: seconds per program.
    bounds: the input box.

  Returns:
    A `BabAttackResult`.
  """
  start = time.monotonic()
  x = np.asarray(x, np.float32)
  if not (np.isscalar(eps) and float(eps) > 0):
    raise InputError(f"eps must be a positive number, got {eps!r}")
  if time_limit <= 0 or dive_limit <= 0:
    raise InputError(f"time_limit and dive_limit must be positive, got {time_limit} and "
                     f"{dive_limit}")
  for value, name in ((restarts, "restarts"), (pgd_steps, "pgd_steps"), (candidates, "candidates")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise InputError(f"{name} must be a positive integer, got {value!r}")
  if not free or any(int(f) < 1 for f in free):
    raise InputError(f"free must list positive numbers of neurons, got {free!r}")
  lo = np.clip(x - eps, *bounds).astype(np.float32)
  hi = np.clip(x + eps, *bounds).astype(np.float32)
  k = int(jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x.shape, jnp.float32)).shape[1])
  if not 0 <= y < k:
    raise InputError(f"label {y} is not one of the {k} classes")
  unsafe = UnsafeSet.misclassified(int(y), k)
  done = lambda status, stage, x_adv=None, dives=0: BabAttackResult(status, x_adv, stage, dives,
                                                                    time.monotonic() - start)
  broken = lambda z: int(np.argmax(np.asarray(fn(jnp.asarray(z)[None]))[0])) != y

  # 1. Candidates: projected gradient descent from random starts, batched.
  per = max(1, -(-restarts // unsafe.num_polytopes))
  points, safety = falsify_runs(fn, jnp.asarray(lo), jnp.asarray(hi), unsafe, key, pgd_steps, per)
  points, order = np.clip(np.asarray(points), lo, hi), np.argsort(np.asarray(safety))
  if broken(points[order[0]]):
    return done("broken", "descent", points[order[0]])
  pool = [points[i] for i in order[:candidates]]

  # 2. The unstable neurons over the ball.
  setup = relu_bab.prepare(fn, lo, hi, unsafe, root_steps=20, lr=0.1)
  if setup.safety > 0:
    return done("verified", "bounds")
  graph, _ = build_graph(fn, [Interval(jnp.asarray(lo)[None], jnp.asarray(hi)[None])])
  relus = relu_nodes(graph.outputs[0])
  layer_bounds = []
  for node in relus:
    b = setup.root.bounds[node.inputs[node.bounded_inputs[0]].index]
    _, c = primitives.relu_threshold(node, b.lower.dtype)
    layer_bounds.append(tuple(np.asarray(v).reshape(-1) for v in (b.lower, b.upper, c)))
  unstable = [(l < c) & (u > c) for l, u, c in layer_bounds]
  total = int(sum(m.sum() for m in unstable))
  dives, seen = 0, set()
  for width in sorted({min(int(f), total) for f in free}):
    # 3. The beam: one subdomain per candidate, bounded together by beta-CROWN.
    beam = [_subdomain(fn, relus, layer_bounds, unstable, z, width) for z in pool]
    beam = [b for b in beam if b[0] not in seen]
    if not beam:
      continue
    lower = _beam_bounds(fn, setup, relus, [b[1] for b in beam])
    for i in np.argsort(lower):
      if time.monotonic() - start > time_limit:
        return done("unknown", "time", dives=dives)
      key_, fixed = beam[i]
      seen.add(key_)
      if lower[i] > 0:  # proven: no counterexample in this subdomain
        continue
      # 4. The dive: a program with `width` binaries.
      limit = min(dive_limit, time_limit - (time.monotonic() - start))
      result = milp_verify(fn, lo, hi, unsafe, time_limit=max(limit, 1e-3), fixed=fixed)
      dives += 1
      if result.status == "falsified" and broken(result.counterexample):
        return done("broken", "dive", result.counterexample, dives)
      if width == total and result.status == "verified":
        return done("verified", "dive", dives=dives)
    logging.info("bab_attack: %d free neurons, %d dives, %.1f s", width, dives,
                 time.monotonic() - start)
  return done("unknown", "exhausted", dives=dives)


def _subdomain(fn, relus, layer_bounds, unstable, z: np.ndarray, width: int):
  """The candidate's pattern on the unstable neurons but the ``width`` nearest their
  thresholds: a hashable key and the signs per layer (`verify.milp.encode`'s ``fixed``)."""
  pre = _pre_activations(fn, relus, jnp.asarray(z)[None])
  closeness, signs = [], []
  for (l, u, c), m, p in zip(layer_bounds, unstable, pre):
    p = p[0]
    closeness.append(np.where(m, np.abs(p - c) / np.maximum(u - l, 1e-12), np.inf))
    signs.append(np.where(m, np.where(p >= c, 1, -1), 0).astype(np.int8))
  flat = np.concatenate(closeness)
  free = np.argsort(flat)[:width]
  sizes = np.cumsum([0] + [s.size for s in signs])
  for j in free:
    layer = int(np.searchsorted(sizes, j, side="right") - 1)
    signs[layer][j - sizes[layer]] = 0
  return tuple(np.concatenate(signs).tolist()), dict(enumerate(signs))


def _beam_bounds(fn, setup, relus, fixed_list) -> np.ndarray:
  """beta-CROWN lower bounds on the safety over each subdomain ``[B]``."""
  rows = []
  for fixed in fixed_list:
    split = [(layer, j, int(s))
             for layer, signs in fixed.items()
             for j in np.flatnonzero(signs)
             for s in [signs[j]]]
    rows.append(split)
  depth = max(1, max(len(r) for r in rows))
  splits = np.zeros((len(rows), depth, 3), np.int32)
  for i, r in enumerate(rows):
    if r:
      splits[i, :len(r)] = r
  return np.asarray(_bound_beam(fn, setup.root, jnp.asarray(splits)))


@compilation.jit(static_argnames=("fn",))
def _bound_beam(fn, root, splits):
  return relu_bab.bound_batch(fn, root, splits, steps=20)[0]

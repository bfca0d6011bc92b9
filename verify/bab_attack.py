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
3. β-CROWN bounds every subdomain of the beam (one batched call): the
   candidates' own, then random free sets drawn near the thresholds; those it
   proves safe are skipped, the others are taken lowest bound first;
4. descent restarted inside the unproven subdomains: signed gradient steps on
   the safety plus a penalty on the splits' violations (`SPLIT_PENALTY`, per
   unit of each neuron's bounds' width), from the candidate and from the input
   that minimises the subdomain's β-CROWN bound (one batched call); then a small
   mixed-integer program "dives" into each (`verify.milp` with those neurons
   fixed: ``free`` binaries only), exactly, under a short time limit; a point
   either finds, when the network confirms it, is the adversarial example;
5. descent from new random starts adds to the pool, and the next round's
   subdomains are wider (more free neurons: ``free``, then doubling up to every
   unstable neuron, the complete program) where the bounds or the dives ruled
   out all of this round's, narrower where a dive ran out of time; until the
   time limit.

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
from robustlib.checks import InputError, as_key
from verify import primitives
from verify import relu_bab
from verify.alpha_crown import relu_nodes
from verify.graph import build_graph
from verify.graph import evaluate
from verify.interval import Interval
from verify.interval import round_inward
from verify.interval import round_outward
from verify.falsification import falsify_runs
from verify.falsification import signed_descent
from verify.milp import milp_verify
from verify.unsafe import UnsafeSet

# Weight of a split's violation, per unit of its neuron's bounds' width, against the safety
# (logits) in the descent inside a subdomain.
SPLIT_PENALTY = 10.0


@dataclasses.dataclass(frozen=True)
class BabAttackResult:
  """The outcome of `bab_attack` for one point.

  Attributes:
    status: ``"broken"`` (``x_adv`` is misclassified), ``"verified"`` (the bounds
      or the complete program proved the ball safe) or ``"unknown"``.
    x_adv: the adversarial input ``[...]`` when broken, else None.
    stage: what found it: ``"descent"``, ``"subdomain descent"``, ``"dive"``, or where the
      search stopped.
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
               beam_size: int = 16,
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
    free: the first numbers of unstable neurons left free in the dives (then doubling).
    dive_limit: seconds per program.
    beam_size: subdomains bounded together per round.
    bounds: the input box.

  Returns:
    A `BabAttackResult`.
  """
  start = time.monotonic()
  x = np.asarray(x, np.float32)
  key = as_key(key)
  if not (np.isscalar(eps) and float(eps) > 0):
    raise InputError(f"eps must be a positive number, got {eps!r}")
  if time_limit <= 0 or dive_limit <= 0:
    raise InputError(f"time_limit and dive_limit must be positive, got {time_limit} and "
                     f"{dive_limit}")
  for value, name in ((restarts, "restarts"), (pgd_steps, "pgd_steps"), (candidates, "candidates"),
                      (beam_size, "beam_size")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise InputError(f"{name} must be a positive integer, got {value!r}")
  if not free or any(int(f) < 1 for f in free):
    raise InputError(f"free must list positive numbers of neurons, got {free!r}")
  ball = np.clip(x.astype(np.float64) - eps, *bounds), np.clip(x.astype(np.float64) + eps, *bounds)
  lo, hi = round_inward(*ball)  # where the attack's points lie
  proof_lo, proof_hi = round_outward(*ball)  # what the bounds and the programs cover
  k = int(jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x.shape, jnp.float32)).shape[1])
  if not 0 <= y < k:
    raise InputError(f"label {y} is not one of the {k} classes")
  unsafe = UnsafeSet.misclassified(int(y), k)
  done = lambda status, stage, x_adv=None, dives=0: BabAttackResult(status, x_adv, stage, dives,
                                                                    time.monotonic() - start)

  def adversarial(z):  # ``z`` in the ball if ``fn`` misclassifies it there, else None
    z = np.clip(z, lo, hi)
    return z if int(np.argmax(np.asarray(fn(jnp.asarray(z)[None]))[0])) != y else None

  # 1. Candidates: projected gradient descent from random starts, batched.
  per = max(1, -(-restarts // unsafe.num_polytopes))
  points, safety = falsify_runs(fn, jnp.asarray(lo), jnp.asarray(hi), unsafe, key, pgd_steps, per)
  points, order = np.clip(np.asarray(points), lo, hi), np.argsort(np.asarray(safety))
  if (z := adversarial(points[order[0]])) is not None:
    return done("broken", "descent", z)
  pool = [(float(np.asarray(safety)[i]), points[i]) for i in order[:candidates]]

  # 2. The unstable neurons over the ball.
  setup = relu_bab.prepare(fn, proof_lo, proof_hi, unsafe, root_steps=20, lr=0.1)
  if setup.safety > 0:
    return done("verified", "bounds")
  graph, _ = build_graph(fn, [Interval(jnp.asarray(proof_lo)[None], jnp.asarray(proof_hi)[None])])
  relus = relu_nodes(graph.outputs[0])
  layer_bounds = []
  for node in relus:
    b = setup.root.bounds[node.inputs[node.bounded_inputs[0]].index]
    _, c = primitives.relu_threshold(node, b.lower.dtype)
    layer_bounds.append(tuple(np.asarray(v).reshape(-1) for v in (b.lower, b.upper, c)))
  unstable = [(l < c) & (u > c) for l, u, c in layer_bounds]
  total = int(sum(m.sum() for m in unstable))
  widths = sorted({min(int(f), total) for f in free})
  while widths[-1] < total:  # then doubling, up to the complete program
    widths.append(min(2 * widths[-1], total))
  draw = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  dives, seen, rounds, level = 0, set(), 0, 0
  allowance = np.asarray(setup.root.allowance)[0]  # the root's holds in every subdomain
  while time.monotonic() - start < time_limit:
    # 3. The beam: the candidates' subdomains at this round's width (the neurons nearest their
    #    thresholds free), then random free sets drawn near the thresholds, bounded together.
    width = widths[level]
    beam, fresh = [], set()
    for attempt in range(4 * beam_size):
      z = pool[attempt % len(pool)][1]
      sub = _subdomain(fn, relus, layer_bounds, unstable, z, width,
                       None if attempt < len(pool) else draw)
      if sub[0] not in seen and sub[0] not in fresh:
        fresh.add(sub[0])
        beam.append((*sub, z))
      if len(beam) == beam_size:
        break
    rounds += 1
    if not beam:  # every subdomain of this width was tried
      if level == len(widths) - 1:
        return done("unknown", "exhausted", dives=dives)
      level += 1
      continue
    lower, corners = _beam_bounds(fn, setup, [b[1] for b in beam], beam_size)
    todo = [i for i in np.argsort(lower) if lower[i] <= 0]
    if todo:  # 4. descent inside the unproven subdomains, then the dives
      starts = np.concatenate([np.stack([beam[i][2] for i in todo]), corners[todo]])
      signs = [np.stack([beam[i][1][layer] for i in todo] * 2) for layer in range(len(relus))]
      found, found_safety = _subdomain_descent(fn, starts, signs, layer_bounds, lo, hi, unsafe,
                                               pgd_steps, 2 * beam_size)
      if found_safety[0] <= 0 and (z := adversarial(found[0])) is not None:
        return done("broken", "subdomain descent", z, dives)
    seen.update(b[0] for b in beam)
    outcomes = []
    for i in todo:
      if time.monotonic() - start > time_limit:
        return done("unknown", "time", dives=dives)
      key_, fixed, _ = beam[i]
      # The dive: a program with `width` binaries.
      limit = min(dive_limit, time_limit - (time.monotonic() - start))
      result = milp_verify(fn,
                           proof_lo,
                           proof_hi,
                           unsafe,
                           time_limit=max(limit, 1e-3),
                           fixed=fixed,
                           allowance=allowance)
      dives += 1
      outcomes.append(result.status)
      if result.status == "falsified" and (z := adversarial(result.counterexample)) is not None:
        return done("broken", "dive", z, dives)
      if width == total and result.status == "verified":
        return done("verified", "dive", dives=dives)
    # The neighbourhood adapts (Zhang et al.'s large neighbourhood search): wider where the
    # bounds or the programs rule every subdomain out, narrower where a program runs out of
    # time.
    level = max(level - 1, 0) if "unknown" in outcomes else min(level + 1, len(widths) - 1)
    # 5. New candidates: descent from new random starts joins the pool.
    more, more_safety = falsify_runs(fn, jnp.asarray(lo), jnp.asarray(hi), unsafe,
                                     jax.random.fold_in(key, rounds), pgd_steps, per)
    more = np.clip(np.asarray(more), lo, hi)
    best = int(np.argmin(np.asarray(more_safety)))
    if (z := adversarial(more[best])) is not None:
      return done("broken", "descent", z, dives)
    pool.append((float(np.asarray(more_safety)[best]), more[best]))
    pool = sorted(pool, key=lambda c: c[0])[:candidates]
    logging.info("bab_attack: round %d, %d free neurons, %d bounded, %d dives, %.1f s", rounds,
                 width, len(beam), dives,
                 time.monotonic() - start)
  return done("unknown", "time", dives=dives)


def bab_attack_examples(logits_fn: Callable[[jax.Array], jax.Array], x: np.ndarray, y: np.ndarray,
                        eps: float, todo: np.ndarray, key: jax.Array, time_limit: float) -> dict:
  """`bab_attack` on each example ``todo`` marks (say, robust to the attacks and not
  verified): an evaluation's strongest stage, with a log line per example (rate, ETA).

  Args:
    logits_fn: ``[N, ...] -> [N, K]``, affine operations and ReLUs.
    x: inputs ``[N, ...]`` in [0, 1]; y: labels ``[N]``.
    eps: the L-inf radius.
    todo: bool ``[N]``.
    key: PRNG key (folded with each example's index).
    time_limit: seconds per example.

  Returns:
    ``{"examples", "broken", "verified", "broken_flags", "verified_flags"}`` (flags bool
    ``[N]``).
  """
  x = np.asarray(x)
  key = as_key(key)
  shape = x.shape[1:]
  flat = lambda z: logits_fn(z.reshape((z.shape[0],) + shape))
  broken, proven = np.zeros(x.shape[0], bool), np.zeros(x.shape[0], bool)
  jobs = np.flatnonzero(np.asarray(todo, bool))
  start = time.monotonic()
  for n, i in enumerate(jobs):
    r = bab_attack(flat,
                   x[i].reshape(-1),
                   int(y[i]),
                   eps,
                   jax.random.fold_in(key, int(i)),
                   time_limit=time_limit)
    broken[i], proven[i] = r.status == "broken", r.status == "verified"
    rate = (n + 1) / max(time.monotonic() - start, 1e-9)
    logging.info("bab_attack: %d/%d examples (%.2f/s, ETA %.0f s): example %d %s (%s, %.1f s)",
                 n + 1, jobs.size, rate, (jobs.size - n - 1) / rate, i, r.status, r.stage,
                 r.seconds)
  return {
      "examples": int(jobs.size),
      "broken": int(broken.sum()),
      "verified": int(proven.sum()),
      "broken_flags": broken,
      "verified_flags": proven,
  }


def _subdomain(fn,
               relus,
               layer_bounds,
               unstable,
               z: np.ndarray,
               width: int,
               draw: np.random.Generator | None = None):
  """The candidate's pattern on the unstable neurons but ``width`` free ones: those nearest
  their thresholds (relative to their bounds' width), or with ``draw`` a random set, each
  neuron as likely as it is near (Gumbel top-k over ``-log closeness``). Returns a
  hashable key and the signs per layer (`verify.milp.encode`'s ``fixed``)."""
  pre = _pre_activations(fn, relus, jnp.asarray(z)[None])
  closeness, signs = [], []
  for (l, u, c), m, p in zip(layer_bounds, unstable, pre):
    p = p[0]
    closeness.append(np.where(m, np.abs(p - c) / np.maximum(u - l, 1e-12), np.inf))
    signs.append(np.where(m, np.where(p >= c, 1, -1), 0).astype(np.int8))
  flat = np.concatenate(closeness)
  if draw is not None:
    flat = np.log(np.maximum(flat, 1e-12)) - draw.gumbel(size=flat.shape)
  free = np.argsort(flat)[:width]
  sizes = np.cumsum([0] + [s.size for s in signs])
  for j in free:
    layer = int(np.searchsorted(sizes, j, side="right") - 1)
    signs[layer][j - sizes[layer]] = 0
  return tuple(np.concatenate(signs).tolist()), dict(enumerate(signs))


def _beam_bounds(fn, setup, fixed_list, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """beta-CROWN lower bounds on the safety over each subdomain ``[B]`` and the inputs that
  minimise them ``[B, ...]``, in a batch of at least ``batch`` (padded, and to a power of two
  of splits: few compilations)."""
  rows = []
  for fixed in fixed_list:
    split = [(layer, j, int(s))
             for layer, signs in fixed.items()
             for j in np.flatnonzero(signs)
             for s in [signs[j]]]
    rows.append(split)
  depth = 1 << max(0, max(len(r) for r in rows) - 1).bit_length()  # few compilations
  splits = np.zeros((max(batch, len(rows)), depth, 3), np.int32)
  for i, r in enumerate(rows):
    if r:
      splits[i, :len(r)] = r
  splits[len(rows):] = splits[0]
  lower, corners = jax.device_get(_bound_beam(fn, setup.root, jnp.asarray(splits)))
  return lower[:len(rows)], corners[:len(rows)]


@compilation.jit(static_argnames=("fn",))
def _bound_beam(fn, root, splits):
  beta = jnp.zeros((splits.shape[0], root.unsafe.C.shape[0], splits.shape[1]), root.lower.dtype)
  safety, _, _, corners, _ = relu_bab.bound_and_branch(fn,
                                                       root,
                                                       splits,
                                                       beta,
                                                       steps=20,
                                                       lr=0.1,
                                                       lr_beta=0.05,
                                                       branching="babsr",
                                                       candidates=1)
  return safety, corners


def _subdomain_descent(fn, starts: np.ndarray, signs: list[np.ndarray], layer_bounds, lo, hi,
                       unsafe: UnsafeSet, steps: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Descent from ``starts [B, ...]`` inside subdomains (per layer, signs ``[B, M]``; 0 where
  free), padded to ``batch`` runs; returns the points ``[B, ...]`` and their safety ``[B]``
  (the network's, no penalty), least safe first."""
  n = starts.shape[0]
  pad = lambda a: np.concatenate([a, np.repeat(a[:1], batch - n, 0)]) if batch > n else a
  thresholds = [np.broadcast_to(c, l.shape).astype(np.float32) for l, _, c in layer_bounds]
  scales = [SPLIT_PENALTY / np.maximum(u - l, 1e-12).astype(np.float32) for l, u, _ in layer_bounds]
  x, safety = jax.device_get(
      _descend(fn, jnp.asarray(pad(starts)), [jnp.asarray(pad(s), jnp.float32) for s in signs],
               thresholds, scales, jnp.asarray(lo), jnp.asarray(hi), unsafe, steps))
  x, safety = np.clip(x[:n], lo, hi), safety[:n]
  order = np.argsort(safety)
  return x[order], safety[order]


@compilation.jit(static_argnames=("fn", "steps"))
def _descend(fn, starts, signs, thresholds, scales, lo, hi, unsafe: UnsafeSet, steps: int):
  """Signed gradient steps (from 20 % to 0.2 % of the box's width) on the safety plus the
  weighted violations ``max(0, -s (z - c))`` of the splits; the least safe point of each run."""
  graph, _ = build_graph(fn, [Interval(starts, starts)])
  out = graph.outputs[0]
  pre = [node.inputs[node.bounded_inputs[0]].index for node in relu_nodes(out)]

  def objective(x):
    values = evaluate(graph, [x])
    safety = unsafe.safety(values[out.index])
    penalty = sum(
        jnp.sum(w * jax.nn.relu(-s * (values[k].reshape(x.shape[0], -1) - c)), axis=1)
        for k, s, c, w in zip(pre, signs, thresholds, scales))
    return jnp.sum(safety + penalty), safety

  return signed_descent(objective, starts, lo, hi, steps)

"""Complete verification of ReLU networks by mixed-integer linear programming.

The network is encoded exactly over one input box (Tjeng et al. 2019): the
input's elements are continuous variables within the box; every value of the
graph is an affine expression of the variables, pushed through each affine
operation by the operation's own linear map (its JVP); every ReLU (``max`` or
``min`` with a constant) whose input bounds straddle the kink gets a continuous
output ``y`` and a binary ``a`` with the exact big-M constraints

  ``y >= z,  y >= c,  y <= z - (l - c)(1 - a),  y <= c + (u - c) a``

for ``z`` in ``[l, u]``, while stable ones pass their input or their constant
through. The bounds ``[l, u]`` are CROWN's, intersected with IBP's: the tighter
they are, the fewer binaries and the smaller the constants.

A property is an unsafe set of outputs (`verify.unsafe.UnsafeSet`). For each of
its polytopes ``{y : C_p y <= d_p}`` one program asks for an input whose output
lies in it (up to ``tolerance``); the solver is HiGHS (``scipy.optimize.milp``).
When no polytope is reachable the property is verified; a solution is checked by
evaluating the network on it, and only a confirmed one counts as a
counterexample.

Soundness: the programs are solved in float64 on the float32 network's
coefficients, with the solver's feasibility tolerances; ``tolerance`` (on the
rows ``C_s y - d_s``) absorbs both, so that "verified" means no output comes
within ``tolerance`` of the unsafe set.

Reference:
  Tjeng, Xiao and Tedrake, "Evaluating Robustness of Neural Networks with Mixed
  Integer Programming", ICLR 2019.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import sparse

from robustlib import compilation
from robustlib.checks import InputError
from verify.alpha_crown import relu_nodes
from verify.crown import intermediate_bounds
from verify.crown import node_kind
from verify.crown import _prepare
from verify import error_rules as er
from verify import primitives
from verify import rounding
from verify.graph import Node
from verify.graph import build_graph
from verify.primitives import UnsupportedPrimitiveError
from verify.interval import Interval
from verify.interval import precision_dtype
from verify.interval import round_inward
from verify.interval import round_outward
from verify.unsafe import UnsafeSet

STATUSES = ("verified", "falsified", "unknown")
# Coefficients of every expression together, before the encoding refuses the network.
MAX_COEFFICIENTS = 1 << 27
_ROWS = 256


@dataclasses.dataclass(frozen=True)
class MilpResult:
  """The outcome of `milp_verify`.

  Attributes:
    status: ``"verified"`` (no polytope reachable), ``"falsified"`` (a confirmed
      counterexample) or ``"unknown"`` (time out, or a solution the network
      does not confirm).
    counterexample: the input ``[...]`` when falsified, else None.
    binaries: unstable ReLUs, each encoded with a binary variable.
    seconds: wall time.
  """
  status: str
  counterexample: np.ndarray | None
  binaries: int
  seconds: float


@dataclasses.dataclass
class _Expr:
  """An affine expression ``const + coef^T v`` for every element of a value."""
  const: np.ndarray  # [M]
  coef: np.ndarray  # [V, M] over the first V variables


class _Program:
  """Variables and constraints of the program being built."""

  def __init__(self):
    self.lower: list[np.ndarray] = []
    self.upper: list[np.ndarray] = []
    self.integer: list[np.ndarray] = []
    self.rows: list[tuple[sparse.spmatrix, np.ndarray, np.ndarray]] = []
    self.size = 0

  def add_variables(self, lower, upper, integer: bool) -> int:
    """Appends ``len(lower)`` variables; returns the index of the first."""
    first = self.size
    self.lower.append(np.asarray(lower, np.float64))
    self.upper.append(np.asarray(upper, np.float64))
    self.integer.append(np.full(len(lower), int(integer)))
    self.size += len(lower)
    return first

  def add_rows(self, matrix: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> None:
    """Constraints ``lower <= matrix @ v <= upper`` (``matrix`` over a prefix of the variables)."""
    self.rows.append((sparse.csr_matrix(matrix), lower, upper))

  def constraints(self, extra: list[optimize.LinearConstraint]) -> list[optimize.LinearConstraint]:
    out = []
    for m, lo, hi in self.rows:
      m = sparse.hstack([m, sparse.csr_matrix((m.shape[0], self.size - m.shape[1]))]).tocsr()
      out.append(optimize.LinearConstraint(m, lo, hi))
    return out + extra


def _widen(bounds: Interval) -> tuple[np.ndarray, np.ndarray]:
  """float64 bounds moved outward by float32 rounding's reach, so they stay sound."""
  lo, hi = np.asarray(bounds.lower, np.float64), np.asarray(bounds.upper, np.float64)
  pad = 1e-6 * np.maximum(np.abs(lo), np.abs(hi)) + 1e-7
  return lo.ravel() - pad.ravel(), hi.ravel() + pad.ravel()


def _pad(e: _Expr, size: int) -> np.ndarray:
  return np.pad(e.coef, ((0, size - e.coef.shape[0]), (0, 0)))


def _affine(node: Node, operands: list[_Expr], size: int) -> _Expr:
  """Pushes the expressions of the bounded operands through an affine node."""
  shapes = [node.inputs[p].shape for p in node.bounded_inputs]
  consts = [jnp.asarray(e.const.reshape(s), node.dtype) for e, s in zip(operands, shapes)]
  const = np.asarray(node.apply_bounded(*consts), np.float64).ravel()
  # Rows padded to a multiple of _ROWS: programs of other sizes then reuse the operations
  # compiled for earlier ones instead of compiling each anew.
  rows = -(-size // _ROWS) * _ROWS
  coefs = [
      jnp.asarray(_pad(e, rows).reshape((rows,) + tuple(s)), node.dtype)
      for e, s in zip(operands, shapes)
  ]

  def linear(*tangents):
    return jax.jvp(node.apply_bounded, tuple(consts), tangents)[1]

  coef = np.asarray(jax.vmap(linear)(*coefs), np.float64).reshape(rows, -1)[:size]
  return _Expr(const, coef)


def _relu(node: Node,
          z: _Expr,
          bounds: Interval,
          program: _Program,
          fixed: np.ndarray | None = None) -> _Expr:
  """``max(z, c)`` (or ``min``): stable elements pass through, unstable ones get a binary.

  ``fixed`` (signs ``[M]`` in {-1, 0, 1}) restricts the program to ``z >= c`` where it
  is 1 and ``z <= c`` where it is -1 (constraints on the variables), those elements
  then encoded as stable."""
  pos = node.bounded_inputs[0]
  c = np.broadcast_to(np.asarray(node.inputs[1 - pos], np.float64), node.shape).ravel()
  lo, hi = _widen(bounds)
  # Over every variable so far: the new ones' columns follow (an expression built before
  # other ReLUs' variables, as one feeding two ReLUs, has fewer rows).
  z = _Expr(z.const, _pad(z, program.size))
  if fixed is not None:
    for s in (1, -1):
      idx = np.flatnonzero(fixed == s)
      if idx.size:  # s (z - c) >= 0
        program.add_rows(s * z.coef[:, idx].T, s * (c[idx] - z.const[idx]),
                         np.full(idx.size, np.inf))
    lo = np.where(fixed > 0, np.maximum(lo, c), lo)
    hi = np.where(fixed < 0, np.minimum(hi, c), hi)
  sign = 1.0
  if not primitives.is_max_relu(node):  # min(z, c) = -max(-z, -c)
    sign, c, lo, hi = -1.0, -c, -hi, -lo
    z = _Expr(-z.const, -z.coef)
  active, inactive = lo >= c, hi <= c
  unstable = np.flatnonzero(~active & ~inactive)
  const = np.where(active, z.const, np.where(inactive, c, 0.0))
  coef = np.where(active[None], z.coef, 0.0)
  k = unstable.size
  if k:
    l, u, ci = lo[unstable], hi[unstable], c[unstable]
    y = program.add_variables(ci, u, integer=False)  # the outputs, then the binaries
    program.add_variables(np.zeros(k), np.ones(k), integer=True)
    zc, z0 = z.coef[:, unstable].T, z.const[unstable]  # [k, v], [k]
    eye, zero = np.eye(k), np.zeros((k, k))
    # y - z >= 0, y - z - (l - c) a <= -(l - c), y - (u - c) a <= c.
    program.add_rows(np.hstack([-zc, eye, zero]), z0, np.full(k, np.inf))
    program.add_rows(np.hstack([-zc, eye, -np.diag(l - ci)]), np.full(k, -np.inf), z0 - (l - ci))
    program.add_rows(np.hstack([np.zeros_like(zc), eye, -np.diag(u - ci)]), np.full(k, -np.inf), ci)
    coef = np.pad(coef, ((0, program.size - coef.shape[0]), (0, 0)))
    coef[y + np.arange(k), unstable] = 1.0
  return _Expr(sign * const, sign * coef)


@primitives.highest_precision
def _bounds_fn(fn, lower, upper):
  graph, boxes, *_ = _prepare(fn, Interval(lower, upper), None)
  return intermediate_bounds(graph, boxes, "crown", intersect=True)


_jitted_bounds = compilation.jit(_bounds_fn, static_argnums=0)


@primitives.highest_precision
def encode(fn: Callable[[jax.Array], jax.Array],
           lower: jax.typing.ArrayLike,
           upper: jax.typing.ArrayLike,
           fixed: dict[int, np.ndarray] | None = None) -> tuple[_Program, _Expr, int]:
  """The program of ``fn`` over the box ``[lower, upper]`` (one input ``[...]``), or over
  its part where the ReLU inputs ``fixed`` names (by layer of `verify.relu_layers`: signs
  ``[size]`` in {-1, 0, 1}) lie on those sides of their thresholds.

  Returns:
    ``(program, output, binaries)``: the variables and constraints (the first
    ``lower.size`` variables are the input's elements), the output's affine
    expression ``[K]``, and the number of binary variables.
  """
  lower = jnp.asarray(lower)[None]
  upper = jnp.asarray(upper)[None]
  graph, boxes, out, out_shape, _ = _prepare(fn, Interval(lower, upper), None)
  if len(out_shape) != 2:
    raise InputError(f"fn must map [N, ...] to [N, K], got output shape {out_shape}")
  bounds = _jitted_bounds(fn, lower, upper)
  program = _Program()
  if len(graph.inputs) != 1:
    raise InputError(f"MILP verification takes a function of one array, got {len(graph.inputs)}")
  lo, hi = (np.asarray(b, np.float64).ravel() for b in (boxes[0].lower, boxes[0].upper))
  program.add_variables(lo, hi, integer=False)
  exprs = {graph.inputs[0].index: _Expr(np.zeros(lo.size), np.eye(lo.size))}
  binaries, total = 0, 0
  layers = {n.index: i for i, n in enumerate(relu_nodes(out))} if isinstance(out, Node) else {}
  for node in graph.nodes[1:]:
    kind = node_kind(node)
    operands = [exprs[node.inputs[p].index] for p in node.bounded_inputs]
    if kind == "identity":
      exprs[node.index] = operands[0]
    elif kind == "affine":
      exprs[node.index] = _affine(node, operands, program.size)
    elif kind == "relu":
      before = program.size
      x = node.inputs[node.bounded_inputs[0]]
      signs = None if fixed is None else fixed.get(layers.get(node.index))
      exprs[node.index] = _relu(node, operands[0], bounds[x.index], program,
                                None if signs is None else np.asarray(signs).ravel())
      binaries += (program.size - before) // 2
    else:
      raise UnsupportedPrimitiveError(
          f"MILP encodes affine operations and ReLUs (max/min with a constant) only, not "
          f"{node.describe()}")
    total += exprs[node.index].coef.size
    if total > MAX_COEFFICIENTS:
      raise InputError(f"the network is too large to encode as one program ({total} "
                       f"coefficients after {node.describe()}); use verify.crown or alpha_crown")
  if not isinstance(out, Node):
    k = out_shape[1]
    return program, _Expr(np.asarray(out, np.float64).ravel(), np.zeros((program.size, k))), 0
  e = exprs[out.index]
  return program, _Expr(e.const, _pad(e, program.size)), binaries


def relu_sizes(fn: Callable[[jax.Array], jax.Array], x: jax.typing.ArrayLike) -> list[int]:
  """Neurons per example of each ReLU layer (`verify.relu_layers`' order) at one input
  ``[...]``'s shape."""
  x = jnp.asarray(x)[None]
  graph, _ = build_graph(fn, [Interval(x, x)])
  out = graph.outputs[0]
  return [] if not isinstance(out, Node) else [int(np.prod(n.shape[1:])) for n in relu_nodes(out)]


def _check_box(lower, upper) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
  """The box in float64 and rounded outward to float32 (the network's inputs)."""
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  if lower.shape != upper.shape:
    raise InputError(f"lower and upper must have the same shape, got {lower.shape} and "
                     f"{upper.shape}")
  if np.any(lower > upper) or not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
    raise InputError("the box must be finite with lower <= upper")
  return (lower, upper), *round_outward(lower, upper)


def _point_in(x: np.ndarray, box, dtype) -> np.ndarray | None:
  """The solver's input clipped to the ``dtype`` points of the caller's ``box`` (the solver
  works in the box rounded outward, and within tolerances); None where the box has none."""
  lo, hi = round_inward(*box, dtype)
  if np.any(lo > box[1]) or np.any(hi < box[0]):
    return None
  return np.clip(np.asarray(x, np.float64).reshape(lo.shape).astype(dtype), lo, hi)


def _solve(program: _Program, objective: np.ndarray, extra, time_limit: float):
  return optimize.milp(objective,
                       integrality=np.concatenate(program.integer),
                       bounds=optimize.Bounds(np.concatenate(program.lower),
                                              np.concatenate(program.upper)),
                       constraints=program.constraints(extra),
                       options={
                           "time_limit": max(time_limit, 1e-3),
                           "disp": False
                       })


def milp_verify(fn: Callable[[jax.Array], jax.Array],
                lower: jax.typing.ArrayLike,
                upper: jax.typing.ArrayLike,
                unsafe: UnsafeSet,
                time_limit: float = 60.0,
                tolerance: float = 1e-4,
                fixed: dict[int, np.ndarray] | None = None,
                allowance: jax.typing.ArrayLike | None = None,
                precision: str = "float32") -> MilpResult:
  """Decides whether some input in ``[lower, upper]`` maps into ``unsafe`` (with ``fixed``,
  some input of the part of the box where those ReLU inputs have those signs, `encode`).

  Args:
    fn: ``fn(x [N, ...]) -> [N, K]`` made of affine operations and ReLUs.
    lower: ``[...]``, one input's lower bounds.
    upper: ``[...]``, its upper bounds.
    unsafe: the unsafe set of outputs.
    time_limit: seconds for all the programs together.
    tolerance: relative margin on the rows ``C_s y - d_s``: "verified" means every
      output stays outside each polytope by more than ``tolerance`` times the row's
      largest coefficient over the program's variables (at least 1), plus the row's
      rounding allowance (`verify.rounding_allowance`: the solver decides the
      real-valued network, a user runs it in float32).
    allowance: ``[S]``, the rows' rounding allowance over this box or one containing
      it (a branch-and-bound search's root's, `verify.rounding_allowance` with
      ``errors="backward"`` or tighter), when already computed: on a convolutional
      network it costs far more than a small program.
    precision: which evaluation of the network "verified" holds for: ``"float32"``
      (as a user runs it) or ``"float64"`` (the allowance of a float64 evaluation,
      some 1e-9 of float32's; `verify.interval.precision_dtype`).

  Returns:
    `MilpResult`.

  Example:
    >>> r = verify.milp_verify(logits_fn, jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1),
    ...                        verify.UnsafeSet.misclassified(y, 10))
  """
  start = time.time()
  dtype = precision_dtype(precision)
  box, lower, upper = _check_box(lower, upper)
  if tolerance < 0 or time_limit <= 0:
    raise InputError(f"tolerance must be >= 0 and time_limit > 0, got {tolerance} and "
                     f"{time_limit}")
  program, out, binaries = encode(fn, lower, upper, fixed)
  C, d = np.asarray(unsafe.C, np.float64), np.asarray(unsafe.d, np.float64)
  member = np.asarray(unsafe.member)
  if C.shape[1:] != out.const.shape:
    raise InputError(f"the unsafe set has rows over {C.shape[1]} outputs, the network gives "
                     f"{out.const.size}")
  rows_const, rows_coef = C @ out.const - d, out.coef @ C.T  # [S], [V, S]
  scale = np.maximum(1.0, np.max(np.abs(rows_coef), axis=0, initial=0.0))
  # The solver's answer needs only the float32 evaluation's part of the backward model; the
  # allowance's computation part (for a float32 bound pass) only adds to it.
  if allowance is None:
    allowance = rounding.allowance(
        fn, Interval(jnp.asarray(lower, dtype)[None],
                     jnp.asarray(upper, dtype)[None]), unsafe.C[None], "crown",
        "backward")[0]  # the rows' own dtype: their rounding
  allow = np.asarray(allowance, np.float64).reshape(-1)
  if allow.shape != (C.shape[0],) or not np.all(allow >= 0):
    raise InputError(f"allowance must be [{C.shape[0]}] values >= 0 (one per row of the "
                     f"unsafe set), got shape {np.shape(allowance)}")
  margin = tolerance * scale + allow + 2 * er.unit_roundoff(unsafe.d.dtype) * np.abs(d)
  n_in = lower.size
  status = "verified"
  for p in range(member.shape[0]):
    rows = np.flatnonzero(member[p])
    remaining = time_limit - (time.time() - start)
    if remaining <= 0:
      status = "unknown"
      break
    objective = rows_coef[:, rows].sum(axis=1)
    reach = optimize.LinearConstraint(rows_coef[:, rows].T, -np.inf,
                                      margin[rows] - rows_const[rows])
    res = _solve(program, objective, [reach], remaining)
    if res.status == 2:  # infeasible: this polytope is out of reach
      continue
    if res.x is None:  # time out (or a solver failure) before any solution
      status = "unknown"
      continue
    x = _point_in(res.x[:n_in], box, dtype)  # checked in the precision's evaluation
    if x is not None and float(unsafe.safety(fn(jnp.asarray(x)[None]))[0]) <= 0:
      return MilpResult("falsified", x, binaries, time.time() - start)
    status = "unknown"
  return MilpResult(status, None, binaries, time.time() - start)


def milp_minimum(fn: Callable[[jax.Array], jax.Array],
                 lower: jax.typing.ArrayLike,
                 upper: jax.typing.ArrayLike,
                 c: jax.typing.ArrayLike,
                 time_limit: float = 60.0) -> tuple[float, float, np.ndarray]:
  """The minimum of ``c . fn(x)`` over the box, solved to optimality.

  Args:
    fn: as in `milp_verify`.
    lower: ``[...]``.
    upper: ``[...]``.
    c: ``[K]`` output weights.
    time_limit: seconds.

  Returns:
    ``(lower_bound, value, x)``: the solver's proven lower bound on the minimum
    (equal to ``value`` when solved), the value of the best solution and that
    solution's input ``[...]`` (clipped into the box: the solver's tolerances
    allow it a hair outside).
  """
  box, lower, upper = _check_box(lower, upper)
  program, out, _ = encode(fn, lower, upper)
  c = np.asarray(c, np.float64)
  res = _solve(program, out.coef @ c, [], time_limit)
  if res.x is None:
    raise RuntimeError(f"the solver found no solution in {time_limit} s: {res.message}")
  base = float(c @ out.const)
  bound = getattr(res, "mip_dual_bound", None)
  bound = res.fun if bound is None or not math.isfinite(bound) else bound
  x = _point_in(res.x[:lower.size], box, np.float32)
  x = np.clip(res.x[:lower.size].reshape(lower.shape), *box) if x is None else x
  return float(bound) + base, float(res.fun) + base, x

"""VNNLIB property files as input boxes and unsafe sets of outputs.

A VNNLIB file (the SMT-LIB subset used by VNN-COMP) states the *unsafe*
condition of a verification instance: the instance is "sat" when some input
``x`` satisfies all asserts together with ``y = net(x)``. ``X_i`` and ``Y_j``
name the entries of the network's input and output flattened in C order.

`parse` conjoins all asserts and normalises them to disjunctive normal form.
Each disjunct bounds every input by constants (a box) and constrains the
outputs linearly (a polytope ``C @ y <= d``). Disjuncts with the same box form
one `Property`, whose unsafe set is the union of their polytopes; the instance
is unsat iff no property has an input of its box mapped into its unsafe set.

Reading conventions:

* Strict inequalities ``<`` and ``>`` are read as ``<=`` and ``>=``. This adds
  the boundary to the unsafe set: an over-approximation, sound for proving
  unsat, though a point on the boundary may not be a strict counterexample.
* ``(= a b)`` is the two inequalities ``a <= b`` and ``b <= a``.
* A disjunct whose input bounds contradict each other (an empty box) is
  dropped; when that leaves no box at all, the file is an error, not ``unsat``.
* Numbers and arithmetic on them are float64.
* ``check-sat``, ``get-model``, ``exit``, ``set-logic``, ``set-info`` and
  ``set-option`` commands are accepted and ignored.

Example:
  >>> spec = parse('''(declare-const X_0 Real) (declare-const Y_0 Real)
  ...                 (assert (>= X_0 -1)) (assert (<= X_0 1)) (assert (<= Y_0 -1))''')
  >>> (prop,) = spec.properties  # lower [-1.], upper [1.]
  >>> prop.unsafe[0].C, prop.unsafe[0].d  # [[1.]], [-1.]
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
from typing import NamedTuple, Union

import numpy as np

from robustlib.checks import InputError

MAX_TERMS = 100_000  # Most disjuncts the normal form may have.
MAX_DEPTH = 200  # Deepest nesting of parentheses.

_TOKEN = re.compile(r";[^\n]*|[()]|[^\s();]+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMERIC = re.compile(r"[+-]?\.?\d")
_NAME = re.compile(r"([XY])_(0|[1-9]\d*)")
_IGNORED = frozenset({"check-sat", "get-model", "exit", "set-logic", "set-info", "set-option"})
_COMPARISONS = frozenset({"<=", ">=", "<", ">", "="})


class VnnlibError(InputError):
  """A VNNLIB text is malformed or outside the supported subset.

  The message reads ``source:line:column: problem``, line and column 1-based.
  """


@dataclasses.dataclass(frozen=True, eq=False)
class Polytope:
  """The conjunction ``C @ y <= d`` over the flattened outputs ``y``.

  Attributes:
    C: ``[m, num_outputs]`` float64, read-only. ``m = 0`` is the whole space.
    d: ``[m]`` float64, read-only.
  """
  C: np.ndarray
  d: np.ndarray

  def __post_init__(self):
    C, d = np.array(self.C, np.float64), np.array(self.d, np.float64)
    if C.ndim != 2 or d.shape != (C.shape[0],):
      raise InputError(f"a polytope needs C [m, n] and d [m], got shapes {C.shape} and {d.shape}")
    C.flags.writeable = d.flags.writeable = False
    object.__setattr__(self, "C", C)
    object.__setattr__(self, "d", d)


def _flat(v, size: int, name: str) -> np.ndarray:
  v = np.ravel(np.asarray(v, np.float64))
  if v.size != size:
    raise InputError(f"{name} must have {size} entries (flattened), got shape {np.shape(v)}")
  return v


@dataclasses.dataclass(frozen=True, eq=False)
class Property:
  """One input box and the unsafe set of outputs over it: a union of polytopes.

  Attributes:
    lower: ``[num_inputs]`` float64, read-only.
    upper: ``[num_inputs]`` float64, read-only, ``lower <= upper``.
    unsafe: the polytopes whose union is the unsafe set (empty: nothing unsafe).
  """
  lower: np.ndarray
  upper: np.ndarray
  unsafe: tuple[Polytope, ...]

  def __post_init__(self):
    lower, upper = np.array(self.lower, np.float64), np.array(self.upper, np.float64)
    if lower.ndim != 1 or lower.shape != upper.shape:
      raise InputError(f"lower and upper must be vectors of one shape, got {lower.shape} and "
                       f"{upper.shape}")
    inverted = ~(lower <= upper)
    if inverted.any():
      i = int(np.flatnonzero(inverted)[0])
      raise InputError(f"a property's box needs lower <= upper: X_{i} has lower bound "
                       f"{float(lower[i])!r} and upper bound {float(upper[i])!r}")
    if len({p.C.shape[1] for p in self.unsafe}) > 1:
      raise InputError("the polytopes of a property must have the same number of outputs")
    lower.flags.writeable = upper.flags.writeable = False
    object.__setattr__(self, "lower", lower)
    object.__setattr__(self, "upper", upper)
    object.__setattr__(self, "unsafe", tuple(self.unsafe))

  def violated(self, y: np.ndarray, tol: float = 0.0) -> bool:
    """Whether the output ``y`` (``[num_outputs]``, any shape of that size) is unsafe.

    True when some polytope holds with slack ``tol``: ``all(C @ y <= d + tol)``.
    """
    for p in self.unsafe:
      if np.all(p.C @ _flat(y, p.C.shape[1], "y") <= p.d + tol):
        return True
    return False

  def contains(self, x: np.ndarray, tol: float = 0.0) -> bool:
    """Whether ``x`` (``[num_inputs]``, any shape of that size) lies in the box widened by ``tol``."""
    x = _flat(x, self.lower.size, "x")
    return bool(np.all(x >= self.lower - tol) and np.all(x <= self.upper + tol))


@dataclasses.dataclass(frozen=True)
class Vnnlib:
  """A parsed file: unsat iff every property is unsat (a disjunction over input boxes).

  Attributes:
    properties: in order of first appearance; empty when a constant assert is
      false (e.g. ``(< 1 0)``). Contradictory input bounds are an error instead.
    num_inputs: number of declared ``X_i``.
    num_outputs: number of declared ``Y_j``.
  """
  properties: tuple[Property, ...]
  num_inputs: int
  num_outputs: int


class _Bound(NamedTuple):  # lower <= X_index <= upper
  index: int
  lower: float
  upper: float


class _Row(NamedTuple):  # sum(c * Y_j for j, c in coefs) <= bound
  coefs: tuple[tuple[int, float], ...]
  bound: float


# A parsed expression: an atom (its text, its offset in the text) or a list
# (its items, the offset of its '(').
_Node = tuple[Union[str, list], int]
_Linear = tuple[dict, float]  # ({("X" or "Y", index): coefficient}, constant)
# A formula in disjunctive normal form: a list of conjunctions, each a pair
# (tuple of _Bound, tuple of _Row). [] is false, [((), ())] is true.
_Dnf = list


class _Parser:
  """Parses one text; holds its declarations while doing so."""

  def __init__(self, text: str, source: str):
    self.text, self.source = text, source
    self.decls: dict[str, tuple[str, int, int]] = {}  # name -> (kind, index, position)
    # The first empty box met: (disjunct, input, lower, upper).
    self.empty: tuple[int, int, float, float] | None = None

  def error(self, pos: int, what: str) -> VnnlibError:
    line = self.text.count("\n", 0, pos) + 1
    col = pos - self.text.rfind("\n", 0, pos)
    return VnnlibError(f"{self.source}:{line}:{col}: {what}")

  def sexps(self) -> list[_Node]:
    """The top-level lists of the text, built without recursion."""
    top, stack = [], []
    for m in _TOKEN.finditer(self.text):
      tok, pos = m.group(), m.start()
      if tok == "(":
        if len(stack) >= MAX_DEPTH:
          raise self.error(pos, f"parentheses nested deeper than {MAX_DEPTH} levels")
        stack.append(([], pos))
      elif tok == ")":
        if not stack:
          raise self.error(pos, "unbalanced ')'")
        node = stack.pop()
        (stack[-1][0] if stack else top).append(node)
      elif tok[0] != ";":
        if not stack:
          raise self.error(pos, f"expected '(' to start a command, found '{tok}'")
        stack[-1][0].append((tok, pos))
    if stack:
      raise self.error(stack[0][1], "unbalanced '(': not closed before the end of the text")
    return top

  def split(self, node: _Node, what: str) -> tuple[str, list]:
    """``(op args...)`` -> ``(op, args)``."""
    items, pos = node
    if isinstance(items, str):
      raise self.error(pos, f"expected {what}, found '{items}'")
    if not items:
      raise self.error(pos, f"expected {what}, found '()'")
    head, head_pos = items[0]
    if not isinstance(head, str):
      raise self.error(head_pos, "expected an operator name, found '('")
    return head, items[1:]

  def arity(self, node: _Node, op: str, args: list, low: int, high: float = math.inf):
    if not low <= len(args) <= high:
      want = f"{low}" if low == high else f"at least {low}"
      raise self.error(node[1], f"'{op}' takes {want} arguments, got {len(args)}")

  def command(self, node: _Node) -> _Dnf | None:
    op, args = self.split(node, "a command")
    if op == "declare-const":
      self.arity(node, op, args, 2, 2)
      (name, name_pos), (sort, sort_pos) = args
      m = _NAME.fullmatch(name) if isinstance(name, str) else None
      if m is None:
        raise self.error(name_pos, "expected a variable name X_i or Y_j")
      if sort != "Real":
        raise self.error(sort_pos, "only variables of sort Real are supported")
      if name in self.decls:
        raise self.error(name_pos, f"'{name}' is declared twice")
      self.decls[name] = (m.group(1), int(m.group(2)), name_pos)
      return None
    if op == "assert":
      self.arity(node, op, args, 1, 1)
      return self.formula(args[0])
    if op in _IGNORED:
      return None
    raise self.error(node[0][0][1], f"unknown command '{op}'")

  def linear(self, node: _Node) -> _Linear:
    """An arithmetic expression as coefficients of variables and a constant."""
    t, pos = node
    if isinstance(t, str):
      if _NUMBER.fullmatch(t):
        v = float(t)
        if not math.isfinite(v):
          raise self.error(pos, f"number '{t}' is out of the float64 range")
        return {}, v
      if _NUMERIC.match(t):
        raise self.error(pos, f"bad number '{t}'")
      if t not in self.decls:
        raise self.error(pos, f"undeclared name '{t}'")
      kind, index, _ = self.decls[t]
      return {(kind, index): 1.0}, 0.0
    op, args = self.split(node, "an arithmetic expression")
    if op == "+":
      self.arity(node, op, args, 1)
      return _sum([self.linear(a) for a in args])
    if op == "-":
      self.arity(node, op, args, 1)
      terms = [self.linear(a) for a in args]
      if len(terms) == 1:
        return _scale(terms[0], -1.0)
      return _sum([terms[0]] + [_scale(t, -1.0) for t in terms[1:]])
    if op == "*":
      self.arity(node, op, args, 2)
      terms = [self.linear(a) for a in args]
      varying = [t for t in terms if t[0]]
      if len(varying) > 1:
        raise self.error(pos, "nonlinear product: at most one factor may involve variables")
      factor = math.prod(t[1] for t in terms if not t[0])
      return _scale(varying[0] if varying else ({}, 1.0), factor)
    if op == "/":
      self.arity(node, op, args, 2, 2)
      num, den = (self.linear(a) for a in args)
      if den[0] or den[1] == 0.0:
        raise self.error(args[1][1], "the divisor must be a nonzero constant")
      return _scale(num, 1.0 / den[1])
    raise self.error(node[0][0][1], f"unknown operator '{op}' in an arithmetic expression")

  def formula(self, node: _Node) -> _Dnf:
    """A formula in disjunctive normal form."""
    op, args = self.split(node, "a formula (and, or or a comparison)")
    if op == "and":
      return self.conjoin([(self.formula(a), a[1]) for a in args])
    if op == "or":
      terms = []
      for a in args:
        terms += self.formula(a)
        if len(terms) > MAX_TERMS:
          raise self.error(a[1], f"the disjunctive normal form exceeds {MAX_TERMS} terms")
      return terms
    if op in _COMPARISONS:
      self.arity(node, op, args, 2, 2)
      a, b = (self.linear(x) for x in args)
      pairs = [(a, b), (b, a)] if op == "=" else [(a, b)] if op in ("<=", "<") else [(b, a)]
      atoms = [self.compare(lhs, rhs, node[1]) for lhs, rhs in pairs]
      if False in atoms:
        return []
      return [(tuple(a for a in atoms if isinstance(a, _Bound)),
               tuple(a for a in atoms if isinstance(a, _Row)))]
    raise self.error(node[0][0][1], f"unknown operator '{op}' in a formula")

  def compare(self, lhs: _Linear, rhs: _Linear, pos: int) -> bool | _Bound | _Row:
    """``lhs <= rhs`` as a truth value, an input bound or an output row."""
    coefs = dict(lhs[0])
    for k, c in rhs[0].items():
      coefs[k] = coefs.get(k, 0.0) - c
    coefs = {k: c for k, c in coefs.items() if c != 0.0}
    bound = rhs[1] - lhs[1]
    kinds = {kind for kind, _ in coefs}
    if not kinds:
      return 0.0 <= bound
    if kinds == {"Y"}:
      return _Row(tuple((j, c) for (_, j), c in coefs.items()), bound)
    if kinds == {"X"}:
      if len(coefs) > 1:
        raise self.error(
            pos, "only box constraints on inputs are supported: this comparison "
            "involves several inputs")
      (((_, i), c),) = coefs.items()
      return _Bound(i, -math.inf, bound / c) if c > 0 else _Bound(i, bound / c, math.inf)
    raise self.error(pos, "a comparison may involve inputs X or outputs Y, not both")

  def conjoin(self, factors: list[tuple[_Dnf, int]]) -> _Dnf:
    """The normal form of a conjunction of ``(normal form, position)`` factors."""
    bounds, rows, terms = [], [], [((), ())]
    for dnf, pos in factors:
      if not dnf:
        return []
      if len(dnf) == 1:
        bounds += dnf[0][0]
        rows += dnf[0][1]
        continue
      if len(terms) * len(dnf) > MAX_TERMS:
        raise self.error(pos, f"the disjunctive normal form exceeds {MAX_TERMS} terms")
      terms = [(t[0] + u[0], t[1] + u[1]) for t in terms for u in dnf]
    bounds, rows = tuple(bounds), tuple(rows)
    return [(bounds + t[0], rows + t[1]) for t in terms]

  def count(self, kind: str, expected: int | None, arg: str) -> int:
    """The number of declared variables of a kind, checked for gaps and against ``expected``."""
    word = "inputs" if kind == "X" else "outputs"
    found = sorted((i, pos) for k, i, pos in self.decls.values() if k == kind)
    n = len(found)
    if n and found[-1][0] != n - 1:
      missing = next(i for i, (j, _) in enumerate(found) if i != j)
      raise self.error(
          found[-1][1], f"{kind}_{found[-1][0]} is declared but {kind}_{missing} "
          f"is not: {word} must be {kind}_0..{kind}_(n-1) without gaps")
    if expected is not None and n != expected:
      raise self.error(found[-1][1] if n else len(self.text),
                       f"the file declares {n} {word} but {arg}={expected}")
    if not n:
      raise self.error(len(self.text), f"no {word} declared ({kind}_0, {kind}_1, ...)")
    return n

  def properties(self, dnf: _Dnf, n_x: int, n_y: int) -> tuple[Property, ...]:
    """Groups the disjuncts by input box, in order of first appearance.

    A disjunct whose box is empty (some ``X_i`` bounded below above its upper
    bound) is dropped, as one of several disjuncts may be; when every disjunct's
    box is empty the file's input constraints contradict each other, an error.
    """
    boxes: dict[tuple, bytes | None] = {}  # the bounds of a disjunct -> its box's key
    groups: dict[bytes, tuple[np.ndarray, np.ndarray, list[Polytope]]] = {}
    for k, (bounds, rows) in enumerate(dnf):
      if bounds not in boxes:
        boxes[bounds] = self.box(bounds, n_x, k, groups)
      if boxes[bounds] is None:
        continue
      C = np.zeros((len(rows), n_y))
      for r, row in enumerate(rows):
        for j, c in row.coefs:
          C[r, j] = c
      d = np.array([row.bound for row in rows], np.float64)
      groups[boxes[bounds]][2].append(Polytope(C, d))
    if not groups and self.empty is not None:
      k, i, lo, hi = self.empty
      where = "" if len(dnf) == 1 else (f" in disjunct {k + 1}; the boxes of all {len(dnf)} "
                                        "disjuncts of the normal form of the asserts are empty")
      raise self.error(
          self.decls[f"X_{i}"][2], f"the input box is empty: X_{i} has lower bound {lo!r} "
          f"above its upper bound {hi!r}{where}")
    return tuple(Property(lo, hi, tuple(ps)) for lo, hi, ps in groups.values())

  def box(self, bounds: tuple[_Bound, ...], n_x: int, k: int, groups: dict) -> bytes | None:
    """The key in ``groups`` of the box of disjunct ``k`` (added if new); None if empty."""
    lower, upper = np.full(n_x, -np.inf), np.full(n_x, np.inf)
    if bounds:
      idx, lo, hi = zip(*bounds)
      np.maximum.at(lower, np.array(idx, np.intp), np.array(lo, np.float64))
      np.minimum.at(upper, np.array(idx, np.intp), np.array(hi, np.float64))
    if np.any(lower > upper):
      if self.empty is None:
        i = int(np.flatnonzero(lower > upper)[0])
        self.empty = (k, i, float(lower[i]), float(upper[i]))
      return None
    unbounded = ~(np.isfinite(lower) & np.isfinite(upper))
    if unbounded.any():
      i = int(np.flatnonzero(unbounded)[0])
      side = "lower" if not np.isfinite(lower[i]) else "upper"
      raise self.error(
          self.decls[f"X_{i}"][2],
          f"X_{i} has no finite {side} bound in disjunct {k + 1} of the normal "
          "form of the asserts: every input needs a box")
    lower, upper = lower + 0.0, upper + 0.0  # -0.0 -> 0.0, so equal boxes share a key
    key = lower.tobytes() + upper.tobytes()
    groups.setdefault(key, (lower, upper, []))
    return key


def _scale(e: _Linear, s: float) -> _Linear:
  return {k: c * s for k, c in e[0].items()}, e[1] * s


def _sum(terms: list[_Linear]) -> _Linear:
  coefs: dict = {}
  for t, _ in terms:
    for k, c in t.items():
      coefs[k] = coefs.get(k, 0.0) + c
  return coefs, math.fsum(c for _, c in terms)


def parse(text: str,
          num_inputs: int | None = None,
          num_outputs: int | None = None,
          source: str = "<string>") -> Vnnlib:
  """Parses VNNLIB text into input boxes and unsafe output polytopes.

  Args:
    text: the file's contents.
    num_inputs: if given, the number of ``X_i`` the file must declare (the
      network's flattened input size).
    num_outputs: likewise for ``Y_j``.
    source: the name used in error messages.

  Returns:
    The `Vnnlib`, its properties in order of first appearance.

  Raises:
    VnnlibError: ``source:line:column: problem`` for a syntax error, an
      undeclared or missing variable, a construct outside the supported subset
      (nonlinear terms, non-box input constraints, atoms mixing inputs and
      outputs), an input without finite bounds, input bounds that contradict
      each other in every disjunct (an empty box, e.g. ``X_0 >= 0.6`` and
      ``X_0 <= 0.4``), or declared counts that differ from ``num_inputs`` /
      ``num_outputs``.
  """
  parser = _Parser(text, source)
  factors = []
  for node in parser.sexps():
    dnf = parser.command(node)
    if dnf is not None:
      factors.append((dnf, node[1]))
  n_x = parser.count("X", num_inputs, "num_inputs")
  n_y = parser.count("Y", num_outputs, "num_outputs")
  return Vnnlib(parser.properties(parser.conjoin(factors), n_x, n_y), n_x, n_y)


def read(path: str | os.PathLike,
         num_inputs: int | None = None,
         num_outputs: int | None = None) -> Vnnlib:
  """Reads a ``.vnnlib`` file (or a gzipped ``.vnnlib.gz``) with `parse`; errors name ``path``."""
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    text = f.read()
  return parse(text, num_inputs, num_outputs, source=os.fspath(path))

"""Soundness fuzzing of the bound methods: random programs, random boxes, points inside them.

`random_program` draws a small random JAX function ``fn(x [N, ...]) -> [N, K]``
as a DAG of building blocks: dense layers, convolutions (NHWC, random strides,
paddings, dilations and feature groups), every activation `verify` has a rule
for, max/min/average pooling, global reductions, BatchNorm in eval mode,
residual sums and differences, maxima and products of two branches,
concatenations, reshapes, transposes, slices, paddings, cumulative sums, loops
(``fori_loop``, ``scan``, ``while_loop``) and dtype round trips. Each block
names the methods that must not refuse it; a method may refuse a program
holding other blocks with `verify.UnsupportedPrimitiveError` (counted, not a
failure), and its bounds are checked like any others when it does not.

`random_box` draws an input box of one of the `BOX_KINDS`: ordinary (radius
over six decades), degenerate (``lower == upper``), one float32 ulp wide, and
near-tie (a tiny radius around a point on a coarse grid, so that pooling
windows and maxima hold exact ties).

`check` bounds the outputs (and ``C @ fn(x)`` for a random specification ``C``
``[N, S, K]``) with each method and evaluates ``fn`` in float32 at the box's
corners (all of them up to ``2**10``), at the corners the gradient at the
centre points to, at uniform points and at points on the faces: every value
must lie within the bounds up to `tolerance` (the one place that decides how
much rounding is forgiven), and ``lower <= upper``. A violating point is also
evaluated in float64, which tells the float32 program's own rounding apart from
bounds that exclude the real-valued function too. On small ReLU networks the
lower bound of ``c . fn(x)`` is also compared with the exact minimum of
`verify.milp_minimum`. Each violation is a `Finding` carrying the seeds that
`replay` takes to reproduce it.

`run` checks programs until a time or program budget is spent and returns a
`Report`. Programs come in groups sharing one structure (a `Skeleton`) with
different weights: the weights are arguments of the compiled bound functions,
so a group compiles once.

Examples::

  python -m verify.fuzz --minutes=30 --seed=0
  python -m verify.fuzz --programs=200 --families=conv,dag --methods=ibp,crown

The exit status is 1 when a finding exists, 2 on usage errors and 0 otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from robustlib import compilation
from robustlib import scripts
from robustlib.checks import InputError
from verify import Interval
from verify import UnsupportedPrimitiveError
from verify import alpha_crown
from verify import crown
from verify import crown_ibp
from verify import ibp
from verify import milp_minimum
from verify import rounding_allowance

METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")
FAMILIES = ("dense", "smooth", "conv", "dag", "loop", "cast")
BOX_KINDS = ("ordinary", "ulp", "near_tie", "degenerate")

_ALL = frozenset(METHODS)
_IBP = frozenset({"ibp"})
_NONE = frozenset()
# Elements of one example's value at any point of a program.
_MAX_ELEMENTS = 256
# Corners of a box enumerated in full up to this many input elements per example.
_ALL_CORNERS_DIMS = 10
_RANDOM_CORNERS = 96
_UNIFORM_POINTS = 48
_FACE_POINTS = 32
# Small ReLU networks compared with the exact minimum of `verify.milp_minimum`.
_MILP_INPUTS, _MILP_LAYERS, _MILP_UNITS = 8, 2, 8

BoundFn = Callable[[Callable, Interval, Any], Interval]

# ----------------------------------------------------------------------------------------------
# The tolerance of a point check.


def tolerance(bounds: tuple[np.ndarray, np.ndarray], values: np.ndarray,
              allowance: np.ndarray) -> np.ndarray:
  """How far a value may lie outside its bounds before it counts as a violation.

  Args:
    bounds: ``(lower, upper)``, each ``[N, S]``.
    values: ``[P, N, S]``, the function at the checked points.
    allowance: ``[N, S]``, `verify.rounding_allowance` of these outputs over the box.

  Returns:
    ``[N, S]``: the rounding allowance itself, which "verified" subtracts: a float32
    value outside its bounds by more than it is a finding.
  """
  del bounds, values
  return allowance


# The exact minimum of `verify.milp_minimum` is the solver's, within its own tolerances.
_SOLVER_TOLERANCE = 1e-6

# ----------------------------------------------------------------------------------------------
# Programs: a static structure (`Skeleton`) and random weights.


@dataclasses.dataclass(frozen=True)
class Op:
  """One building block of a program: ``values[i + 1] = kind(values[inputs], params[i])``.

  Attributes:
    kind: the block (a key of the block table).
    inputs: indices of the values it reads (0 is the program's input).
    attrs: static attributes as sorted ``(name, value)`` pairs.
    shape: the shape of its value, without the batch axis.
  """
  kind: str
  inputs: tuple[int, ...]
  attrs: tuple[tuple[str, Any], ...]
  shape: tuple[int, ...]

  def attr(self, name: str, default: Any = None) -> Any:
    return dict(self.attrs).get(name, default)


@dataclasses.dataclass(frozen=True)
class Skeleton:
  """The structure of a program, without its weights (hashable: the key of compilations).

  Attributes:
    input_shape: one example's input shape.
    batch: examples per box (N).
    ops: the blocks in order; the last one gives ``[N, K]``.
    spec_rows: rows S of the random specification ``C [N, S, K]``.
    chunk_size: ``chunk_size`` passed to CROWN, CROWN-IBP and alpha-CROWN.
    stacked_spec: CROWN and CROWN-IBP bound ``fn(x)`` and ``C @ fn(x)`` in one
      call, with the specification ``[I; C]`` (alpha-CROWN always does), instead
      of one call without a specification and one with ``C``.
    families: the block families it was drawn from.
  """
  input_shape: tuple[int, ...]
  batch: int
  ops: tuple[Op, ...]
  spec_rows: int
  chunk_size: int | None
  stacked_spec: bool
  families: tuple[str, ...]

  @property
  def outputs(self) -> int:
    return self.ops[-1].shape[0]

  def shapes(self) -> list[tuple[int, ...]]:
    return [self.input_shape] + [op.shape for op in self.ops]


@dataclasses.dataclass(frozen=True)
class Program:
  """A random program and what the fuzzer needs to know about it.

  Attributes:
    fn: the pure function ``fn(x [N, ...]) -> [N, K]`` (any N), weights closed over.
    input_shape: ``(N, ...)``, the shape of the boxes `random_box` draws.
    description: one line naming the blocks, their attributes and the options.
    supports: the methods that must not refuse the program (every block is marked as
      supported by them); the others may.
    relu_network: a small ReLU network `verify.milp_minimum` takes (at most
      8 inputs, 2 hidden layers of 8 units).
    skeleton: the structure.
    params: one dict of float32 arrays per block.
    seed: the seeds that regenerate it with `program_at` (None if drawn otherwise).
  """
  fn: Callable = dataclasses.field(compare=False, repr=False)
  input_shape: tuple[int, ...]
  description: str
  supports: frozenset
  relu_network: bool
  skeleton: Skeleton = dataclasses.field(repr=False)
  params: tuple = dataclasses.field(compare=False, repr=False)
  seed: tuple[int, ...] | None = None

  @property
  def outputs(self) -> int:
    return self.skeleton.outputs


def apply(skeleton: Skeleton, params: Sequence[dict], x: jax.Array) -> jax.Array:
  """Runs the program of ``skeleton`` with weights ``params`` on ``x [N, ...]``."""
  values = [x]
  for op, p in zip(skeleton.ops, params):
    values.append(_BLOCKS[op.kind].apply(op, p, *[values[i] for i in op.inputs]))
  return values[-1]


# ---------------------------------------------------------------------------- the blocks


@dataclasses.dataclass(frozen=True)
class _Block:
  """How a block is run, which weights it takes and which methods support it."""
  family: str
  apply: Callable[..., jax.Array]  # (op, params, *inputs) -> value
  init: Callable[..., dict]  # (rng, op attrs dict, input shapes) -> params
  methods: Callable[[Op], frozenset] = lambda op: _ALL


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float32)


def _last(shape) -> int:
  return shape[-1]


def _wrap(kind: str, f: Callable, *args):
  """Calls ``f(*args)`` plainly, inside ``jax.jit`` or inside ``jax.checkpoint``."""
  if kind == "Jit":
    return jax.jit(f)(*args)
  if kind == "Checkpoint":
    return jax.checkpoint(f)(*args)
  return f(*args)


def _affine_x(x, w, b):
  return x @ w + b


def _dense_init(rng, attrs, shapes):
  fan_in = shapes[0][0]
  units = attrs["units"]
  w = rng.normal(size=(fan_in, units)) * rng.uniform(0.5, 2.0) / np.sqrt(fan_in)
  if rng.random() < 0.2:  # sparse: dead and constant neurons
    w *= rng.random(w.shape) < 0.5
  if rng.random() < 0.1 and units > 1:  # two equal neurons: ties downstream
    w[:, 1] = w[:, 0]
  b = rng.normal(size=units) * rng.choice([0.0, 0.3, 1.0])
  return {"w": _f32(w), "b": _f32(b)}


def _dense(op, p, x):
  return _wrap(op.attr("wrap", "none"), _affine_x, x, p["w"], p["b"])


def _conv_init(rng, attrs, shapes):
  c_in = shapes[0][-1]
  kh, kw = attrs["kernel"]
  groups, features = attrs["groups"], attrs["features"]
  fan_in = kh * kw * c_in // groups
  k = rng.normal(size=(kh, kw, c_in // groups, features)) * rng.uniform(0.5, 2.0) / np.sqrt(fan_in)
  if attrs["layout"] == "OIHW":
    k = np.transpose(k, (3, 2, 0, 1))
  return {"k": _f32(k), "b": _f32(rng.normal(size=features) * rng.choice([0.0, 0.3]))}


def _conv(op, p, x):
  layout = op.attr("layout")
  out = lax.conv_general_dilated(x,
                                 p["k"],
                                 op.attr("strides"),
                                 op.attr("padding"),
                                 rhs_dilation=op.attr("dilation"),
                                 dimension_numbers=("NHWC", layout, "NHWC"),
                                 feature_group_count=op.attr("groups"))
  return out + p["b"]


def _pos(rng, size, low=0.05, high=1.5):
  return _f32(rng.uniform(low, high, size))


# Activations: (family, supporting methods, function of (x, params, attrs), params of last axis F).
_ACTIVATIONS: dict[str, tuple[str, frozenset, Callable, Callable]] = {
    "relu": ("dense", _ALL, lambda x, p, a: jax.nn.relu(x), lambda rng, f: {}),
    "max0": ("dense", _ALL, lambda x, p, a: jnp.maximum(x, 0.0), lambda rng, f: {}),
    "max_c": ("dense", _ALL, lambda x, p, a: jnp.maximum(x, p["c"]), lambda rng, f: {
        "c": _f32(rng.normal(size=f) * 0.5)
    }),
    "min_c": ("dense", _ALL, lambda x, p, a: jnp.minimum(x, p["c"]), lambda rng, f: {
        "c": _f32(rng.normal(size=f) * 0.5)
    }),
    "clip":
        ("dense", _ALL, lambda x, p, a: jnp.clip(x, p["lo"], p["lo"] + p["width"]), lambda rng, f: {
            "lo": _f32(rng.normal(size=f) * 0.5 - 0.5),
            "width": _pos(rng, f)
        }),
    "Clamp": ("dense", _ALL, lambda x, p, a: lax.clamp(p["lo"], x, p["lo"] + p["width"]),
              lambda rng, f: {
                  "lo": _f32(rng.uniform(-1.5, 0.0)),
                  "width": _pos(rng, (), 0.1, 2)
              }),
    "hard_tanh": ("dense", _ALL, lambda x, p, a: jnp.clip(x, -1.0, 1.0), lambda rng, f: {}),
    "leaky_relu": ("dense", _ALL, lambda x, p, a: jnp.maximum(x, p["slope"] * x), lambda rng, f: {
        "slope": _f32(rng.uniform(0.01, 0.5))
    }),
    "Abs": ("dense", _ALL, lambda x, p, a: jnp.abs(x), lambda rng, f: {}),
    "Square": ("dense", _ALL, lambda x, p, a: jnp.square(x), lambda rng, f: {}),
    "pow": ("dense", _ALL, lambda x, p, a: x**a["power"], lambda rng, f: {}),
    "Tanh": ("smooth", _ALL, lambda x, p, a: jnp.tanh(x), lambda rng, f: {}),
    "sigmoid": ("smooth", _ALL, lambda x, p, a: jax.nn.sigmoid(x), lambda rng, f: {}),
    "Exp": ("smooth", _ALL, lambda x, p, a: jnp.exp(x), lambda rng, f: {}),
    "Expm1": ("smooth", _ALL, lambda x, p, a: jnp.expm1(x), lambda rng, f: {}),
    "log1p_relu": ("smooth", _ALL, lambda x, p, a: jnp.log1p(jax.nn.relu(x)), lambda rng, f: {}),
    "log_relu": ("smooth", _ALL, lambda x, p, a: jnp.log(jax.nn.relu(x) + p["c"]), lambda rng, f: {
        "c": _pos(rng, f, 0.1, 2.0)
    }),
    "sqrt_relu":
        ("smooth", _ALL, lambda x, p, a: jnp.sqrt(jax.nn.relu(x) + p["c"]), lambda rng, f: {
            "c": _f32(rng.choice([0.0, 0.1, 1.0]) * np.ones(f))
        }),
    "softplus": ("smooth", _ALL, lambda x, p, a: jax.nn.relu(x) + jnp.log1p(jnp.exp(-jnp.abs(x))),
                 lambda rng, f: {}),
    "Exp2": ("smooth", _IBP, lambda x, p, a: jnp.exp2(x), lambda rng, f: {}),
    "Erf": ("smooth", _IBP, lambda x, p, a: lax.erf(x), lambda rng, f: {}),
    "Atan": ("smooth", _IBP, lambda x, p, a: jnp.arctan(x), lambda rng, f: {}),
    "Asinh": ("smooth", _IBP, lambda x, p, a: jnp.arcsinh(x), lambda rng, f: {}),
    "Sinh": ("smooth", _IBP, lambda x, p, a: jnp.sinh(x), lambda rng, f: {}),
    "Cbrt": ("smooth", _IBP, lambda x, p, a: jnp.cbrt(x), lambda rng, f: {}),
    "rsqrt_relu":
        ("smooth", _IBP, lambda x, p, a: lax.rsqrt(jax.nn.relu(x) + p["c"]), lambda rng, f: {
            "c": _pos(rng, f, 0.1, 2.0)
        }),
    "inverse_relu": ("smooth", _IBP, lambda x, p, a: 1.0 /
                     (jax.nn.relu(x) + p["c"]), lambda rng, f: {
                         "c": _pos(rng, f, 0.2, 2.0)
                     }),
    "silu": ("smooth", _IBP, lambda x, p, a: x * jax.nn.sigmoid(x), lambda rng, f: {}),
    "gelu": ("smooth", _IBP, lambda x, p, a: jax.nn.gelu(x, approximate=True), lambda rng, f: {}),
}
_RELU_ACTIVATIONS = ("relu", "max0")


def _act(op, p, x):
  _, _, f, _ = _ACTIVATIONS[op.attr("name")]
  attrs = dict(op.attrs)
  return _wrap(op.attr("wrap", "none"), lambda v, q: f(v, q, attrs), x, p)


def _act_init(rng, attrs, shapes):
  return _ACTIVATIONS[attrs["name"]][3](rng, _last(shapes[0]))


def _pool(op, p, x):
  window = (1,) + op.attr("window") + (1,)
  strides = (1,) + op.attr("strides") + (1,)
  kind, padding = op.attr("op"), op.attr("padding")
  if kind == "Max":
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
  if kind == "Min":
    return lax.reduce_window(x, jnp.inf, lax.min, window, strides, padding)
  total = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
  return total / math.prod(window)


def _reduce_fn(kind):
  return {"sum": jnp.sum, "mean": jnp.mean, "Max": jnp.max, "Min": jnp.min}[kind]


def _global_pool(op, p, x):
  return _reduce_fn(op.attr("op"))(x, axis=(1, 2))


def _batch_norm_init(rng, attrs, shapes):
  f = _last(shapes[0])
  gamma = rng.normal(size=f) * 0.5 + rng.choice([1.0, -1.0, 0.0])
  return {
      "mean": _f32(rng.normal(size=f) * 0.5),
      "var": _f32(rng.uniform(0.05, 2.0, f)),
      "gamma": _f32(gamma),
      "beta": _f32(rng.normal(size=f) * 0.3)
  }


def _batch_norm(op, p, x):
  if op.attr("form") == "Div":
    return (x - p["mean"]) / jnp.sqrt(p["var"] + 1e-5) * p["gamma"] + p["beta"]
  return (x - p["mean"]) * (p["gamma"] * lax.rsqrt(p["var"] + 1e-5)) + p["beta"]


def _combine(op, p, a, b):
  kind = op.attr("op")
  if kind == "Add":
    return a + b
  if kind == "Sub":
    return a - b
  if kind == "Max":
    return jnp.maximum(a, b)
  if kind == "Min":
    return jnp.minimum(a, b)
  if kind == "Mul":
    return a * b
  return a / (jax.nn.relu(b) + p["c"])  # div


def _combine_init(rng, attrs, shapes):
  if attrs["op"] == "Div":
    return {"c": _pos(rng, _last(shapes[0]), 0.3, 2.0)}
  return {}


def _flat_transpose(op, p, x):
  a, b = op.attr("parts")
  n = x.shape[0]
  return jnp.transpose(x.reshape(n, a, b), (0, 2, 1)).reshape(n, a * b)


def _transpose(op, p, x):
  if x.ndim == 2:
    return _flat_transpose(op, p, x)
  return jnp.transpose(x, op.attr("perm"))


def _reduce(op, p, x):
  f = _reduce_fn(op.attr("op"))
  if x.ndim == 2:
    g = op.attr("group")
    return f(x.reshape(x.shape[0], -1, g), axis=2)
  return f(x, axis=op.attr("axis"), keepdims=True)


def _slice(op, p, x):
  idx = (slice(None),) + tuple(slice(a, b, s) for a, b, s in op.attr("ranges"))
  return x[idx]


def _pad(op, p, x):
  config = [(0, 0, 0)] + list(op.attr("config"))
  return lax.pad(x, p["value"].astype(x.dtype), config)


def _loop_init(rng, attrs, shapes):
  f = shapes[0][0]
  steps = attrs["steps"]
  w = rng.normal(size=(steps, f, f)) * rng.uniform(0.5, 1.5) / np.sqrt(f)
  return {"w": _f32(w), "b": _f32(rng.normal(size=(steps, f)) * 0.3)}


def _loop(op, p, x):
  kind, steps = op.attr("loop"), op.attr("steps")
  w, b = p["w"], p["b"]

  def step(h, wb):
    return h + 0.5 * jnp.tanh(h @ wb[0] + wb[1])

  if kind == "fori":  # the first step's weights every time (a constant body)
    return lax.fori_loop(0, steps, lambda i, h: step(h, (w[0], b[0])), x)
  if kind == "Scan":
    return lax.scan(lambda h, wb: (step(h, wb), None), x, (w, b))[0]
  if kind == "scan_ys":
    _, ys = lax.scan(lambda h, wb: (step(h, wb), step(h, wb)), x, (w, b))
    return jnp.mean(ys, axis=0)
  _, h = lax.while_loop(lambda c: c[0] < steps, lambda c: (c[0] + 1, step(c[1], (w[0], b[0]))),
                        (0, x))
  return h


def _loop_methods(op):
  if op.attr("loop") == "While":
    return _NONE
  # The stacked outputs of a scan are [T, N, ...]: CROWN needs the batch axis first everywhere.
  return _IBP if op.attr("loop") == "scan_ys" else _ALL


def _cast(op, p, x):
  kind = op.attr("dtype")
  if kind == "Reduce_precision":
    return lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
  if kind == "int32":
    return (x * 4.0).astype(jnp.int32).astype(x.dtype) / 4.0
  return x.astype(jnp.dtype(kind)).astype(x.dtype)


def _no_params(rng, attrs, shapes):
  return {}


_BLOCKS: dict[str, _Block] = {
    "dense":
        _Block("dense", _dense, _dense_init),
    "act":
        _Block("dense", _act, _act_init, lambda op: _ACTIVATIONS[op.attr("name")][1]),
    "conv":
        _Block("conv", _conv, _conv_init),
    "pool":
        _Block("conv", _pool, _no_params, lambda op: _IBP if op.attr("op") == "Min" else _ALL),
    "global_pool":
        _Block("conv", _global_pool, _no_params, lambda op: _IBP
               if op.attr("op") == "Min" else _ALL),
    "batch_norm":
        _Block("conv", _batch_norm, _batch_norm_init),
    "combine":
        _Block("dag", _combine, _combine_init, lambda op: _IBP
               if op.attr("op") in ("Mul", "Div") else _ALL),
    "concat":
        _Block("dag", lambda op, p, a, b: jnp.concatenate([a, b], axis=-1), _no_params),
    "flatten":
        _Block("dense", lambda op, p, x: x.reshape(x.shape[0], -1), _no_params),
    "unflatten":
        _Block("conv", lambda op, p, x: x.reshape((x.shape[0],) + op.attr("to")), _no_params),
    "Transpose":
        _Block("dag", _transpose, _no_params),
    "Reduce":
        _Block("dag", _reduce, _no_params, lambda op: _IBP if op.attr("op") == "Min" else _ALL),
    "Cumsum":
        _Block("dag", lambda op, p, x: lax.cumsum(x, op.attr("axis"), op.attr("reverse")),
               _no_params),
    "Slice":
        _Block("dag", _slice, _no_params),
    "Pad":
        _Block("dag", _pad, lambda rng, a, s: {"value": _f32(rng.choice([0.0, -0.5, 1.0]))}),
    "loop":
        _Block("loop", _loop, _loop_init, _loop_methods),
    # CROWN has no relaxation of a cast to an integer (a step function).
    "cast":
        _Block("cast", _cast, _no_params, lambda op: _IBP if op.attr("dtype") == "int32" else _ALL),
}

# ---------------------------------------------------------------------------- the generator


class _Builder:
  """Appends blocks to a program being drawn, computing each value's shape."""

  def __init__(self,
               rng: np.random.Generator,
               input_shape: tuple[int, ...],
               families,
               crown_only: bool = False):
    self.rng = rng
    self.families = set(families) | {"core"}
    self.crown_only = crown_only  # only blocks every method supports
    self.shapes: list[tuple[int, ...]] = [input_shape]
    self.ops: list[Op] = []

  @property
  def current(self) -> int:
    return len(self.shapes) - 1

  def add(self, kind: str, inputs: Sequence[int], **attrs) -> int | None:
    """Appends a block; returns its value's index, or None (nothing appended) if invalid."""
    in_shapes = [self.shapes[i] for i in inputs]
    params = _BLOCKS[kind].init(np.random.default_rng(0), attrs, in_shapes)
    op = Op(kind, tuple(inputs), tuple(sorted(attrs.items())), ())
    try:
      out = jax.eval_shape(lambda *xs: _BLOCKS[kind].apply(op, params, *xs),
                           *[jax.ShapeDtypeStruct((2,) + s, jnp.float32) for s in in_shapes])
    except Exception:  # pylint: disable=broad-except
      return None  # e.g. a convolution's window larger than its padded input
    shape = tuple(out.shape[1:])
    if out.dtype != jnp.float32 or not shape or 0 in shape or math.prod(shape) > _MAX_ELEMENTS:
      return None
    if self.crown_only and _BLOCKS[kind].methods(op) != _ALL:
      return None
    self.ops.append(dataclasses.replace(op, shape=shape))
    self.shapes.append(shape)
    return self.current

  def activation(self, x: int, names: Sequence[str] | None = None) -> int | None:
    rng = self.rng
    if names is None:
      names = [n for n, (fam, m, *_) in _ACTIVATIONS.items() if fam in self.families]
      # CROWN's activations twice as often as the IBP-only ones; ReLUs the most common.
      names += [n for n in names if _ACTIVATIONS[n][1] == _ALL]
      names += ["relu"] * max(len(names) // 3, 1)
    name = str(rng.choice(names))
    attrs = {"name": name, "wrap": str(rng.choice(["none"] * 6 + ["Jit", "Checkpoint"]))}
    if name == "pow":
      attrs["power"] = int(rng.integers(2, 5))
    return self.add("act", [x], **attrs)

  def dense(self, x: int, units: int | None = None) -> int | None:
    if len(self.shapes[x]) != 1:
      x = self.add("flatten", [x])
    units = units or int(
        self.rng.integers(1, 13) if self.rng.random() < 0.2 else self.rng.integers(2, 13))
    return self.add("dense", [x], units=units, wrap=str(self.rng.choice(["none"] * 6 + ["Jit"])))

  def conv(self, x: int, features: int | None = None, same: bool = False) -> int | None:
    rng = self.rng
    c_in = self.shapes[x][-1]
    features = features or int(rng.integers(1, 5))
    spatial = self.shapes[x][:2]
    # Windows no wider than the input: XLA aborts the process compiling the transpose of some
    # convolutions whose kernel reaches past the input into the padding alone (see the tests).
    k = tuple(int(min(rng.integers(1, 4), n)) for n in spatial)
    if same:
      strides, padding, dilation = (1, 1), "SAME", (1, 1)
    else:
      strides = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
      padding = rng.choice(["SAME", "VALID", "explicit"])
      if padding == "explicit":
        padding = tuple((int(rng.integers(0, k[i])), int(rng.integers(0, k[i]))) for i in range(2))
      else:
        padding = str(padding)
      dilation = (1, 1) if rng.random() < 0.8 else (2, 2)
      if any((ki - 1) * d + 1 > n for ki, d, n in zip(k, dilation, spatial)):
        dilation = (1, 1)
    groups = 1
    if c_in > 1 and rng.random() < 0.25:
      groups = c_in
      features = c_in * int(rng.integers(1, 3))
    return self.add("conv", [x],
                    features=features,
                    kernel=k,
                    strides=strides,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    layout=str(rng.choice(["HWIO", "OIHW"])))

  def branch(self, x: int, bounded: bool = False) -> int | None:
    """A value of the shape of ``x`` computed from it (for sums, maxima and products)."""
    shape = self.shapes[x]
    h = self.dense(x, shape[0]) if len(shape) == 1 else self.conv(x, shape[-1], same=True)
    if h is None:
      return None
    return self.activation(h, ["Tanh", "sigmoid"] if bounded else None)

  def partner(self, x: int, match: Callable[[tuple[int, ...]], bool], bounded: bool = False):
    earlier = [i for i in range(self.current) if i != x and match(self.shapes[i])]
    if earlier and self.rng.random() < 0.6:
      return int(self.rng.choice(earlier))
    return self.branch(x, bounded)

  def step(self) -> None:
    """Appends one random block (or a few) to the current value."""
    rng = self.rng
    x = self.current
    shape = self.shapes[x]
    image = len(shape) == 3
    fams = self.families
    choices: list[Callable[[], Any]] = [lambda: self.activation(x)]
    if not image:
      choices += [lambda: self.dense(x)] * 2
    if "dense" in fams:
      choices += [lambda: self.add("batch_norm", [x], form=str(rng.choice(["Mul", "Div"])))]
    if "smooth" in fams:
      choices += [lambda: self.activation(x)] * 2
    if "conv" in fams and image:
      choices += [lambda: self.conv(x)] * 3 + [lambda: self._pool(x)] * 2
      choices += [
          lambda: self.add("batch_norm", [x], form=str(rng.choice(["Mul", "Div"]))),
          lambda: self.add("global_pool", [x],
                           op=str(rng.choice(["Max", "mean", "sum"] * 2 + ["Min"]))),
          lambda: self.add("Transpose", [x],
                           perm=(0,) + tuple(int(a) for a in rng.permutation(3) + 1))
      ]
    if "conv" in fams and not image:
      choices += [lambda: self._unflatten(x)]
    if "dag" in fams:
      ops = ["Add"] * 3 + ["Sub", "Max", "Min"] * 2 + ["Mul", "Div"]  # IBP-only ones rarer
      choices += [lambda: self._combine(x, str(rng.choice(ops)))] * 3
      choices += [
          lambda: self._concat(x), lambda: self._reduce(x), lambda: self._slice(x),
          lambda: self.add("Cumsum", [x],
                           axis=int(rng.integers(1,
                                                 len(shape) + 1)),
                           reverse=bool(rng.random() < 0.5))
      ]
      if image:
        choices += [lambda: self._pad(x)]
      else:
        choices += [lambda: self._flat_transpose(x)]
    if "loop" in fams:
      choices += [lambda: self._loop(x)] * 3
    if "cast" in fams:
      choices += [
          lambda: self.add("cast", [x],
                           dtype=str(
                               rng.choice(["float16", "bfloat16", "int32", "Reduce_precision"])))
      ] * 2
    for _ in range(10):
      if choices[int(rng.integers(len(choices)))]() is not None:
        return

  def _pool(self, x):
    rng = self.rng
    window = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    strides = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    return self.add("pool", [x],
                    op=str(rng.choice(["Max"] * 3 + ["avg"] * 2 + ["Min"])),
                    window=window,
                    strides=strides,
                    padding=str(rng.choice(["VALID", "SAME"])))

  def _unflatten(self, x):
    f = self.shapes[x][0]
    options = [(h, w, f // (h * w))
               for h in range(2, f + 1)
               for w in range(2, f + 1)
               if f % (h * w) == 0 and f // (h * w) <= 4]
    if not options:
      return None
    return self.add("unflatten", [x], to=options[int(self.rng.integers(len(options)))])

  def _combine(self, x, op):
    shape = self.shapes[x]
    y = self.partner(x, lambda s: s == shape, bounded=op == "Mul")
    if y is None or self.shapes[y] != shape:
      return None
    a, b = (x, y) if self.rng.random() < 0.5 or op == "Div" else (y, x)
    return self.add("combine", [a, b], op=op)

  def _concat(self, x):
    shape = self.shapes[x]
    y = self.partner(x, lambda s: len(s) == len(shape) and s[:-1] == shape[:-1])
    if y is None or self.shapes[y][:-1] != shape[:-1]:
      return None
    return self.add("concat", [x, y] if self.rng.random() < 0.5 else [y, x])

  def _reduce(self, x):
    rng = self.rng
    shape = self.shapes[x]
    op = str(rng.choice(["sum", "mean", "Max"] * 2 + ["Min"]))
    if len(shape) == 1:
      groups = [g for g in range(2, shape[0] + 1) if shape[0] % g == 0]
      if not groups:
        return None
      return self.add("Reduce", [x], op=op, group=int(rng.choice(groups)))
    return self.add("Reduce", [x], op=op, axis=int(rng.integers(1, 4)))

  def _slice(self, x):
    rng = self.rng
    ranges = []
    for n in self.shapes[x]:
      a = int(rng.integers(0, n))
      b = int(rng.integers(a + 1, n + 1))
      ranges.append((a, b, int(rng.integers(1, 3))))
    return self.add("Slice", [x], ranges=tuple(ranges))

  def _pad(self, x):
    rng = self.rng
    config = [(int(rng.integers(-1, 3)), int(rng.integers(-1, 3)), int(rng.integers(0, 2)))
              for _ in range(2)] + [(0, 0, 0)]
    return self.add("Pad", [x], config=tuple(config))

  def _flat_transpose(self, x):
    f = self.shapes[x][0]
    splits = [(a, f // a) for a in range(2, f) if f % a == 0]
    if not splits:
      return None
    return self.add("Transpose", [x], parts=splits[int(self.rng.integers(len(splits)))])

  def _loop(self, x):
    rng = self.rng
    if len(self.shapes[x]) != 1:
      x = self.add("flatten", [x])
    if self.shapes[x][0] > 16:
      x = self.dense(x, int(rng.integers(2, 9)))
    return self.add("loop", [x],
                    loop=str(rng.choice(["fori", "Scan", "scan_ys", "While"])),
                    steps=int(rng.integers(1, 4)))


def random_skeleton(rng: np.random.Generator, families: Sequence[str] = FAMILIES) -> Skeleton:
  """A random program structure whose blocks come from ``families`` (see `FAMILIES`).

  Dense layers, ReLUs and flattening are always available; a third of the
  programs with the ``dense`` family are small ReLU networks `check` also
  compares with `verify.milp_minimum`. 60% of the others hold only blocks
  that every method supports.
  """
  families = tuple(families)
  bad = set(families) - set(FAMILIES)
  if not families or bad:
    raise InputError(f"families must be a non-empty subset of {FAMILIES}, got {families}")
  if "dense" in families and rng.random() < 1 / 3:
    return _relu_network(rng, families)
  image = rng.random() < (0.75 if "conv" in families else 0.25 if "dag" in families else 0.0)
  if image:
    input_shape = (int(rng.integers(3, 9)), int(rng.integers(3, 9)), int(rng.integers(1, 4)))
  else:
    input_shape = (int(rng.integers(2, 17)),)
  # Most programs only hold blocks every method supports; the others may hold any block.
  builder = _Builder(rng, input_shape, families, crown_only=rng.random() < 0.6)
  for _ in range(int(rng.integers(2, 7))):
    builder.step()
  k = int(rng.integers(2, 6))
  if builder.dense(builder.current, k) is None:
    raise AssertionError(f"no head for {builder.ops}")
  return _finish(rng, builder, families)


def _relu_network(rng, families) -> Skeleton:
  builder = _Builder(rng, (int(rng.integers(1, _MILP_INPUTS + 1)),), families)
  for _ in range(int(rng.integers(1, _MILP_LAYERS + 1))):
    builder.dense(builder.current, int(rng.integers(1, _MILP_UNITS + 1)))
    builder.activation(builder.current, _RELU_ACTIVATIONS)
  builder.dense(builder.current, int(rng.integers(2, 6)))
  return _finish(rng, builder, families)


def _finish(rng, builder: _Builder, families) -> Skeleton:
  chunk = None if rng.random() < 0.6 else int(rng.integers(1, 4))
  return Skeleton(builder.shapes[0], int(rng.integers(1, 4)), tuple(builder.ops),
                  int(rng.integers(1, 4)), chunk, bool(rng.random() < 0.7), families)


def is_relu_network(skeleton: Skeleton) -> bool:
  """Whether the program is a small ReLU network (`verify.milp_minimum` solves it quickly)."""
  if len(skeleton.input_shape) != 1 or skeleton.input_shape[0] > _MILP_INPUTS:
    return False
  hidden = 0
  for op in skeleton.ops:
    if op.kind == "dense":
      hidden += 1
      if op.shape[0] > _MILP_UNITS and op is not skeleton.ops[-1]:
        return False
    elif not (op.kind == "act" and op.attr("name") in _RELU_ACTIVATIONS):
      return False
  return hidden - 1 <= _MILP_LAYERS


def describe(skeleton: Skeleton) -> str:
  """One line: the input, each block with its attributes and operands, the options."""

  def value(a):
    if isinstance(a, tuple):
      return "x".join(value(v) for v in a) if all(isinstance(v, int) for v in a) else str(a)
    return str(a)

  parts = [f"x[{skeleton.batch},{','.join(map(str, skeleton.input_shape))}]"]
  for i, op in enumerate(skeleton.ops):
    attrs = ",".join(f"{k}={value(v)}" for k, v in op.attrs if not (k == "wrap" and v == "none"))
    args = ",".join(f"v{j}" for j in op.inputs)
    parts.append(f"v{i + 1}={op.kind}({args}{';' + attrs if attrs else ''})")
  options = f"S={skeleton.spec_rows}"
  if skeleton.chunk_size is not None:
    options += f" chunk_size={skeleton.chunk_size}"
  if skeleton.stacked_spec:
    options += " stacked_spec"
  return " ".join(parts) + f" -> [{skeleton.batch},{skeleton.outputs}] ({options})"


def instantiate(skeleton: Skeleton,
                rng: np.random.Generator,
                seed: tuple[int, ...] | None = None) -> Program:
  """The program of ``skeleton`` with random weights drawn from ``rng``."""
  shapes = skeleton.shapes()
  params = tuple({
      k: jnp.asarray(v)
      for k, v in _BLOCKS[op.kind].init(rng, dict(op.attrs), [shapes[i]
                                                              for i in op.inputs]).items()
  }
                 for op in skeleton.ops)
  supports = _ALL
  for op in skeleton.ops:
    supports = supports & _BLOCKS[op.kind].methods(op)
  return Program(functools.partial(apply, skeleton, params),
                 (skeleton.batch,) + skeleton.input_shape, describe(skeleton), supports,
                 is_relu_network(skeleton), skeleton, params, seed)


def random_program(rng: np.random.Generator, families: Sequence[str] = FAMILIES) -> Program:
  """A random program: a `random_skeleton` with random weights, both drawn from ``rng``."""
  return instantiate(random_skeleton(rng, families), rng)


def program_at(seed: tuple[int, int, int], families: Sequence[str] = FAMILIES) -> Program:
  """Program ``(run seed, group, variant)`` of `run`: group's skeleton, variant's weights."""
  run_seed, group, variant = seed
  skeleton = random_skeleton(np.random.default_rng([run_seed, group]), families)
  return instantiate(skeleton, np.random.default_rng([run_seed, group, variant]), tuple(seed))


# ---------------------------------------------------------------------------- boxes


@dataclasses.dataclass(frozen=True)
class Box:
  """An input box ``[N, ...]`` (float32 numpy arrays) and the kind it was drawn as."""
  kind: str
  lower: np.ndarray = dataclasses.field(repr=False)
  upper: np.ndarray = dataclasses.field(repr=False)

  @property
  def interval(self) -> Interval:
    return Interval(jnp.asarray(self.lower), jnp.asarray(self.upper))


def random_box(program: Program, rng: np.random.Generator, kind: str | None = None) -> Box:
  """A random box of the program's input shape, of ``kind`` (one of `BOX_KINDS`, or random).

  - ``ordinary``: centre normal or uniform in [0, 1], radius ``10**U(-6, 0)``
    per example, sometimes scaled per element (some elements degenerate).
  - ``degenerate``: ``lower == upper``.
  - ``ulp``: ``upper = nextafter(lower, inf)`` in float32.
  - ``near_tie``: centre on a grid of quarters (exact ties), radius ``10**U(-7, -4)``.
  """
  kind = kind or str(rng.choice(BOX_KINDS))
  shape = program.input_shape
  n = shape[0]
  per_example = (n,) + (1,) * (len(shape) - 1)
  if rng.random() < 0.5:
    center = rng.normal(size=shape) * rng.choice([0.3, 1.0, 2.0])
  else:
    center = rng.uniform(0, 1, shape)
  if kind == "ordinary":
    radius = 10.0**rng.uniform(-6, 0, per_example)
    if rng.random() < 0.3:
      radius = radius * rng.uniform(0, 1, shape) * (rng.random(shape) < 0.8)
    lower, upper = _f32(center - radius), _f32(center + radius)
  elif kind == "degenerate":
    lower = upper = _f32(center)
  elif kind == "ulp":
    lower = _f32(center)
    upper = np.nextafter(lower, np.float32(np.inf))
  elif kind == "near_tie":
    center = np.round(center * 4) / 4
    radius = 10.0**rng.uniform(-7, -4, per_example)
    lower, upper = _f32(center - radius), _f32(center + radius)
  else:
    raise InputError(f"box kind must be one of {BOX_KINDS}, got {kind!r}")
  upper = np.maximum(upper, lower)
  return Box(kind, lower, upper.copy() if upper is lower else upper)


def random_spec(program: Program, rng: np.random.Generator) -> np.ndarray:
  """``C [N, S, K]``: normal rows, margin rows ``e_i - e_j`` and signed unit rows."""
  n, s, k = program.input_shape[0], program.skeleton.spec_rows, program.outputs
  c = rng.normal(size=(n, s, k))
  for i in range(n):
    for j in range(s):
      kind = rng.integers(3)
      if kind == 1:
        a, b = rng.choice(k, 2, replace=False)
        c[i, j] = 0.0
        c[i, j, a], c[i, j, b] = 1.0, -1.0
      elif kind == 2:
        c[i, j] = 0.0
        c[i, j, rng.integers(k)] = rng.choice([1.0, -1.0])
  return _f32(c)


# ---------------------------------------------------------------------------- the check


@dataclasses.dataclass(frozen=True)
class Finding:
  """A violation (or an unexpected failure) of one method on one program and box.

  Attributes:
    program: the program's description.
    method: the bound method (or ``"milp"``).
    box_kind: one of `BOX_KINDS`.
    kind: ``"lower"`` / ``"upper"`` (a value outside the bounds), ``"order"``
      (``lower > upper``), ``"nan"`` (a NaN bound), ``"milp"`` (a lower bound
      above the exact minimum), ``"exception"`` (any error but
      `verify.UnsupportedPrimitiveError`), ``"unsupported"`` (a method rejected a
      program whose blocks are all marked as supported by it).
    violation: by how much the worst value exceeds the bound beyond the
      tolerance (NaN for exceptions).
    detail: where (output, point) and the numbers.
    seed: ``(run seed, group, variant, box)`` for `replay`; None outside `run`.
    families: the families the program was drawn from (also for `replay`).
    real_violation: for ``"lower"``/``"upper"``, by how much the same point's value computed
      in float64 lies outside the bound (without tolerance; <= 0: inside, so the float32
      evaluation's rounding made the violation); NaN otherwise.
  """
  program: str
  method: str
  box_kind: str
  kind: str
  violation: float
  detail: str
  seed: tuple[int, ...] | None = None
  families: tuple[str, ...] = FAMILIES
  real_violation: float = math.nan

  @property
  def reproduction(self) -> str:
    if self.seed is None:
      return "(no seed: the program was not drawn by verify.fuzz.run)"
    methods = METHODS if self.method == "milp" else (self.method,)
    return (f"python -c \"from verify import fuzz; print(*fuzz.replay({self.seed}, "
            f"'{self.box_kind}', methods={methods}, families={self.families}), sep='\\n')\"")

  def __str__(self) -> str:
    return (f"{self.method} {self.kind} on a {self.box_kind} box: {self.detail} "
            f"[violation {self.violation:.3g}] program: {self.program}; reproduce: "
            f"{self.reproduction}")


@dataclasses.dataclass
class Tally:
  """Counts that `check` adds to.

  Attributes:
    checks: (box, method) bound computations compared with points.
    point_checks: (point, example, output row) comparisons.
    unsupported: `verify.UnsupportedPrimitiveError` rejections by method.
    milp: comparisons of a lower bound with an exact minimum.
    checked: the methods that produced bounds (reset by `run` per program).
  """
  checks: int = 0
  point_checks: int = 0
  unsupported: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  milp: int = 0
  checked: set = dataclasses.field(default_factory=set)


# Each compilation runs a few times only: LLVM's optimisations would cost more than they save
# (CROWN and alpha-CROWN of the programs compile about 1.7 times faster). Every operation keeps
# its float semantics; the order of a sum's terms may differ, as between any two compilations.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def _builtin(name: str, skeleton: Skeleton) -> BoundFn:
  if name == "ibp":
    return lambda fn, box, spec: ibp(fn if spec is None else _spec_fn(fn, spec), box)
  chunk = skeleton.chunk_size
  if name == "crown":
    return lambda fn, box, spec: crown(fn, box, spec, chunk_size=chunk)
  if name == "crown_ibp":
    return lambda fn, box, spec: crown_ibp(fn, box, spec, chunk_size=chunk)
  if name == "alpha_crown":
    return lambda fn, box, spec: alpha_crown(fn, box, spec, chunk_size=chunk)
  raise InputError(f"unknown method {name!r}; methods are {METHODS} or (name, bound_fn) pairs")


def _spec_fn(fn, spec):
  return lambda x: jnp.einsum("nsk,nk->ns", spec, fn(x))


def _bound_outputs(skeleton: Skeleton, name: str, bound: BoundFn | None) -> Callable:
  """``(params, lower, upper, spec) -> (lower, upper, spec lower, spec upper)`` of one method."""
  stacked = bound is None and (name == "alpha_crown" or (name != "ibp" and skeleton.stacked_spec))
  bound = bound or _builtin(name, skeleton)

  def bounds(params, lower, upper, spec):
    fn = functools.partial(apply, skeleton, params)
    box = Interval(lower, upper)
    if stacked:
      n, _, k = spec.shape
      eye = jnp.broadcast_to(jnp.eye(k, dtype=spec.dtype), (n, k, k))
      both = bound(fn, box, jnp.concatenate([eye, spec], axis=1))
      return both.lower[:, :k], both.upper[:, :k], both.lower[:, k:], both.upper[:, k:]
    out, spec_out = bound(fn, box, None), bound(fn, box, spec)
    return out.lower, out.upper, spec_out.lower, spec_out.upper

  return bounds


# Errors raised while tracing a method on a structure: they depend on the structure only, so
# they are raised again for later weights and boxes without tracing anew (kept without their
# tracebacks, whose frames hold the traced graphs).
_TRACE_ERRORS: dict[tuple, Exception] = {}
# Structures whose compilations are kept: `run` checks one structure at a time (its weights share
# them) and `forget`s them after it; a few more serve callers of `check`.
_CACHED = 8
_TRACE_ERROR_TYPES = (InputError, NotImplementedError, TypeError, ValueError)


@functools.lru_cache(maxsize=_CACHED)
def _compiled_bounds(skeleton: Skeleton, methods: tuple[tuple[str, BoundFn | None], ...]):
  """The bounds of several methods as one compiled function (one compilation, shared work)."""
  parts = [_bound_outputs(skeleton, name, bound) for name, bound in methods]
  return compilation.jit(lambda *args: tuple(f(*args) for f in parts),
                         compiler_options=_COMPILER_OPTIONS)


def _all_bounds(skeleton: Skeleton, methods, args) -> dict[str, Any]:
  """``{name: [4 arrays] or the exception}``: the methods that trace together in one call, the
  others (and all of them when the joint call fails) one by one."""
  out: dict[str, Any] = {}
  for key in methods:
    if (skeleton,) + key in _TRACE_ERRORS:
      out[key[0]] = _TRACE_ERRORS[(skeleton,) + key]
  together = tuple(key for key in methods if key[0] not in out)
  if len(together) > 1:
    try:
      for key, res in zip(together, _compiled_bounds(skeleton, together)(*args)):
        out[key[0]] = [np.asarray(r) for r in res]
      return out
    except Exception:  # pylint: disable=broad-except
      pass  # found one by one below
  for key in together:
    try:
      out[key[0]] = [np.asarray(r) for r in _compiled_bounds(skeleton, (key,))(*args)[0]]
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, _TRACE_ERROR_TYPES):
        _TRACE_ERRORS[(skeleton,) + key] = e.with_traceback(None)
      out[key[0]] = e
  return out


@functools.lru_cache(maxsize=_CACHED)
def _compiled_allowance(skeleton: Skeleton):
  """``(params, lower, upper, spec) -> ([N, K], [N, S])``: the rounding allowances."""

  def allowances(params, lower, upper, spec):
    fn = lambda x: apply(skeleton, params, x)
    box = Interval(lower, upper)
    return rounding_allowance(fn, box), rounding_allowance(fn, box, spec)

  return compilation.jit(allowances, compiler_options=_COMPILER_OPTIONS)


def _allowances(program: Program, box: Box, spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rounding allowances of the outputs and of the specification over ``box``; infinite
  where the program has no IBP bound to take them from."""
  try:
    out, rows = _compiled_allowance(program.skeleton)(program.params, box.lower, box.upper, spec)
    return np.asarray(out, np.float64), np.asarray(rows, np.float64)
  except Exception:  # pylint: disable=broad-except
    n, k = box.lower.shape[0], spec.shape[2]
    return np.full((n, k), np.inf), np.full((n, spec.shape[1]), np.inf)


@functools.lru_cache(maxsize=_CACHED)
def _compiled_outputs(skeleton: Skeleton):
  """``(params, x [M, ...]) -> [M, K]`` and the gradient sign function, compiled once."""

  def outputs(params, x):
    return apply(skeleton, params, x)

  def jacobian(params, x, spec):  # [K + S, N, ...] at x [N, ...]

    def rows(x):
      y = apply(skeleton, params, x)
      return jnp.sum(jnp.concatenate([y, jnp.einsum("nsk,nk->ns", spec, y)], axis=1), axis=0)

    return jax.jacfwd(rows)(x)  # forward mode: while loops too

  return (compilation.jit(outputs, compiler_options=_COMPILER_OPTIONS),
          compilation.jit(jacobian, compiler_options=_COMPILER_OPTIONS))


def forget() -> None:
  """Drops the fuzzer's compilations, its remembered trace errors and JAX's caches (a long run
  calls it after each structure: otherwise its memory grows with every compilation)."""
  for cached in (_compiled_bounds, _compiled_allowance, _compiled_outputs):
    cached.cache_clear()
  _TRACE_ERRORS.clear()
  jax.clear_caches()


def _points(program: Program, box: Box, spec: np.ndarray, rng: np.random.Generator,
            extra: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
  """Points ``[P, N, ...]`` of the box and what each is (corner, gradient corner, ...)."""
  lo, hi = box.lower, box.upper
  shape = lo.shape
  d = math.prod(shape[1:])
  pts, labels = [], []
  if d <= _ALL_CORNERS_DIMS:
    bits = (np.arange(2**d)[:, None] >> np.arange(d)[None]) & 1
    masks = np.broadcast_to(bits.reshape((2**d, 1) + shape[1:]), (2**d,) + shape).astype(bool)
  else:
    masks = rng.random((_RANDOM_CORNERS,) + shape) < 0.5
  pts.append(np.where(masks, hi, lo))
  labels += ["corner"] * len(masks)
  if d > _ALL_CORNERS_DIMS:  # else every corner is there already
    _, jacobian = _compiled_outputs(program.skeleton)
    jac = np.asarray(jacobian(program.params, jnp.asarray((lo + hi) / 2), jnp.asarray(spec)))
    up = jac > 0
    pts += [np.where(up, hi, lo), np.where(up, lo, hi)]
    labels += ["gradient corner"] * (2 * len(jac))
  t = rng.random((_UNIFORM_POINTS + _FACE_POINTS,) + shape).astype(np.float32)
  faces = t[_UNIFORM_POINTS:]
  snap = rng.random(faces.shape) < 0.5
  faces[snap] = np.round(faces[snap])
  inside = np.clip(lo + t * (hi - lo), lo, hi)
  inside = np.where(t == 0, lo, np.where(t == 1, hi, inside))
  pts.append(inside)
  labels += ["uniform"] * _UNIFORM_POINTS + ["face"] * _FACE_POINTS
  for e in extra:
    pts.append(e[None])
    labels.append("milp minimizer")
  pts.append(((lo + hi) / 2)[None])
  labels.append("centre")
  points = np.concatenate(pts).astype(np.float32)
  pad = -len(points) % 32
  if pad:  # a fixed number of points per program structure: one compilation
    points = np.concatenate([points, np.repeat(points[-1:], pad, axis=0)])
    labels += ["centre"] * pad
  return points, labels


def _evaluate(program: Program, points: np.ndarray) -> np.ndarray:
  outputs, _ = _compiled_outputs(program.skeleton)
  p, n = points.shape[:2]
  out = np.asarray(outputs(program.params,
                           jnp.asarray(points.reshape((p * n,) + points.shape[2:]))))
  return out.reshape(p, n, -1)


def _real_values(program: Program, x: np.ndarray, spec: np.ndarray) -> list[np.ndarray]:
  """``[fn(x), C @ fn(x)]`` computed in float64 (the float32 weights' real-valued function)."""
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), program.params)
    y = np.asarray(apply(program.skeleton, params, jnp.asarray(x, jnp.float64)), np.float64)
  return [y, np.einsum("nsk,nk->ns", spec.astype(np.float64), y)]


def _compare(name, what, lower, upper, values, labels, tol_fn, allowance, box, program, tally,
             real: Callable[[int], np.ndarray]) -> list[Finding]:
  """Findings of bounds ``[N, S]`` against values ``[P, N, S]`` (float64).

  ``real(p)`` gives the float64 values ``[N, S]`` at point ``p``, to tell a violation by the
  float32 evaluation's rounding (the float64 value inside the bounds) from bounds that exclude
  the real-valued function too.
  """
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  # Where the function itself overflows in the box (a value at a point is infinite or NaN), a
  # NaN bound makes no claim: "verified" reads it as false. Elsewhere NaN is a finding.
  overflows = ~np.all(np.isfinite(values), axis=0)
  finite = np.all(np.isfinite(values), axis=(1, 2))
  index = np.flatnonzero(finite)
  values, labels = values[finite], [l for l, f in zip(labels, finite) if f]
  tally.point_checks += values.size
  out = []

  def finding(kind, violation, detail, real_violation=math.nan):
    out.append(
        Finding(program.description,
                name,
                box.kind,
                kind,
                float(violation),
                detail,
                real_violation=float(real_violation)))

  lower = np.where(np.isnan(lower) & overflows, -np.inf, lower)
  upper = np.where(np.isnan(upper) & overflows, np.inf, upper)
  nan = np.isnan(lower) | np.isnan(upper)
  if nan.any():
    n, s = np.argwhere(nan)[0]
    finding("nan", math.inf, f"{int(nan.sum())} NaN bounds of {what} (first at n={n}, {s})")
    return out
  order = lower > upper
  if order.any():
    gap = lower - upper
    n, s = np.unravel_index(np.argmax(gap), gap.shape)
    finding("order", gap[n, s], f"lower {lower[n, s]!r} > upper {upper[n, s]!r} for {what} "
            f"(n={n}, {s})")
  if not len(values):
    return out
  tol = np.asarray(tol_fn((lower, upper), values, allowance), np.float64)
  for kind, excess in (("lower", lower[None] - values - tol), ("upper",
                                                               values - upper[None] - tol)):
    if excess.max() > 0:
      p, n, s = np.unravel_index(np.argmax(excess), excess.shape)
      b = lower[n, s] if kind == "lower" else upper[n, s]
      v64 = float(real(int(index[p]))[n, s])
      real_excess = (b - v64) if kind == "lower" else (v64 - b)
      finding(
          kind, excess[p, n, s],
          f"{kind} bound {float(b)!r} of {what}[{n}, {s}] but the value at a {labels[p]} point "
          f"(#{index[p]}) is {float(values[p, n, s])!r} (tolerance {tol[n, s]:.3g}); in float64 "
          f"the value is {v64!r}, {'also outside' if real_excess > 0 else 'inside'} the bound",
          real_excess)
  return out


def check(program: Program,
          box: Box,
          methods: Sequence[str | tuple[str, BoundFn]] = METHODS,
          rng: np.random.Generator | None = None,
          *,
          tolerance_fn: Callable | None = None,
          tally: Tally | None = None,
          milp: bool = True) -> list[Finding]:
  """Checks each method's bounds of ``program`` over ``box`` against points of the box.

  Args:
    program: from `random_program` / `instantiate`.
    box: from `random_box`.
    methods: names in `METHODS`, or ``(name, bound)`` pairs with
      ``bound(fn, interval, spec_or_None) -> Interval`` (e.g. a deliberately
      unsound one, to test the fuzzer).
    rng: draws the specification and the points.
    tolerance_fn: ``(bounds, values, allowance) -> [N, S]``; `tolerance` by default.
    tally: counts to add to.
    milp: compare lower bounds with `verify.milp_minimum` on small ReLU networks
      (ordinary boxes only).

  Returns:
    The findings: for each method and output kind (the logits, the
    specification) the worst violation of each kind.
  """
  rng = rng or np.random.default_rng(0)
  tol_fn = tolerance_fn or tolerance
  tally = tally if tally is not None else Tally()
  spec = random_spec(program, rng)
  findings: list[Finding] = []
  results = {}
  keys = []
  for m in methods:
    name, bound = (m, None) if isinstance(m, str) else m
    if bound is None:
      _builtin(name, program.skeleton)  # an unknown name is the caller's error
    keys.append((name, bound))
  outcomes = _all_bounds(program.skeleton, tuple(keys),
                         (program.params, box.lower, box.upper, spec))
  for name, bound in keys:
    e = outcomes[name]
    if not isinstance(e, Exception):
      results[name] = e
      continue
    message = " ".join(f"{type(e).__name__}: {e}".split())[:400]
    expected = bound is not None or name in program.supports
    if isinstance(e, UnsupportedPrimitiveError) or (isinstance(e, InputError) and not expected):
      # A refusal: fine for a block marked as unsupported by the method.
      tally.unsupported[name] += 1
      if expected:
        findings.append(
            Finding(program.description, name, box.kind, "unsupported", math.nan,
                    f"rejected a program whose blocks are marked as supported: {message}"))
    else:
      findings.append(Finding(program.description, name, box.kind, "exception", math.nan, message))
  extra, exact = [], []
  if milp and program.relu_network and box.kind == "ordinary" and results:
    for n in range(program.input_shape[0]):
      try:
        bound, value, x = milp_minimum(program.fn,
                                       box.lower[n],
                                       box.upper[n],
                                       spec[n, 0],
                                       time_limit=20.0)
      except Exception as e:  # pylint: disable=broad-except
        message = " ".join(f"{type(e).__name__}: {e}".split())
        findings.append(
            Finding(program.description, "milp", box.kind, "exception", math.nan, message[:400]))
        break
      exact.append((n, bound, value))
      extra.append(
          np.where(
              np.arange(program.input_shape[0])[:, None] == n, x.reshape(1, -1),
              ((box.lower + box.upper) / 2).reshape(len(box.lower), -1)).reshape(box.lower.shape))
  allow_out, allow_spec = _allowances(program, box, spec)
  points, labels = _points(program, box, spec, rng, extra)
  out = _evaluate(program, points).astype(np.float64)  # [P, N, K]
  spec_values = np.einsum("nsk,pnk->pns", spec.astype(np.float64), out)
  real = functools.lru_cache(maxsize=None)(lambda p: _real_values(program, points[p], spec))
  for name, (lo, hi, slo, shi) in results.items():
    tally.checks += 1
    tally.checked.add(name)
    findings += _compare(name, "fn(x)", lo, hi, out, labels, tol_fn, allow_out, box, program, tally,
                         lambda p: real(p)[0])
    findings += _compare(name, "C @ fn(x)", slo, shi, spec_values, labels, tol_fn, allow_spec, box,
                         program, tally, lambda p: real(p)[1])
    for n, bound, value in exact:
      tally.milp += 1
      tol = np.asarray(
          tol_fn((slo[n:n + 1, :1], shi[n:n + 1, :1]), np.array([[[value]]]),
                 allow_spec[n:n + 1, :1]))[0, 0] + _SOLVER_TOLERANCE * (1 + abs(value))
      if slo[n, 0] > value + tol:
        findings.append(
            Finding(
                program.description, name, box.kind, "milp", float(slo[n, 0] - value - tol),
                f"lower bound {slo[n, 0]!r} of C[{n}, 0] @ fn(x) above the exact minimum "
                f"{value!r} (tolerance {tol:.3g})"))
  for n, bound, value in exact:  # the MILP's own proven bound against the points
    vals = spec_values[:, n, 0]
    tol = np.asarray(
        tol_fn((np.array([[bound]]), np.array([[bound]])), vals[:, None, None],
               allow_spec[n:n + 1, :1]))[0, 0] + _SOLVER_TOLERANCE * (1 + abs(bound))
    if bound > vals.min() + tol:
      findings.append(
          Finding(
              program.description, "milp", box.kind, "lower", float(bound - vals.min() - tol),
              f"proven minimum {bound!r} of C[{n}, 0] @ fn(x) above the value "
              f"{vals.min()!r} at a point (tolerance {tol:.3g})"))
  return findings


# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Report:
  """What `run` checked and found.

  Attributes:
    programs: programs checked.
    skeletons: distinct program structures among them.
    pairs: (program, method) pairs with bounds checked on at least one box.
    checks: (box, method) bound computations checked.
    point_checks: (point, example, output row) comparisons.
    unsupported: rejections with `verify.UnsupportedPrimitiveError`, by method.
    milp: comparisons with an exact minimum.
    findings: every `Finding`.
    seconds: wall time.
  """
  programs: int = 0
  skeletons: int = 0
  pairs: int = 0
  checks: int = 0
  point_checks: int = 0
  unsupported: dict = dataclasses.field(default_factory=dict)
  milp: int = 0
  findings: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def summary(self) -> str:
    unsupported = ", ".join(f"{m} {c}" for m, c in sorted(self.unsupported.items())) or "none"
    return (f"fuzz: {self.programs} programs ({self.skeletons} structures), {self.pairs} "
            f"(program, method) pairs, {self.checks} box checks, {self.point_checks} point checks, "
            f"{self.milp} exact-minimum comparisons, unsupported skips: {unsupported}; "
            f"{len(self.findings)} findings in {self.seconds:.1f} s")


def replay(seed: tuple[int, int, int, int],
           box_kind: str,
           methods: Sequence[str] = METHODS,
           families: Sequence[str] = FAMILIES) -> list[Finding]:
  """Re-runs a check of `run`: ``seed = (run seed, group, variant, box)`` and the box's kind."""
  program = program_at(tuple(seed[:3]), families)
  box = random_box(program, np.random.default_rng(list(seed)), box_kind)
  findings = check(program, box, methods, np.random.default_rng(list(seed) + [1]))
  return [dataclasses.replace(f, seed=tuple(seed), families=tuple(families)) for f in findings]


def run(seconds: float | None = None,
        programs: int | None = None,
        seed: int = 0,
        methods: Sequence[str] = METHODS,
        families: Sequence[str] = FAMILIES,
        variants: int = 8,
        boxes: int = 4,
        box_kinds: Sequence[str] = BOX_KINDS,
        milp: bool = True,
        tolerance_fn: Callable | None = None,
        log_every: float = 10.0) -> Report:
  """Checks random programs until ``seconds`` or ``programs`` is reached (whichever first).

  Args:
    seconds: time budget (None: no limit).
    programs: program budget (None: no limit; one of the two is needed).
    seed: the run's seed; program ``(seed, group, variant)`` and its boxes are
      reproducible one by one (`replay`).
    methods: the methods to check (see `METHODS`).
    families: block families the programs are drawn from (see `FAMILIES`).
    variants: programs (weights) per structure; they share compilations.
    boxes: boxes per program.
    box_kinds: the kinds of the boxes, in turn over the programs' boxes (see `BOX_KINDS`).
    milp: compare with `verify.milp_minimum` on small ReLU networks.
    tolerance_fn: as in `check`.
    log_every: seconds between progress lines.

  Returns:
    `Report`.
  """
  if seconds is None and programs is None:
    raise InputError("run needs seconds or programs")
  if variants < 1 or boxes < 1:
    raise InputError(f"variants and boxes must be >= 1, got {variants} and {boxes}")
  if not methods or set(methods) - set(METHODS):
    raise InputError(f"methods must be a non-empty subset of {METHODS}, got {tuple(methods)}")
  random_skeleton(np.random.default_rng(0), families)  # checks the families
  bad = set(box_kinds) - set(BOX_KINDS)
  if not box_kinds or bad:
    raise InputError(f"box kinds must be a non-empty subset of {BOX_KINDS}, got {box_kinds}")
  families = tuple(families)
  start = time.time()
  report = Report()
  tally = Tally()
  last_log = start
  group = 0

  def done():
    return ((programs is not None and report.programs >= programs) or
            (seconds is not None and time.time() - start >= seconds))

  while not done():
    skeleton = random_skeleton(np.random.default_rng([seed, group]), families)
    report.skeletons += 1
    for variant in range(variants):
      if done():
        break
      program = instantiate(skeleton, np.random.default_rng([seed, group, variant]),
                            (seed, group, variant))
      tally.checked = set()
      for b in range(boxes):
        box_seed = (seed, group, variant, b)
        kind = box_kinds[(variant * boxes + b) % len(box_kinds)]
        box = random_box(program, np.random.default_rng(list(box_seed)), kind)
        found = check(program,
                      box,
                      methods,
                      np.random.default_rng(list(box_seed) + [1]),
                      tolerance_fn=tolerance_fn,
                      tally=tally,
                      milp=milp)
        report.findings += [dataclasses.replace(f, seed=box_seed, families=families) for f in found]
      report.programs += 1
      report.pairs += len(tally.checked)
      now = time.time()
      if now - last_log >= log_every:
        last_log = now
        logging.info("%s", _progress(report, now - start, seconds, programs))
    forget()
    group += 1
  report.checks, report.point_checks, report.milp = tally.checks, tally.point_checks, tally.milp
  report.unsupported = dict(tally.unsupported)
  report.seconds = time.time() - start
  return report


def _progress(report: Report, elapsed: float, seconds, programs) -> str:
  rate = report.programs / max(elapsed, 1e-9)
  etas = []
  if seconds is not None:
    etas.append(max(seconds - elapsed, 0.0))
  if programs is not None:
    etas.append((programs - report.programs) / max(rate, 1e-9))
  return (f"fuzz: {report.programs} programs ({rate:.2f}/s), {report.pairs} pairs, "
          f"{len(report.findings)} findings, {elapsed:.0f} s elapsed, ETA {min(etas):.0f} s")


# ---------------------------------------------------------------------------- the script

# Defined when run as a script only: importing the module leaves absl's flags alone.
_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  _FLAGS["minutes"] = flags.DEFINE_float("minutes", 10.0, "Time budget in minutes (0: no limit).")
  _FLAGS["programs"] = flags.DEFINE_integer("programs", 0, "Program budget (0: no limit).")
  _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "The run's seed.")
  _FLAGS["methods"] = flags.DEFINE_list("methods", list(METHODS),
                                        f"Methods to check: {', '.join(METHODS)}.")
  _FLAGS["families"] = flags.DEFINE_list("families", list(FAMILIES),
                                         f"Block families to draw from: {', '.join(FAMILIES)}.")
  _FLAGS["variants"] = flags.DEFINE_integer("variants", 8,
                                            "Programs (weights) per program structure.")
  _FLAGS["boxes"] = flags.DEFINE_integer("boxes", 4, "Boxes per program.")
  _FLAGS["box_kinds"] = flags.DEFINE_list("box_kinds", list(BOX_KINDS),
                                          f"Kinds of boxes, in turn: {', '.join(BOX_KINDS)}.")
  _FLAGS["milp"] = flags.DEFINE_boolean("milp", True,
                                        "Compare small ReLU networks with exact minima.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=2)
  v = {name: holder.value for name, holder in _FLAGS.items()}
  if v["minutes"] < 0 or v["programs"] < 0 or (v["minutes"] == 0 and v["programs"] == 0):
    raise app.UsageError("--minutes and --programs must be >= 0 and not both 0", exitcode=2)
  logging.set_verbosity(logging.INFO)
  try:
    report = run(seconds=v["minutes"] * 60 or None,
                 programs=v["programs"] or None,
                 seed=v["seed"],
                 methods=tuple(v["methods"]),
                 families=tuple(v["families"]),
                 variants=v["variants"],
                 boxes=v["boxes"],
                 box_kinds=tuple(v["box_kinds"]),
                 milp=v["milp"])
  except InputError as e:
    raise app.UsageError(str(e), exitcode=2) from None
  for f in report.findings:
    print(f"FINDING {f}")
  print(report.summary())
  sys.stdout.flush()
  return 1 if report.findings else 0


def cli() -> None:
  """``python -m verify.fuzz``: defines the flags and runs `main` (exits with its status)."""
  _define_flags()
  scripts.run(main)


if __name__ == "__main__":
  cli()

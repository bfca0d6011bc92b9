"""Deciding verification instances: a network, a VNNLIB property and a time limit.

An instance is ``sat`` when some input of the property's box maps into its
unsafe set (VNN-COMP's definition; the answer comes with that counterexample),
``unsat`` when none does, else ``unknown`` or ``timeout``. The script
``python -m verify.vnncomp`` runs single instances and whole benchmarks
(``instances.csv`` rows ``onnx,vnnlib,timeout``; ``.gz`` files are read as they
are) and writes the competition's results CSV
(``benchmark,onnx,vnnlib,prepare_time,result,run_time``, then ``complete,reason``:
the complete search chosen and why).

The strategy, in order of cost, until the instance is decided or time is up:

1. falsify: projected gradient descent towards every unsafe polytope from the
   box's centre and random points (`verify.falsification`);
2. bounds on the whole box: IBP, then CROWN, then alpha-CROWN;
3. complete search, chosen by `choose_complete` unless asked for: branch and
   bound on the input box (`verify.bab`) for inputs of at most
   ``INPUT_SPLIT_MAX_DIMS`` dimensions, else one mixed-integer program per unsafe
   set (`verify.milp`) for a tiny ReLU network (at most ``MILP_MAX_UNSTABLE``
   unstable ReLUs), else branch and bound on ReLU splits bounded by β-CROWN
   (`verify.relu_bab`). The choice and its reason are logged and kept in the
   `Decision` and the results CSV.

A counterexample is reported only after it is confirmed: inside the box, and
mapped into the unsafe set by the network (by the JAX function and, when
onnxruntime is installed, by onnxruntime too). Bounds are computed in float32
on a box rounded outward to float32, or with ``precision="float64"`` in float64
(what an ``unsat`` then holds for: the float64 evaluation of the weights).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import logging
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib import onnx as ronnx
from robustlib.checks import InputError
from verify import vnnlib
from verify.bab import bound_safety
from verify.bab import branch_and_bound
from verify.falsification import falsify
from verify.interval import precision_dtype
from verify.interval import round_inward
from verify.interval import round_outward
from verify.primitives import UnsupportedPrimitiveError
from verify import relu_bab
from verify.milp import encode
from verify.milp import milp_verify
from verify.unsafe import UnsafeSet

RESULTS = ("sat", "unsat", "unknown", "timeout", "error")
_bound_safety = compilation.jit(bound_safety, static_argnames=("fn", "method"))
BOUND_METHODS = ("ibp", "crown", "alpha_crown")
COMPLETE = ("auto", "input", "relu", "milp")
INPUT_SPLIT_MAX_DIMS = 20
MILP_MAX_UNSTABLE = 24


@dataclasses.dataclass(frozen=True)
class Decision:
  """The answer for one instance.

  Attributes:
    result: one of `RESULTS`.
    stage: what decided it (``"vnnlib"`` when the property cannot hold at
      all, ``"falsify"``, ``"ibp"``, ``"crown"``, ``"alpha_crown"``, ``"bab"``)
      or where it stopped undecided.
    seconds: wall time of `decide`.
    x: the counterexample's flattened input ``[num_inputs]`` (``sat`` only).
    y: the network's flattened output on it ``[num_outputs]``.
    complete: the complete search chosen (one of `COMPLETE` but ``"auto"``), and
    reason: why; empty when the instance was decided before it.
  """
  result: str
  stage: str
  seconds: float
  x: np.ndarray | None = None
  y: np.ndarray | None = None
  complete: str = ""
  reason: str = ""

  def text(self) -> str:
    """The competition's result file: the result, and for ``sat`` the assignment."""
    if self.result != "sat":
      return self.result + "\n"
    values = [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.x)]
    values += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(self.y)]
    return "sat\n(" + "\n ".join(values) + ")\n"


def _flat(fn: Callable, input_shape: Sequence[int]) -> Callable:
  """``[N, num_inputs] -> [N, num_outputs]``."""

  def flat_fn(x):
    y = fn(x.reshape((x.shape[0],) + tuple(input_shape)))
    return y.reshape(y.shape[0], -1)

  return flat_fn


def decide(fn: Callable[[jax.Array], jax.Array],
           input_shape: Sequence[int],
           spec: vnnlib.Vnnlib,
           timeout: float,
           *,
           reference: Callable[[np.ndarray], np.ndarray] | None = None,
           seed: int = 0,
           falsify_steps: int = 100,
           falsify_restarts: int = 4,
           bab_method: str = "crown",
           batch_size: int | None = None,
           complete: str = "auto",
           branching: str = "babsr",
           precision: str = "float32") -> Decision:
  """Decides whether some input of ``spec``'s boxes maps into its unsafe set.

  Args:
    fn: the network, ``[N, *input_shape] -> [N, ...]`` (outputs flattened to
      ``[N, num_outputs]`` in C order).
    input_shape: one input's shape; ``prod(input_shape) == spec.num_inputs``.
    spec: the property (a disjunction of input boxes with unsafe sets).
    timeout: seconds.
    reference: optional second implementation ``x [num_inputs] -> y
      [num_outputs]`` (e.g. onnxruntime) that must also confirm a
      counterexample.
    seed: PRNG seed of the falsifier.
    falsify_steps: descent steps per falsification run.
    falsify_restarts: runs per unsafe polytope.
    bab_method: bound method of branch and bound.
    batch_size: boxes (or ReLU subdomains) bounded at once by branch and bound; None: its
      default (`verify.branch_and_bound`).
    complete: the last stage, one of `COMPLETE`: ``"auto"`` (`choose_complete`),
      ``"input"`` (branch and bound on the input box), ``"relu"`` (on ReLU
      splits, `verify.relu_bab`) or ``"milp"`` (`verify.milp_verify`).
    branching: ``"babsr"`` or ``"fsb"``, for ReLU splits.
    precision: the bound passes' dtype and the evaluation an ``unsat`` holds for:
      ``"float32"`` (the network as a user runs it) or ``"float64"`` (the same weights
      evaluated in float64: the real-valued network up to some 1e-12, VNN-COMP's
      semantics; needs JAX's 64-bit mode, `verify.interval.precision_dtype`). A ``sat``
      is confirmed by that evaluation too.

  Returns:
    A `Decision`.
  """
  if complete not in COMPLETE:
    raise InputError(f"complete must be one of {COMPLETE}, got {complete!r}")
  check_timeout(timeout)
  dtype = precision_dtype(precision)
  start = time.monotonic()
  deadline = start + timeout
  if int(np.prod(input_shape)) != spec.num_inputs:
    raise InputError(f"the property has {spec.num_inputs} inputs but the network takes "
                     f"{tuple(input_shape)} = {int(np.prod(input_shape))}")
  flat_fn = _flat(fn, input_shape)
  out = jax.eval_shape(flat_fn, jax.ShapeDtypeStruct((1, spec.num_inputs), jnp.float32))
  if out.shape[1] != spec.num_outputs:
    raise InputError(f"the property has {spec.num_outputs} outputs but the network gives "
                     f"{out.shape[1]}")
  done = lambda result, stage, x=None, y=None: Decision(result, stage,
                                                        time.monotonic() - start, x, y)
  props = [(p, *round_outward(p.lower, p.upper, dtype),
            UnsafeSet.of([(q.C, q.d)
                          for q in p.unsafe], spec.num_outputs, dtype))
           for p in spec.properties
           if p.unsafe]
  if not props:  # the asserts cannot all hold: no box, or nothing unsafe in any
    return done("unsat", "vnnlib")

  def confirm(prop, x):
    """``(x, y)`` when ``x``, moved inside the property's box, is a counterexample."""
    # Bounds use the box rounded outward to float32; candidates go back inside it.
    x = np.clip(np.asarray(x, np.float32), *round_inward(prop.lower, prop.upper))
    if not prop.contains(x.astype(np.float64)):
      return None
    y = np.asarray(flat_fn(jnp.asarray(x, dtype)[None]))[0]
    if not prop.violated(y.astype(np.float64)):
      return None
    if reference is not None and not prop.violated(np.asarray(reference(x), np.float64)):
      return None
    return x, y

  # 1. Falsification.
  key = jax.random.key(seed)
  for prop, lo, hi, unsafe in props:
    if time.monotonic() > deadline:
      return done("timeout", "falsify")
    key, sub = jax.random.split(key)
    x, safety = falsify(flat_fn,
                        *map(jnp.asarray, round_inward(prop.lower, prop.upper)),
                        unsafe,
                        sub,
                        steps=falsify_steps,
                        restarts=falsify_restarts)
    found = confirm(prop, x) if float(safety) <= 0 else None
    if found is not None:
      return done("sat", "falsify", *found)

  # 2. Bounds on each whole box, cheapest first.
  open_props, method = [], BOUND_METHODS[0]
  for prop, lo, hi, unsafe in props:
    proven = False
    for method in BOUND_METHODS:
      if time.monotonic() > deadline:
        return done("timeout", method)
      try:
        proven = float(_bound_safety(flat_fn, lo[None], hi[None], unsafe, method)[0]) > 0
      except UnsupportedPrimitiveError as e:
        logging.warning("bounds unavailable: %s", e)
        return done("unknown", "unsupported")
      if proven:
        break
    if not proven:
      open_props.append((prop, lo, hi, unsafe))
  if not open_props:
    return done("unsat", method)

  reason = "asked for"
  if complete == "auto":
    complete, reason = choose_complete(flat_fn, spec.num_inputs, *open_props[0][1:3])
  logging.info("complete search: %s (%s)", complete, reason)
  done = lambda result, stage, x=None, y=None: Decision(
      result, stage, time.monotonic() - start, x, y, complete=complete, reason=reason)
  if complete == "milp":
    return _decide_by_milp(flat_fn, open_props, confirm, deadline, done, precision)
  stage = "bab" if complete == "input" else "relu_bab"

  # 3. Branch and bound on what is left.
  status = []
  for prop, lo, hi, unsafe in open_props:
    found = []

    def check(x, prop=prop, found=found):
      found.append(confirm(prop, x))
      return found[-1] is not None

    result = branch_and_bound(flat_fn,
                              lo,
                              hi,
                              unsafe,
                              deadline=deadline,
                              confirm=check,
                              method=bab_method,
                              batch_size=batch_size,
                              split=complete,
                              branching=branching,
                              precision=precision)
    if result.status == "falsified":
      return done("sat", stage, *found[-1])
    status.append(result.status)
  if all(s == "verified" for s in status):
    return done("unsat", stage)
  return done("timeout" if "timeout" in status else "unknown", stage)


def choose_complete(flat_fn: Callable, num_inputs: int, lower: np.ndarray,
                    upper: np.ndarray) -> tuple[str, str]:
  """The complete search for a network and one of its boxes, and why: input splitting
  for few input dimensions, the MILP for a tiny ReLU network, ReLU splitting otherwise."""
  if num_inputs <= INPUT_SPLIT_MAX_DIMS:
    return "input", f"{num_inputs} input dimensions (at most {INPUT_SPLIT_MAX_DIMS})"
  try:
    unstable = relu_bab.count_unstable(flat_fn, lower, upper)
  except (UnsupportedPrimitiveError, InputError) as e:
    return "input", f"no ReLU splits: {e}"
  if unstable == 0:
    return "input", "no unstable ReLU to split"
  if unstable <= MILP_MAX_UNSTABLE:
    try:
      encode(flat_fn, lower, upper)
      return "milp", f"{unstable} unstable ReLUs (at most {MILP_MAX_UNSTABLE}): a tiny MILP"
    except (UnsupportedPrimitiveError, InputError):
      pass
  return "relu", f"{num_inputs} input dimensions, {unstable} unstable ReLUs"


def _decide_by_milp(flat_fn, open_props, confirm, deadline, done, precision) -> Decision:
  """Stage 3 with `verify.milp_verify`: one program per open unsafe set."""
  status = []
  for prop, lo, hi, unsafe in open_props:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return done("timeout", "milp")
    try:
      result = milp_verify(flat_fn, lo, hi, unsafe, time_limit=remaining, precision=precision)
    except UnsupportedPrimitiveError as e:
      logging.warning("no exact encoding: %s", e)
      return done("unknown", "unsupported")
    if result.status == "falsified":
      found = confirm(prop, result.counterexample)
      if found is not None:
        return done("sat", "milp", *found)
      status.append("unknown")
    else:
      status.append(result.status)
  if all(s == "verified" for s in status):
    return done("unsat", "milp")
  return done("timeout" if time.monotonic() >= deadline else "unknown", "milp")


# ----------------------------------------------------------------------------------------------
# Files: instances and benchmarks.


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"no such file: {path}")
  data = path.read_bytes()
  return gzip.decompress(data) if path.suffix == ".gz" else data


def _onnxruntime_reference(model_bytes: bytes, model: ronnx.OnnxModel):
  """``x [num_inputs] -> y [num_outputs]`` by onnxruntime, or None when it is not installed."""
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
  declared = session.get_inputs()[0].shape
  shape = [1 if not isinstance(s, int) else s for s in declared]
  if int(np.prod(shape)) != int(np.prod(model.input_shape)):
    shape = [1] + list(model.input_shape)

  def run(x):
    feed = {model.input_name: np.asarray(x, np.float32).reshape(shape)}
    return np.asarray(session.run([model.output_name], feed)[0]).reshape(-1)

  return run


def check_timeout(timeout: float, where: str = "timeout") -> float:
  """``timeout`` as seconds, refused unless a finite number > 0."""
  if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.floating, np.integer)) \
      or not 0 < float(timeout) < float("inf"):
    raise InputError(f"{where} must be a number of seconds > 0, got {timeout!r}")
  return float(timeout)


def run_instance(onnx_path: str | os.PathLike, vnnlib_path: str | os.PathLike, timeout: float,
                 **options) -> tuple[Decision, float]:
  """Loads and decides one instance; returns the decision and the preparation time (s).

  With ``precision="float64"`` the network computes in float64 (`robustlib.onnx.load`).
  """
  check_timeout(timeout)
  start = time.monotonic()
  model_bytes = _read_bytes(onnx_path)
  dtype = precision_dtype(options.get("precision", "float32"))
  model = ronnx.load(model_bytes, dtype if dtype != np.float32 else None)
  spec = vnnlib.parse(_read_bytes(vnnlib_path).decode(),
                      num_inputs=int(np.prod(model.input_shape)),
                      num_outputs=int(np.prod(model.output_shape)),
                      source=str(vnnlib_path))
  reference = _onnxruntime_reference(model_bytes, model)
  prepare = time.monotonic() - start
  return decide(model.fn, model.input_shape, spec, timeout, reference=reference, **options), prepare


def read_instances(path: str | os.PathLike,
                   root: str | os.PathLike | None = None) -> list[tuple[str, str, float]]:
  """Rows ``(onnx, vnnlib, timeout)`` of a benchmark's ``instances.csv``, paths under ``root``."""
  path = pathlib.Path(path)
  root = pathlib.Path(root) if root else path.parent
  rows = []
  with open(path, newline="") as f:
    for i, row in enumerate(csv.reader(f), 1):
      if not row or not "".join(row).strip():
        continue
      if len(row) != 3:
        raise InputError(f"{path}:{i}: expected 'onnx,vnnlib,timeout', got {row}")
      try:
        timeout = float(row[2])
      except ValueError:
        raise InputError(f"{path}:{i}: timeout {row[2]!r} is not a number") from None
      check_timeout(timeout, f"{path}:{i}: the timeout")
      rows.append((str(root / row[0].strip()), str(root / row[1].strip()), timeout))
  if not rows:
    raise InputError(f"{path} lists no instances")
  return rows


def run_benchmark(instances: Sequence[tuple[str, str, float]],
                  out: str | os.PathLike | None = None,
                  benchmark: str = "benchmark",
                  **options) -> list[dict]:
  """Decides every instance; writes the results CSV to ``out`` as rows finish."""
  rows, start = [], time.monotonic()
  writer = None
  f = open(out, "w", newline="") if out else None  # pylint: disable=consider-using-with
  try:
    for i, (onnx_path, vnnlib_path, timeout) in enumerate(instances):
      try:
        decision, prepare = run_instance(onnx_path, vnnlib_path, timeout, **options)
      except InputError as e:  # an unreadable or unsupported instance: the rest still run
        logging.error("%s %s: %s", onnx_path, vnnlib_path, e)
        decision, prepare = Decision("error", type(e).__name__, 0.0), 0.0
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("%s %s failed", onnx_path, vnnlib_path)
        decision, prepare = Decision("error", type(e).__name__, 0.0), 0.0
      row = dict(benchmark=benchmark,
                 onnx=onnx_path,
                 vnnlib=vnnlib_path,
                 prepare_time=round(prepare, 3),
                 result=decision.result,
                 run_time=round(decision.seconds, 3),
                 complete=decision.complete,
                 reason=decision.reason,
                 stage=decision.stage)
      rows.append(row)
      if f is not None:
        if writer is None:
          writer = csv.DictWriter(f, fieldnames=list(row)[:-1], extrasaction="ignore")
        writer.writerow(row)
        f.flush()
      elapsed = time.monotonic() - start
      logging.info("[%d/%d] %s %s: %s (%s) in %.1f s | ETA %.0f s", i + 1, len(instances),
                   pathlib.Path(onnx_path).name,
                   pathlib.Path(vnnlib_path).name, decision.result, decision.stage,
                   decision.seconds, elapsed / (i + 1) * (len(instances) - i - 1))
  finally:
    if f is not None:
      f.close()
  return rows


def summary(rows: Sequence[dict]) -> str:
  """A table of the instances and the counts of each result."""
  lines = [f"{'onnx':<28} {'vnnlib':<28} {'result':<8} {'stage':<12} {'time (s)':>8}"]
  for r in rows:
    lines.append(f"{pathlib.Path(r['onnx']).name[:28]:<28} "
                 f"{pathlib.Path(r['vnnlib']).name[:28]:<28} {r['result']:<8} "
                 f"{r['stage'][:12]:<12} {r['run_time']:>8.2f}")
  counts = {k: sum(r["result"] == k for r in rows) for k in RESULTS}
  lines.append("  ".join(f"{k} {v}" for k, v in counts.items() if v or k != "error") +
               f"  | total time {sum(r['run_time'] for r in rows):.1f} s")
  return "\n".join(lines)

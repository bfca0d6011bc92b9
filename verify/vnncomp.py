"""Decides VNN-COMP instances: ``python -m verify.vnncomp``.

One instance (the result file's text is printed and, with ``--out``, written)::

  python -m verify.vnncomp --onnx=NET.onnx --vnnlib=PROP.vnnlib --timeout=60 --out=result.txt

A benchmark: every row ``onnx,vnnlib,timeout`` of ``instances.csv`` (paths
relative to ``--root``, by default the file's folder), a summary table, and the
competition's results CSV (``--out``, default ``results.csv``)::

  python -m verify.vnncomp --instances=DIR/instances.csv

Needs the ``onnx`` extra (``pip install robustlib[onnx]``). The strategy is
`verify.instances.decide`'s: falsification, IBP, CROWN, alpha-CROWN, then the
complete search it chooses (``--complete``) until the timeout; the bounds in
float32, or in float64 with ``--precision=float64``.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

import jax

from robustlib import scripts
from robustlib.checks import InputError
from verify import instances as lib
from verify.interval import PRECISIONS

_ONNX = flags.DEFINE_string("onnx", None, "The network (.onnx or .onnx.gz).")
_VNNLIB = flags.DEFINE_string("vnnlib", None, "The property (.vnnlib or .vnnlib.gz).")
_TIMEOUT = flags.DEFINE_float("timeout", 60.0, "Seconds for one instance.")
_OUT = flags.DEFINE_string(
    "out", None, "Result file (one instance) or results CSV (a benchmark; "
    "default results.csv).")
_INSTANCES = flags.DEFINE_string("instances", None,
                                 "A benchmark's instances.csv: rows onnx,vnnlib,timeout.")
_ROOT = flags.DEFINE_string("root", None, "Folder the instances' paths are relative to "
                            "(default: the csv's).")
_BENCHMARK = flags.DEFINE_string("benchmark", None,
                                 "Benchmark name in the results CSV (default: the root's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the falsifier's random starts.")
_BAB_METHOD = flags.DEFINE_enum("bab_method", "crown", ["ibp", "crown_ibp", "crown", "alpha_crown"],
                                "Bounds used by branch and bound.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Boxes (or ReLU subdomains) bounded at once by branch and bound; "
    "default: 256 boxes, ReLU subdomains by backend.")
_COMPLETE = flags.DEFINE_enum(
    "complete", "auto", ["auto", "input", "relu", "milp"],
    "The complete search: chosen per instance (auto: input splitting for few input dimensions, "
    "the MILP for tiny ReLU networks, else ReLU splitting), branch and bound on the input box, "
    "on ReLU splits (beta-CROWN), or a mixed-integer program.")
_BRANCHING = flags.DEFINE_enum("branching", "babsr", ["babsr", "fsb"],
                               "How ReLU-split branch and bound picks its neuron.")
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", list(PRECISIONS),
    "Bound passes' dtype, and what unsat holds for: the network evaluated in float32, or in "
    "float64 (the real-valued network up to ~1e-12, VNN-COMP's semantics; turns on JAX's "
    "64-bit mode).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  scripts.setup_logging()
  if _PRECISION.value == "float64":
    jax.config.update("jax_enable_x64", True)
  options = dict(precision=_PRECISION.value,
                 seed=_SEED.value,
                 bab_method=_BAB_METHOD.value,
                 batch_size=_BATCH_SIZE.value,
                 complete=_COMPLETE.value,
                 branching=_BRANCHING.value)
  try:
    if _INSTANCES.value:
      instances = lib.read_instances(_INSTANCES.value, _ROOT.value)
      root = _ROOT.value or pathlib.Path(_INSTANCES.value).parent
      rows = lib.run_benchmark(instances, _OUT.value or "results.csv", _BENCHMARK.value or
                               pathlib.Path(root).resolve().name, **options)
      print(lib.summary(rows))
      return
    if not (_ONNX.value and _VNNLIB.value):
      raise app.UsageError("pass --onnx and --vnnlib, or --instances")
    decision, prepare = lib.run_instance(_ONNX.value, _VNNLIB.value, _TIMEOUT.value, **options)
  except (InputError, ImportError, OSError) as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  text = decision.text()
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(text)
  print(text, end="")
  print(
      f"# {decision.result} by {decision.stage}: prepare {prepare:.2f} s, run "
      f"{decision.seconds:.2f} s",
      file=sys.stderr)


if __name__ == "__main__":
  scripts.run(main)

"""Complete verification families: input-split BaB, ReLU-split BaB and MILP side by side.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.bab_families --out_dir=DIR

Builds (once, kept in ``DIR``) MNIST networks of `benchmarks.nets` trained
normally and with PGD (``mlp`` 2x256, ``mlp_4x256``, ``mlp_6x256``,
``cnn_small``), exported to ONNX, and L-inf robustness properties (VNNLIB) of
their first correctly classified test points at two radii per training: one
family per network and training, each with its own ``instances.csv`` and the
competition's time limit (120 s for 2x256, 300 s for deeper networks). The
ground truth of each instance is the MILP's answer under ``--truth_limit``
seconds (kept in ``DIR/truth.csv``; none where it does not finish). Then each
method decides every instance with `verify.instances.decide` (falsification
and whole-box bounds first, the same for all; only the complete search
differs) and a table gives, per family and method, the instances decided,
those decided wrongly (against the ground truth: must be 0), those with known
ground truth decided, and the median time. Every stage resumes from the files
it wrote, so a killed run continues where it stopped. Bounds, the ground truth
included, are in ``--precision`` (float64 by default: the real-valued network,
as VNN-COMP decides it; `verify.interval.precision_dtype`).

``--stages=calibrate --calibrate_radii=...`` builds the networks and prints
alpha-CROWN's root bounds of the points at each radius, to choose a family's radii.
"""

from __future__ import annotations

import csv
import logging
import os
import pathlib
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import nets
from robustlib import onnx
from robustlib import scripts
from verify import instances
from verify.certification import margin_bounds
from verify.interval import PRECISIONS
from verify.interval import precision_dtype

# name: (network, adversarial training eps, PGD steps, radii, time limit in seconds).
FAMILIES = {
    "mlp2x256": ("mlp", 0.0, 0, (0.02, 0.035), 120.0),
    "mlp2x256_pgd": ("mlp", 0.1, 10, (0.05, 0.1), 120.0),
    # alpha-CROWN's root bound over six points, float64: from +13..+2 at 0.005 to -75..+7 at
    # 0.015, where no method decides in 300 s; these radii sit between.
    "mlp4x256": ("mlp_4x256", 0.0, 0, (0.0075, 0.01), 300.0),
    # Root bounds +6..-14 at 0.04 and +0.3..-139 at 0.06 (float64, six points).
    "mlp4x256_pgd": ("mlp_4x256", 0.1, 10, (0.045, 0.055), 300.0),
    # Root bounds (--stages=calibrate, float64, six points) +2.7..+10.8 at 0.002, +0.6..+9.9
    # at 0.006, -34..+9 at 0.008 and -233..+6.5 at 0.01.
    "mlp6x256": ("mlp_6x256", 0.0, 0, (0.007, 0.008), 300.0),
    # +3.6..+7.7 at 0.02, -30..+6.7 at 0.03 (one point below 0), -423..+4.7 at 0.04.
    "mlp6x256_pgd": ("mlp_6x256", 0.1, 10, (0.03, 0.035), 300.0),
    "cnn_small": ("cnn_small", 0.0, 0, (0.02, 0.05), 300.0),
    "cnn_small_pgd": ("cnn_small", 0.1, 10, (0.05, 0.1), 300.0),
}
METHODS = ("input", "relu", "milp")

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where networks, instances and results go.")
_FAMILIES = scripts.define_names("families", list(FAMILIES), FAMILIES, "Families to run.")
_METHODS = scripts.define_names("methods", list(METHODS), METHODS, "Complete searches to compare.")
_POINTS = flags.DEFINE_integer("points", 5, "Test points per family and radius.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3000, "Training steps per network.")
_TRUTH_LIMIT = flags.DEFINE_float("truth_limit", 900.0, "MILP seconds for the ground truth.")
_TIME_SCALE = flags.DEFINE_float("time_scale", 1.0, "Multiplies every family's time limit.")
_STAGES = scripts.define_names(
    "stages", ["build", "truth", "compare"], ["build", "calibrate", "truth", "compare"],
    "What to run (calibrate: alpha-CROWN's root bounds of the points at --calibrate_radii, to "
    "choose a family's radii; it runs alone).")
_CALIBRATE_RADII = flags.DEFINE_list("calibrate_radii", ["0.005", "0.01", "0.02", "0.05", "0.1"],
                                     "L-inf radii of the calibrate stage.")
_PRECISION = flags.DEFINE_enum(
    "precision", "float64", list(PRECISIONS),
    "Bound passes' dtype for every method and the ground truth: float64 decides the "
    "real-valued network as the MILP does (float32's rounding allowance is above the margins "
    "of deep MLPs at their radii).")

_LOG = logging.getLogger(__name__)


def build(out_dir: pathlib.Path, family: str, points: int, train_steps: int) -> pathlib.Path:
  """The family's folder: ``net.onnx``, one VNNLIB per (point, radius), ``instances.csv``.

  A ``net.onnx`` already there is kept (delete ``instances.csv`` to rebuild the
  properties at new radii without training again).
  """
  net, adv_eps, pgd_steps, radii, limit = FAMILIES[family]
  folder = out_dir / family
  if (folder / "instances.csv").exists():
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  if not (folder / "net.onnx").exists():
    params = nets.train(net, train_steps, adversarial_eps=adv_eps, pgd_steps=pgd_steps)
    (folder / "net.onnx.tmp").write_bytes(nets.to_onnx(net, params))
    os.replace(folder / "net.onnx.tmp", folder / "net.onnx")
  fn = onnx.load(folder / "net.onnx").fn
  x, y = nets.mnist_nchw("test", 200)
  correct = np.flatnonzero(np.asarray(fn(x)).argmax(axis=1) == y)[:points]
  rows = []
  for i in correct:
    for eps in radii:
      name = f"point{i}_eps{eps:g}.vnnlib"
      (folder / name).write_text(robustness_vnnlib(x[i].reshape(-1), eps, int(y[i]), 10))
      rows.append(f"net.onnx,{name},{limit:g}\n")
  (folder / "instances.csv.tmp").write_text("".join(rows))
  os.replace(folder / "instances.csv.tmp", folder / "instances.csv")
  return folder


def calibrate(folder: pathlib.Path, points: int, radii: list[float], precision: str) -> str:
  """alpha-CROWN's root bound (the least margin row) of the family's points at each radius.

  A family's radii sit where these bounds cross 0 (some points positive, some not, none far
  below): the instances the complete searches can decide in their time limits.
  """
  fn = onnx.load(folder / "net.onnx").fn
  x, y = nets.mnist_nchw("test", 200)
  correct = np.flatnonzero(np.asarray(fn(x)).argmax(axis=1) == y)[:points]
  x = np.asarray(x[correct], precision_dtype(precision))
  lines = [f"{'radius':>8} " + " ".join(f"{f'point{i}':>9}" for i in correct)]
  for eps in radii:
    start = time.monotonic()
    margins = np.asarray(margin_bounds(fn, x, y[correct], eps, method="alpha_crown"))
    lines.append(f"{eps:>8g} " + " ".join(f"{m:>9.3f}" for m in margins.min(axis=1)) +
                 f"   ({time.monotonic() - start:.1f} s)")
  return "\n".join(lines)


def robustness_vnnlib(x: np.ndarray, eps: float, label: int, num_classes: int) -> str:
  """The L-inf ball of ``x`` in [0, 1]; unsafe where another class scores at least ``label``."""
  lo, hi = np.clip(x - eps, 0.0, 1.0), np.clip(x + eps, 0.0, 1.0)
  lines = [f"(declare-const X_{i} Real)" for i in range(x.size)]
  lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
  for i, (a, b) in enumerate(zip(lo, hi)):
    lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]
  others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label)
  return "\n".join(lines) + f"\n(assert (or {others}))\n"


def _read(path: pathlib.Path, precision: str) -> dict[tuple[str, str], dict]:
  """The rows of ``path`` decided in ``precision``, by (family, vnnlib)."""
  if not path.exists():
    return {}
  with open(path, newline="") as f:
    return {
        (r["family"], r["vnnlib"]): r
        for r in csv.DictReader(f)
        if r.get("precision", "float32") == precision
    }


def _append(path: pathlib.Path, row: dict) -> None:
  new = not path.exists()
  with open(path, "a", newline="") as f:
    if not new:
      with open(path, newline="") as g:
        if next(csv.reader(g)) != list(row):
          raise app.UsageError(f"{path} has other columns than {list(row)}: use another --out_dir")
    writer = csv.DictWriter(f, fieldnames=list(row))
    if new:
      writer.writeheader()
    writer.writerow(row)


def decide_all(folder: pathlib.Path, family: str, complete: str, limit: float, out: pathlib.Path,
               precision: str) -> None:
  """Each instance of the family decided with ``complete`` under ``limit`` s (resumable)."""
  done = _read(out, precision)
  todo = [
      r for r in instances.read_instances(folder / "instances.csv")
      if (family, pathlib.Path(r[1]).name) not in done
  ]
  start = time.monotonic()
  for k, (onnx_path, vnnlib_path, _) in enumerate(todo):
    decision, _ = instances.run_instance(onnx_path,
                                         vnnlib_path,
                                         limit,
                                         complete=complete,
                                         precision=precision)
    _append(
        out,
        dict(family=family,
             vnnlib=pathlib.Path(vnnlib_path).name,
             method=complete,
             result=decision.result,
             stage=decision.stage,
             seconds=round(decision.seconds, 3),
             precision=precision))
    rate = (time.monotonic() - start) / (k + 1)
    _LOG.info("%s %s [%d/%d] %s: %s by %s in %.1f s | ETA %.0f s", family, complete, k + 1,
              len(todo),
              pathlib.Path(vnnlib_path).name, decision.result, decision.stage, decision.seconds,
              rate * (len(todo) - k - 1))


def milp_from_truth(truth: pathlib.Path, family: str, limit: float, out: pathlib.Path,
                    precision: str) -> None:
  """The MILP's rows under ``limit`` s read off its ground-truth run under a longer limit.

  The ground truth is the same search (`verify.instances.decide` with
  ``complete="milp"``) with more time: where it answered within ``limit`` s the
  shorter run answers the same, else it times out, so the family's MILP column
  costs no second run.
  """
  done = _read(out, precision)
  for (fam, name), row in _read(truth, precision).items():
    if fam != family or (fam, name) in done:
      continue
    seconds = float(row["seconds"])
    late = seconds > limit
    _append(
        out,
        dict(family=fam,
             vnnlib=name,
             method="milp",
             result="timeout" if late else row["result"],
             stage="milp" if late else row["stage"],
             seconds=min(seconds, limit),
             precision=precision))


def table(out_dir: pathlib.Path, families, methods, precision: str) -> str:
  truth = {
      k: r["result"]
      for k, r in _read(out_dir / "truth.csv", precision).items()
      if r["result"] in ("sat", "unsat")
  }
  lines = [
      f"{'family':<16} {'method':<6} {'decided':>9} {'wrong':>6} {'known':>9} "
      f"{'median s':>9}"
  ]
  for family in families:
    for method in methods:
      rows = [
          r for k, r in _read(out_dir / f"results_{method}.csv", precision).items()
          if k[0] == family
      ]
      if not rows:
        continue
      decided = [r for r in rows if r["result"] in ("sat", "unsat")]
      known = [r for r in rows if (family, r["vnnlib"]) in truth]
      wrong = sum(truth.get((family, r["vnnlib"]), r["result"]) != r["result"] for r in decided)
      known_decided = sum(r["result"] in ("sat", "unsat") for r in known)
      median = statistics.median(float(r["seconds"]) for r in rows)
      lines.append(f"{family:<16} {method:<6} {len(decided):>4}/{len(rows):<4} {wrong:>6} "
                   f"{known_decided:>4}/{len(known):<4} {median:>9.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  scripts.setup_logging()
  if not _OUT_DIR.value:
    raise app.UsageError("--out_dir is required")
  unknown = set(_FAMILIES.value) - set(FAMILIES) | set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f"unknown families or methods: {sorted(unknown)} (families: "
                         f"{list(FAMILIES)}; methods: {list(METHODS)})")
  try:
    radii = [float(r) for r in _CALIBRATE_RADII.value]
  except ValueError:
    radii = []
  if not radii or min(radii) < 0:
    raise app.UsageError(f"--calibrate_radii takes radii >= 0, got {_CALIBRATE_RADII.value}")
  if _PRECISION.value == "float64":
    jax.config.update("jax_enable_x64", True)
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  folders = {f: build(out_dir, f, _POINTS.value, _TRAIN_STEPS.value) for f in _FAMILIES.value}
  if "calibrate" in _STAGES.value:
    for family, folder in folders.items():
      print(f"{family}: alpha-CROWN's root bounds in {_PRECISION.value}")
      print(calibrate(folder, _POINTS.value, radii, _PRECISION.value))
    return
  if "truth" in _STAGES.value:
    for family, folder in folders.items():
      decide_all(folder, family, "milp", _TRUTH_LIMIT.value, out_dir / "truth.csv",
                 _PRECISION.value)
  if "compare" in _STAGES.value:
    for family, folder in folders.items():
      for method in _METHODS.value:
        limit = FAMILIES[family][4] * _TIME_SCALE.value
        out = out_dir / f"results_{method}.csv"
        if method == "milp" and limit <= _TRUTH_LIMIT.value:
          milp_from_truth(out_dir / "truth.csv", family, limit, out, _PRECISION.value)
        decide_all(folder, family, method, limit, out, _PRECISION.value)
  print(f"bounds in {_PRECISION.value}")
  print(table(out_dir, _FAMILIES.value, _METHODS.value, _PRECISION.value))


if __name__ == "__main__":
  scripts.run(main)

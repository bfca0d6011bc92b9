"""A robustness leaderboard: clean, AutoAttack and verified accuracy of several models.

    python -m benchmarks.leaderboard --models=runs/a,runs/b,net.onnx --dataset=mnist \\
        --threats=linf:0.1,0.3 --threats=l2:1.5 --output_dir=leaderboard

For every model (a training run's directory or an ONNX file) and threat model
(a norm and its radii), on the first ``--num_examples`` test points, as
RobustBench measures (inputs in [0, 1], any normalization inside the model):

* clean accuracy;
* AutoAttack's robust accuracy at each radius (`attacks.autoattack`, ``--version``);
* for L-inf threats, the verified accuracy of each bound in ``--verify``
  (`verify.certify`; a model the bound interpreter refuses gets ``n/a`` and the
  reason in the JSON);
* a robust-accuracy curve over every radius up to 1.5 times the largest, from one
  run of `attacks.fmn` per norm (the smallest adversarial perturbation found per
  point).

It writes ``leaderboard.md`` (the table), ``leaderboard.json`` (every number, the
settings and per-model details) and ``leaderboard.png`` (robust accuracy against
epsilon: FMN's curve and AutoAttack's points, one panel per norm). Each result is
saved as soon as it is computed, and AutoAttack's batches as they finish, so a
killed run resumes where it stopped; a model whose outputs changed is
re-evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
import jax
import numpy as np

import attacks
from attacks import core
from robustlib import plotting
from robustlib import scripts
from robustlib import sources
from robustlib.checks import InputError

_LOG = logging.getLogger(__name__)
NORMS = ("linf", "l2", "l1")
CURVE_POINTS = 61


@dataclasses.dataclass(frozen=True)
class Threat:
  """A threat model: a norm and the radii at which robust accuracy is reported."""
  norm: str
  eps: tuple[float, ...]

  @property
  def name(self) -> str:
    return f"{self.norm}:{','.join(f'{e:g}' for e in self.eps)}"


def parse_threat(spec: str) -> Threat:
  """``"linf:0.1,0.3"`` -> ``Threat("linf", (0.1, 0.3))``."""
  norm, sep, radii = spec.partition(":")
  norm = norm.strip().lower()
  if not sep or norm not in NORMS:
    raise InputError(f"a threat is NORM:EPS[,EPS...] with NORM one of {NORMS}, got {spec!r} "
                     "(e.g. linf:0.1,0.3)")
  try:
    eps = tuple(float(e) for e in radii.split(",") if e.strip())
  except ValueError:
    raise InputError(f"the radii of threat {spec!r} must be numbers separated by commas") from None
  if not eps:
    raise InputError(f"threat {spec!r} names no radius")
  core.check_eps(np.asarray(eps), name=f"the radii of {spec!r}")
  return Threat(norm, eps)


def _fingerprint(test: sources.TestSet, settings: dict) -> str:
  """The model's outputs on its first points and the settings: a changed model or setting
  starts its results afresh."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  logits = np.asarray(test.logits_fn(test.images[:8]), np.float64)
  h.update(np.round(logits, 4).tobytes())
  h.update(np.ascontiguousarray(test.labels).tobytes())
  return h.hexdigest()[:16]


def _write_json(path: str, content: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=1)
  os.replace(tmp, path)


def _label(source: str, taken: set[str]) -> str:
  name = os.path.basename(os.path.normpath(source)) or source
  label, i = name, 2
  while label in taken:
    label, i = f"{name}#{i}", i + 1
  return label


def _load(source: str, dataset: str | None, data_dir: str | None,
          num_examples: int) -> sources.TestSet:
  if source.endswith(".onnx"):
    return sources.load_test_set(onnx=source,
                                 dataset=dataset,
                                 data_dir=data_dir,
                                 num_examples=num_examples)
  return sources.load_test_set(source,
                               dataset=dataset,
                               data_dir=data_dir,
                               num_examples=num_examples)


class _Results:
  """``leaderboard.json``, rewritten atomically after every result."""

  def __init__(self, path: str, settings: dict, resume: bool):
    self.path = path
    self.content = {"settings": settings, "models": {}}
    if resume and os.path.exists(path):
      try:
        with open(path) as f:
          saved = json.load(f)
        self.content["models"] = saved.get("models", {})
      except (OSError, ValueError) as e:
        _LOG.warning("ignoring unreadable results %s (%s)", path, e)

  def model(self, label: str, fingerprint: str, details: dict) -> dict:
    entry = self.content["models"].get(label)
    if entry is None or entry.get("fingerprint") != fingerprint:
      entry = {"fingerprint": fingerprint, **details, "results": {}}
      self.content["models"][label] = entry
    return entry["results"]

  def save(self) -> None:
    _write_json(self.path, self.content)


def leaderboard(models: Sequence[str],
                threats: Sequence[Threat],
                *,
                output_dir: str,
                dataset: str | None = None,
                data_dir: str | None = None,
                num_examples: int = 1000,
                batch_size: int = 256,
                version: str = "standard",
                verify_methods: Sequence[str] = ("ibp", "crown"),
                curve: bool = True,
                seed: int = 0,
                resume: bool = True,
                progress: bool = True) -> dict:
  """Evaluates ``models`` under ``threats``; writes and returns the results (see the module
  docstring).

  Args:
    models: training runs' directories or ONNX files (``.onnx``; need ``dataset``).
    threats: the threat models.
    output_dir: where ``leaderboard.{md,json,png}`` and the resumable state go.
    dataset: the data set of every model (default: each run's own).
    data_dir: where the data files are (default: each run's, then
      ``ROBUSTLIB_DATA_DIR``).
    num_examples: the first this many test points (0: all).
    batch_size: rows per attack or bound call.
    version: AutoAttack's version, ``"standard"``, ``"plus"`` or ``"rand"``.
    verify_methods: bounds for L-inf threats (`verify.METHODS`); empty for none.
    curve: run FMN per norm for the robust-accuracy curves.
    seed: seeds the attacks' PRNG key.
    resume: reuse the results and state of an earlier run with the same settings.
    progress: show progress bars.

  Returns:
    The content of ``leaderboard.json``.

  Raises:
    InputError: for bad arguments (before any evaluation).
  """
  import verify  # pylint: disable=import-outside-toplevel
  if not models:
    raise InputError("--models names no model")
  if not threats:
    raise InputError("no threat model: pass --threats=NORM:EPS[,EPS...]")
  unknown = [m for m in verify_methods if m not in verify.METHODS]
  if unknown:
    raise InputError(f"unknown verification method {unknown[0]!r}; choose from {verify.METHODS}")
  if version not in attacks.autoattack.VERSIONS:
    raise InputError(f"version must be one of {attacks.autoattack.VERSIONS}, got {version!r}")
  missing = [m for m in models if not os.path.exists(m)]
  if missing:
    raise InputError(f"no such model: {missing[0]} (a training run's directory or an .onnx file)")
  if any(m.endswith(".onnx") for m in models) and not dataset:
    raise InputError("an ONNX model needs --dataset (the data set it classifies)")
  core.check_positive_int(batch_size, "batch_size")
  os.makedirs(output_dir, exist_ok=True)
  settings = {
      "dataset": dataset,
      "num_examples": num_examples,
      "version": version,
      "seed": seed,
      "threats": [t.name for t in threats],
      "verify": list(verify_methods),
      "curve": curve,
  }
  results = _Results(os.path.join(output_dir, "leaderboard.json"), settings, resume)
  key = jax.random.key(seed)
  labels: list[str] = []
  norms = list(dict.fromkeys(t.norm for t in threats))
  todo = len(models) * (1 + sum(1 + (len(verify_methods) if t.norm == "linf" else 0)
                                for t in threats) + (len(norms) if curve else 0))
  done, start = 0, time.time()

  def progress_line(what: str) -> None:
    rate = done / max(time.time() - start, 1e-9)
    _LOG.info("leaderboard: %d/%d results (%s) | %.2f results/min | ETA %.0f s", done, todo, what,
              60 * rate, (todo - done) / max(rate, 1e-9))

  for source in models:
    label = _label(source, set(labels))
    labels.append(label)
    test = _load(source, dataset, data_dir, num_examples)
    # Results are kept per threat, bound and curve: adding one leaves the others.
    model_settings = {k: settings[k] for k in ("dataset", "num_examples", "version", "seed")}
    fingerprint = _fingerprint(test, {**model_settings, "source": os.path.abspath(source)})
    entry = results.model(
        label, fingerprint, {
            "source": test.source,
            "model": test.model,
            "dataset": test.dataset,
            "num_examples": int(test.labels.shape[0])
        })
    state_dir = os.path.join(output_dir, "state", fingerprint) if resume else None

    if "clean_accuracy" not in entry:
      entry["clean_accuracy"] = _clean_accuracy(test, batch_size)
      results.save()
    done += 1
    progress_line(f"{label} clean")

    for threat in threats:
      row = entry.setdefault(threat.name, {"norm": threat.norm, "eps": list(threat.eps)})
      if "autoattack" not in row:
        report = attacks.evaluate(test.logits_fn,
                                  test.images,
                                  test.labels,
                                  attacks.autoattack(eps=max(threat.eps),
                                                     norm=threat.norm,
                                                     version=version),
                                  key=key,
                                  eps=list(threat.eps),
                                  batch_size=batch_size,
                                  state_dir=state_dir,
                                  progress=progress)
        row["autoattack"] = list(report.robust_accuracy)
        row["autoattack_seconds"] = report.seconds
        row["warnings"] = list(report.warnings)
        results.save()
      done += 1
      progress_line(f"{label} {threat.name} autoattack")
      if threat.norm != "linf":
        continue
      verified = row.setdefault("verified", {})
      for method in verify_methods:
        if method not in verified:
          verified[method] = _verified(verify, test, threat.eps, method, batch_size)
          results.save()
        done += 1
        progress_line(f"{label} {threat.name} {method}")

    if curve:
      curves = entry.setdefault("curves", {})
      for norm in norms:
        top = 1.5 * max(max(t.eps) for t in threats if t.norm == norm)
        grid = np.linspace(0.0, top, CURVE_POINTS).tolist()
        if curves.get(norm, {}).get("eps") != grid:
          report = attacks.evaluate(test.logits_fn,
                                    test.images,
                                    test.labels,
                                    attacks.fmn(norm=norm),
                                    key=key,
                                    eps=grid,
                                    batch_size=batch_size,
                                    progress=progress,
                                    run_diagnostics=False)
          curves[norm] = {
              "eps": grid,
              "robust_accuracy": list(report.robust_accuracy),
              "median_distance": report.to_dict(flags=False)["minimal_distance_quantiles"]["0.5"],
              "seconds": report.seconds
          }
          results.save()
        done += 1
        progress_line(f"{label} {norm} fmn curve")

  keep = {"clean_accuracy", "curves", *settings["threats"]}  # this call's, not earlier ones'
  content = {"settings": settings, "models": {}}
  for label in labels:
    model = results.content["models"][label]
    content["models"][label] = {
        **model, "results": {
            k: v for k, v in model["results"].items() if k in keep
        }
    }
  results.content = content
  results.save()
  with open(os.path.join(output_dir, "leaderboard.md.tmp"), "w") as f:
    f.write(table(content) + "\n")
  os.replace(os.path.join(output_dir, "leaderboard.md.tmp"),
             os.path.join(output_dir, "leaderboard.md"))
  save_plot(content, os.path.join(output_dir, "leaderboard.png"))
  return content


def _clean_accuracy(test: sources.TestSet, batch_size: int) -> float:
  """Accuracy in batches of one shape (the last padded with its first row): one compilation."""
  n = test.labels.shape[0]
  size = min(batch_size, n)
  predictions = []
  for i in range(0, n, size):
    chunk = test.images[i:i + size]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], size - chunk.shape[0], axis=0)])
    predictions.append(np.asarray(test.logits_fn(padded)).argmax(axis=1)[:chunk.shape[0]])
  return float(np.mean(np.concatenate(predictions) == test.labels))


def _verified(verify, test: sources.TestSet, eps: Sequence[float], method: str,
              batch_size: int) -> dict:
  """``{"accuracy": [E]}``, or ``{"error": reason}`` where the bounds do not apply."""
  from verify import runs  # pylint: disable=import-outside-toplevel
  try:
    flags = runs.certified_flags(test.logits_fn,
                                 test.images,
                                 test.labels,
                                 eps,
                                 method,
                                 batch_size=min(batch_size, 128))
  except verify.UnsupportedPrimitiveError as e:
    _LOG.warning("%s: %s does not apply: %s", test.source, method, e)
    return {"error": str(e)}
  return {"accuracy": [float(a) for a in flags.mean(axis=1)]}


def _percent(value: Any) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}"


def table(content: dict) -> str:
  """The Markdown table: a row per model; clean, then per threat and radius AutoAttack's
  robust accuracy and each bound's verified accuracy (percent)."""
  settings = content["settings"]
  header, columns = ["model", "clean"], []
  for name in settings["threats"]:
    norm, radii = name.split(":")
    for j, e in enumerate(radii.split(",")):
      columns.append((name, j, "autoattack"))
      header.append(f"{norm} {e} AA")
      if norm == "linf":
        for method in settings["verify"]:
          columns.append((name, j, method))
          header.append(f"{norm} {e} {method.upper()}")
  rows = []
  for label, entry in content["models"].items():
    results = entry["results"]
    cells = [label, _percent(results.get("clean_accuracy"))]
    for name, j, what in columns:
      row = results.get(name, {})
      if what == "autoattack":
        values = row.get("autoattack")
      else:
        values = row.get("verified", {}).get(what, {}).get("accuracy")
      cells.append(_percent(values[j] if values else None))
    rows.append(cells)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  note = (f"\n{settings['num_examples'] or 'all'} test points"
          f"{' of ' + settings['dataset'] if settings['dataset'] else ''}; AutoAttack "
          f"{settings['version']}; robust and verified accuracy in percent.")
  return "\n".join(lines) + "\n" + note


def save_plot(content: dict, path: str) -> str:
  """Robust accuracy against epsilon, one panel per norm: each model's FMN curve and its
  AutoAttack points."""
  panels: dict[str, dict] = {}
  for label, entry in content["models"].items():
    results = entry["results"]
    for name in content["settings"]["threats"]:
      row = results.get(name, {})
      if "autoattack" not in row:
        continue
      panel = panels.setdefault(row["norm"], {})
      panel[f"{label} AutoAttack"] = (row["eps"], row["autoattack"])
    for norm, c in results.get("curves", {}).items():
      panels.setdefault(norm, {})[f"{label} FMN"] = (c["eps"], c["robust_accuracy"])
  panels = {f"{norm}: robust accuracy": series for norm, series in panels.items()}
  return plotting.save_line_plots(path,
                                  panels,
                                  xlabel="epsilon",
                                  title=f"{content['settings']['num_examples']} test points")


# ----------------------------------------------------------------------------
# The script.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  scripts.setup_logging()
  try:
    threats = [parse_threat(t) for t in _THREATS.value]
    content = leaderboard(_MODELS.value,
                          threats,
                          output_dir=_OUTPUT_DIR.value,
                          dataset=_DATASET.value,
                          data_dir=_DATA_DIR.value,
                          num_examples=_NUM_EXAMPLES.value,
                          batch_size=_BATCH_SIZE.value,
                          version=_VERSION.value,
                          verify_methods=[m for m in _VERIFY.value if m],
                          curve=_CURVE.value,
                          seed=_SEED.value,
                          resume=_RESUME.value)
  except scripts.USER_ERRORS as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  print(table(content))
  print(f"written: {os.path.join(_OUTPUT_DIR.value, 'leaderboard.md')}, leaderboard.json, "
        "leaderboard.png")
  sys.stdout.flush()


if __name__ == "__main__":  # flags defined by the script only (tests import the module)
  _MODELS = flags.DEFINE_list("models", [], "Training runs' directories or .onnx files.")
  _THREATS = flags.DEFINE_multi_string("threats", ["linf:0.1,0.3"],
                                       "NORM:EPS[,EPS...], NORM in linf, l2, l1; repeatable.")
  _DATASET = flags.DEFINE_string("dataset", None,
                                 "The data set (default: each run's; required for ONNX).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: each run's).")
  _NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "First test points (0: all).")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Rows per call.")
  _VERSION = flags.DEFINE_enum("version", "standard", ["standard", "plus", "rand"],
                               "AutoAttack's version.")
  _VERIFY = flags.DEFINE_list("verify", ["ibp", "crown"], "Bounds for L-inf threats (empty: none).")
  _CURVE = flags.DEFINE_bool("curve", True, "FMN curves per norm for the plot.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' PRNG key.")
  _OUTPUT_DIR = flags.DEFINE_string("output_dir", "leaderboard", "Where results go.")
  _RESUME = flags.DEFINE_bool("resume", True, "Resume from earlier results and state.")
  scripts.run(main)

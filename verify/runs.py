"""Certified accuracy of a training run's directory: flags, table, ``verify.json`` and plot.

The library side of ``python -m verify.certify`` (`certify_run`); the PGD column
comes from the run's ``attacks.json`` when ``python -m attacks.evaluate`` wrote one.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from robustlib import checks, plotting, sources
from robustlib import compilation
from robustlib.batching import pad_to_multiple
from verify.bab_attack import bab_attack_examples
from verify import certification
from verify import lagrangian_dual
from verify import milp
from verify.unsafe import UnsafeSet

# The batched bound methods, the duals of a run's learned verifier (`verify.lagrangian_dual`),
# then exact verification (CROWN first, a program per example left).
METHODS = certification.METHODS + ("pvt", "milp")
RESULTS_FILE = "verify.json"
PLOT_FILE = "verify.png"
ATTACKS_FILE = "attacks.json"


def _check_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
  names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
  unknown = [m for m in names if m not in METHODS]
  if unknown or not names:
    raise checks.InputError(f"unknown method {unknown[0] if unknown else ''!r}; choose from "
                            f"{', '.join(METHODS)} (several separated by commas)")
  return tuple(dict.fromkeys(names))


def _check_eps(eps: Sequence[float]) -> tuple[float, ...]:
  values = tuple(float(e) for e in eps)
  if not values:
    raise checks.InputError("--eps needs at least one radius")
  bad = [e for e in values if not math.isfinite(e) or e < 0]
  if bad:
    raise checks.InputError(f"eps must be finite and >= 0, got {bad[0]}")
  return values


class AttackColumn(NamedTuple):
  """What an attacks.json says about the examples being verified.

  ``accuracy``: robust accuracy per radius (None for a radius the file lacks),
  or None when the file is absent or unusable. ``flags``: bool ``[N]`` robust
  flags per radius where the file has per-example flags (else None). ``suite``:
  the attack suite's name. ``note``: where the column came from, or why it is
  missing.
  """
  accuracy: list[float | None] | None
  flags: list[np.ndarray | None] | None
  suite: str
  note: str


def _no_column(note: str) -> AttackColumn:
  return AttackColumn(None, None, "", f"no PGD column: {note}")


def read_pgd(path: str,
             eps: Sequence[float],
             num_examples: int,
             dataset: str,
             checkpoint: str | None = None) -> AttackColumn:
  """PGD accuracies (and flags) at ``eps`` on the first ``num_examples`` examples, from an attacks.json.

  Radius 0 is not reported missing: its robust accuracy is the clean one. A file of
  another checkpoint of the run (``checkpoint``: ``"latest"`` or ``"best"``) is not used.
  """
  if not os.path.exists(path):
    return _no_column(f"{path} is absent (run `python -m attacks.evaluate --workdir=DIR "
                      f"--suite=pgd --eps=...` first)")
  try:
    with open(path) as f:
      report = json.load(f)
    if report.get("norm", "linf") != "linf":
      return _no_column(f"{path} holds {report['norm']} attacks, not linf")
    if report.get("dataset", dataset) != dataset:
      return _no_column(f"{path} was measured on {report['dataset']!r}")
    attacked = report.get(sources.CHECKPOINT_FIELD, "latest")
    if checkpoint is not None and attacked != checkpoint:
      return _no_column(f"{path} attacked the run's {attacked} checkpoint, not its {checkpoint}")
    flags_ = report.get("robust_flags")
    if flags_ is not None and len(flags_[0]) >= num_examples:
      rows = [np.asarray(row[:num_examples], bool) for row in flags_]
      per_eps = [float(np.mean(row)) for row in rows]
    elif report["num_examples"] == num_examples:
      per_eps = [float(a) for a in report["robust_accuracy"]]
      rows = [None] * len(per_eps)
    else:
      return _no_column(f"{path} covers {report['num_examples']} examples, fewer than "
                        f"{num_examples}")
    found = [float(e) for e in report["eps"]]
  except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
    return _no_column(f"{path} is unreadable ({type(e).__name__}: {e})")
  values, flags = [], []
  for e in eps:
    match = [j for j, f in enumerate(found) if math.isclose(f, e, rel_tol=1e-6, abs_tol=1e-9)]
    values.append(per_eps[match[0]] if match else None)
    flags.append(rows[match[0]] if match else None)
  suite = report.get("suite", "?")
  missing = [f"{e:g}" for e, v in zip(eps, values) if v is None and e != 0]
  note = f"PGD: {suite} from {path}"
  if missing:
    note += f" (no result there for eps {', '.join(missing)})"
  return AttackColumn(values, flags, suite, note)


def verified_but_attacked(verified: dict[str, np.ndarray],
                          attacked: list[np.ndarray | None]) -> dict[str, list[int | None]]:
  """Per method and radius, how many verified examples the attack broke (None: no flags).

  Any count above 0 means an unsound bound or a wrong attack: a proof of
  robustness and a counterexample cannot both hold.

  Args:
    verified: bool ``[E, N]`` per method.
    attacked: per radius, the attack's bool ``[N]`` robust flags or None.
  """
  return {
      m: [None if a is None else int(np.sum(v[j] & ~a)) for j, a in enumerate(attacked)]
      for m, v in verified.items()
  }


def certified_flags(logits_fn,
                    images: np.ndarray,
                    labels: np.ndarray,
                    eps: Sequence[float],
                    method: str,
                    batch_size: int = 128,
                    verifier=None) -> np.ndarray:
  """bool ``[E, N]``: verified robust at each radius, in fixed-size batches (one compilation);
  ``method="pvt"`` certifies with ``verifier``'s duals (`verify.lagrangian_dual.certify`)."""
  if method == "pvt":
    if verifier is None:
      raise checks.InputError("method pvt certifies with a learned verifier's duals: it needs a "
                              "run trained with config.method='pvt' (config.verifier_width > 0)")
    certify = lambda x, y, e: lagrangian_dual.certify(logits_fn, x, y, e, verifier)
  else:
    certify = lambda x, y, e: certification.certify(logits_fn, x, y, e, method=method)
  n = images.shape[0]
  batch_size = min(batch_size, n)
  xp, yp = pad_to_multiple(images, batch_size), pad_to_multiple(labels, batch_size)
  out = np.zeros((len(eps), xp.shape[0]), bool)
  for start in range(0, xp.shape[0], batch_size):
    rows = slice(start, start + batch_size)
    for j, e in enumerate(eps):
      radius = jnp.full((batch_size,), e, jnp.float32)  # traced: the radii share a compilation
      out[j, rows] = np.asarray(certify(xp[rows], yp[rows], radius))
  return out[:, :n]


def milp_flags(logits_fn,
               images: np.ndarray,
               labels: np.ndarray,
               eps: Sequence[float],
               todo: np.ndarray,
               time_limit: float,
               box: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """`verify.milp` status ``[E, N]`` (``""`` where not ``todo``) of each ``todo [E, N]`` example."""
  status = np.full(todo.shape, "", object)
  jobs = list(zip(*np.nonzero(todo)))
  num_classes = int(np.asarray(logits_fn(images[:1])).shape[1])
  bar = tqdm(total=len(jobs), desc="milp", unit="ex", disable=not jobs)
  for n_done, (j, i) in enumerate(jobs):
    lower = np.clip(images[i] - eps[j], *box)
    upper = np.clip(images[i] + eps[j], *box)
    unsafe = UnsafeSet.misclassified(int(labels[i]), num_classes)
    result = milp.milp_verify(logits_fn, lower, upper, unsafe, time_limit=time_limit)
    status[j, i] = result.status
    bar.update()
    if n_done % 20 == 19 or n_done == len(jobs) - 1:
      rate = (n_done + 1) / max(bar.format_dict["elapsed"], 1e-9)
      logging.info("milp: %d/%d examples (%.2f/s, ETA %.0f s), %s", n_done + 1, len(jobs), rate,
                   (len(jobs) - n_done - 1) / rate,
                   ", ".join(f"{k} {np.sum(status == k)}" for k in milp.STATUSES))
  bar.close()
  return status


def bab_attack_stage(logits_fn, images: np.ndarray, labels: np.ndarray, eps: Sequence[float],
                     clean: np.ndarray, verified: dict[str, np.ndarray],
                     attacked: list[np.ndarray | None] | None, time_limit: float) -> dict:
  """`verify.bab_attack_examples` at each radius on the clean examples no method verified
  and the attack (robust flags ``attacked``, where known) left robust.

  Returns:
    ``{"time_limit", "examples", "broken", "verified", "broken_flags"}``, counts per
    radius (flags ``[E, N]``).
  """
  out = {"time_limit": time_limit, "examples": [], "broken": [], "verified": [], "broken_flags": []}
  for j, e in enumerate(eps):
    done = np.zeros_like(clean)
    for v in verified.values():
      done = done | v[j]
    robust = attacked[j] if attacked and attacked[j] is not None else clean
    todo = clean & ~done & robust if e > 0 else np.zeros_like(clean)
    stage = bab_attack_examples(logits_fn, images, labels, float(e), todo, jax.random.key(j),
                                time_limit)
    for k in ("examples", "broken", "verified"):
      out[k].append(stage[k])
    out["broken_flags"].append(stage["broken_flags"].astype(int).tolist())
  return out


def certify_run(workdir: str | None = None,
                *,
                onnx: str | None = None,
                methods: str | Sequence[str] = ("ibp", "crown"),
                eps: Sequence[float] = (0.01,),
                num_examples: int = 1000,
                batch_size: int = 128,
                data_dir: str | None = None,
                dataset: str | None = None,
                output_dir: str | None = None,
                milp_time_limit: float = 60.0,
                bab_attack_time: float = 0.0,
                checkpoint: str = "latest") -> dict:
  """Verified accuracy of a training run's latest checkpoint, or an ONNX network, on a test split.

  Args:
    workdir: a directory written by a training run, read with
      ``robustlib.checkpoints.load_run``.
    onnx: instead of ``workdir``, an ONNX classifier of ``dataset``'s images
      (see `robustlib.sources`).
    methods: bound methods (`METHODS`), a list or a comma-separated string.
      ``pvt`` certifies with the duals of the run's learned verifier (runs trained with
      ``config.method="pvt"``; `verify.lagrangian_dual`). ``milp`` is exact: the examples
      that CROWN (and any other method asked for) leaves unverified get a mixed-integer program each (`verify.milp`);
      those it proves robust join the verified, those it breaks are counted
      as ``falsified``, and those it cannot decide in ``milp_time_limit``
      seconds as ``unknown``.
    eps: L-inf radii.
    num_examples: the first this many test examples (0: all).
    batch_size: examples per bound computation.
    data_dir: where the data files are (default: the run's).
    dataset: another data set with the same input shape (default: the run's;
      required with ``onnx``).
    output_dir: where ``verify.json`` and ``verify.png`` go (default ``workdir``,
      or the ONNX file's folder); ``attacks.json`` is read from ``workdir``, or
      from ``output_dir`` for an ONNX network.
    milp_time_limit: seconds per example for ``milp``.
    bab_attack_time: seconds of `verify.bab_attack` (ReLU networks) per example and
      radius that no method verifies and the attack (``attacks.json``, when it has
      per-example flags) leaves robust; 0: not run. Its counterexamples (and proofs)
      narrow the gap between the two columns.
    checkpoint: the run's ``"latest"`` or ``"best"`` checkpoint (`robustlib.sources`).

  Returns:
    The content written to ``verify.json``.
  """
  start = time.time()
  methods = _check_methods(methods)
  eps = _check_eps(eps)
  if batch_size <= 0 or num_examples < 0:
    raise checks.InputError(f"batch_size must be > 0 and num_examples >= 0, got {batch_size} "
                            f"and {num_examples}")
  if "milp" in methods and not milp_time_limit > 0:
    raise checks.InputError(f"milp_time_limit must be > 0 seconds, got {milp_time_limit}")
  if not bab_attack_time >= 0:
    raise checks.InputError(f"bab_attack_time must be seconds >= 0 (0: no bab_attack), got "
                            f"{bab_attack_time}")
  test = sources.load_test_set(workdir,
                               onnx=onnx,
                               dataset=dataset,
                               data_dir=data_dir,
                               num_examples=num_examples,
                               checkpoint=checkpoint)
  images, labels, logits_fn = test.images, test.labels, test.logits_fn
  output_dir = output_dir or workdir or os.path.dirname(test.source)
  checks.check_images(images, bounds=(0.0, 1.0))
  n = images.shape[0]
  logits = np.concatenate([
      np.asarray(compilation.jit(logits_fn)(images[i:i + batch_size]))
      for i in range(0, n, batch_size)
  ])
  clean = logits.argmax(axis=1) == labels

  verified, seconds, exact = {}, {}, {}
  for method in methods:
    t = time.time()
    if method == "milp":
      done = np.zeros((len(eps), n), bool)
      for v in verified.values():
        done = done | v
      if not any(m in verified for m in ("crown", "alpha_crown")):
        done = done | (certified_flags(logits_fn, images, labels, eps, "crown", batch_size) &
                       clean[None])
      status = milp_flags(logits_fn, images, labels, eps, clean[None] & ~done, milp_time_limit)
      verified[method] = done | (status == "verified")
      exact = {k: np.sum(status == k, axis=1).tolist() for k in ("falsified", "unknown")}
      exact["time_limit"] = milp_time_limit
    else:
      verified[method] = certified_flags(logits_fn, images, labels, eps, method, batch_size,
                                         test.verifier) & clean[None]
    seconds[method] = time.time() - t
    logging.info("%s: verified accuracy %s (%.1f s)", method,
                 ", ".join(f"{v:.2%}" for v in verified[method].mean(axis=1)), seconds[method])

  pgd, attacked, suite, note = read_pgd(os.path.join(workdir or output_dir, ATTACKS_FILE), eps, n,
                                        test.dataset, checkpoint if onnx is None else None)
  contradictions = None
  if pgd is not None:  # at radius 0 there is nothing to attack
    pgd = [float(clean.mean()) if v is None and e == 0 else v for e, v in zip(eps, pgd)]
    attacked = [clean if a is None and e == 0 else a for e, a in zip(eps, attacked)]
    contradictions = verified_but_attacked(verified, attacked)
    if any(c for counts in contradictions.values() for c in counts):
      logging.error("examples both verified and broken by the attack: %s", contradictions)
  bab = None
  if bab_attack_time > 0:
    bab = bab_attack_stage(logits_fn, images, labels, eps, clean, verified, attacked,
                           bab_attack_time)
  content = {
      "workdir": test.source,
      "dataset": test.dataset,
      "model": test.model,
      sources.CHECKPOINT_FIELD: checkpoint if onnx is None else None,
      "norm": "linf",
      "num_examples": n,
      "eps": list(eps),
      "methods": list(methods),
      "clean_accuracy": float(clean.mean()),
      "pgd_accuracy": pgd,
      "pgd_suite": suite,
      "pgd_note": note,
      "verified_but_attacked": contradictions,
      "verified_accuracy": {
          m: [float(a) for a in v.mean(axis=1)] for m, v in verified.items()
      },
      "seconds_per_method": seconds,
      "milp": exact or None,
      "bab_attack": bab,
      "seconds": time.time() - start,
      "clean_flags": clean.astype(int).tolist(),
      "verified_flags": {
          m: v.astype(int).tolist() for m, v in verified.items()
      },
  }
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, RESULTS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(content, f, indent=1)
  os.replace(path + ".tmp", path)
  save_plot(content, os.path.join(output_dir, PLOT_FILE))
  return content


def table(content: dict) -> str:
  """One row per radius: clean, PGD (when known) and verified accuracy per method."""
  pgd = content.get("pgd_accuracy")
  methods = content["methods"]
  header = ["eps", "clean"
           ] + (["PGD"] if pgd is not None else []) + [f"verified {m}" for m in methods]
  rows = []
  for j, e in enumerate(content["eps"]):
    row = [f"{e:g}", f"{content['clean_accuracy']:.2%}"]
    if pgd is not None:
      row.append("-" if pgd[j] is None else f"{pgd[j]:.2%}")
    row += [f"{content['verified_accuracy'][m][j]:.2%}" for m in methods]
    rows.append(row)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
  lines.insert(1, "-" * len(lines[0]))
  exact = content.get("milp")
  if exact:
    lines.append(f"milp ({exact['time_limit']:g} s per example): counterexamples found "
                 f"{', '.join(map(str, exact['falsified']))}; undecided "
                 f"{', '.join(map(str, exact['unknown']))} (per radius)")
  bab = content.get("bab_attack")
  if bab:
    lines.append(f"bab_attack ({bab['time_limit']:g} s per example): broke "
                 f"{', '.join(map(str, bab['broken']))} of "
                 f"{', '.join(map(str, bab['examples']))} open examples, proved "
                 f"{', '.join(map(str, bab['verified']))} (per radius)")
  lines.append(content["pgd_note"])
  contradictions = content.get("verified_but_attacked")
  if contradictions:
    counts = {m: [c for c in v if c is not None] for m, v in contradictions.items()}
    checked = [m for m, c in counts.items() if c]
    broken = {m: sum(c) for m, c in counts.items() if sum(c)}
    if broken:
      lines.append("UNSOUND: verified examples broken by the attack (per method): " +
                   ", ".join(f"{m} {c}" for m, c in broken.items()))
    elif checked:
      lines.append(f"cross-check: the attack breaks none of the examples verified by "
                   f"{', '.join(checked)}")
  return "\n".join(lines)


def save_plot(content: dict, path: str) -> str:
  """Verified accuracy per method, PGD accuracy and clean accuracy against epsilon."""
  eps = content["eps"]
  series = {"clean": (eps, [content["clean_accuracy"]] * len(eps))}
  pgd = content.get("pgd_accuracy")
  if pgd is not None:
    known = [(e, a) for e, a in zip(eps, pgd) if a is not None]
    if known:
      series[f"{content['pgd_suite']} (empirical)"] = tuple(map(list, zip(*known)))
  for method, values in content["verified_accuracy"].items():
    series[f"verified ({method})"] = (eps, values)
  return plotting.save_line_plots(path, {"robust accuracy": series},
                                  xlabel="epsilon (linf)",
                                  title=f"{content['model']} on {content['dataset']}, "
                                  f"{content['num_examples']} examples")

"""The robustness report of a trained model: empirical (attacks) and verified (bounds) accuracy.

At the test radius: clean accuracy, accuracy under PGD-40 and under the
AutoAttack suite, verified accuracy by each bound method, and optionally the
branch-and-bound attack's on what is left open; over a sweep of radii:
PGD and verified accuracy, also saved as a PNG.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

import attacks
import verify
from robustlib import batching, plotting

# AutoAttack's batches in the report: each logs a line, so a long report shows progress.
AUTOATTACK_BATCH = 100

# certifier(x [B, ...], y [B], eps) -> bool [B]: which examples it proves robust.
Certifier = Callable[[np.ndarray, np.ndarray, float], jax.Array]


def batched_flags(certifier: Certifier,
                  x: np.ndarray,
                  y: np.ndarray,
                  eps: float,
                  batch_size: int = 256) -> np.ndarray:
  """``certifier``'s flags (bool ``[N]``) in fixed-size batches (one compilation)."""
  n = x.shape[0]
  xs = batching.pad_to_multiple(np.asarray(x), batch_size)
  ys = batching.pad_to_multiple(np.asarray(y), batch_size)
  flags = []
  for start in range(0, xs.shape[0], batch_size):
    stop = start + batch_size
    flags.append(np.asarray(certifier(xs[start:stop], ys[start:stop], eps)))
  return np.concatenate(flags)[:n]


def verified_flags(logits_fn: Callable[[jax.Array], jax.Array],
                   x: np.ndarray,
                   y: np.ndarray,
                   eps: float,
                   method: str,
                   batch_size: int = 256) -> np.ndarray:
  """Which of ``(x, y)`` ``verify.certify`` proves robust (bool ``[N]``), in fixed-size batches."""
  return batched_flags(lambda a, b, e: verify.certify(logits_fn, a, b, e, method), x, y, eps,
                       batch_size)


def verified_accuracy(logits_fn: Callable[[jax.Array], jax.Array],
                      x: np.ndarray,
                      y: np.ndarray,
                      eps: float,
                      method: str,
                      batch_size: int = 256) -> float:
  """Fraction of ``(x, y)`` that ``verify.certify`` proves robust, in fixed-size batches."""
  return float(np.mean(verified_flags(logits_fn, x, y, eps, method, batch_size)))


def robustness_report(logits_fn: Callable[[jax.Array], jax.Array],
                      x: np.ndarray,
                      y: np.ndarray,
                      eps: float,
                      *,
                      key: jax.Array,
                      sweep: Sequence[float] = (),
                      verify_methods: Sequence[str] = ("ibp", "crown"),
                      pgd_steps: int = 40,
                      autoattack: bool = True,
                      batch_size: int = 256,
                      bab_attack_time: float = 0.0,
                      certifiers: Mapping[str, Certifier] | None = None,
                      plot_path: str | None = None) -> dict:
  """Clean, PGD, AutoAttack and verified accuracy of ``logits_fn`` at ``eps`` (L-inf).

  Args:
    logits_fn: ``[N, ...] -> [N, K]`` in inference mode, inputs in [0, 1].
    x: images ``[N, ...]``; y: labels ``[N]``.
    eps: the test radius.
    key: PRNG key of the attacks.
    sweep: further radii for the curves (``eps`` is always included).
    verify_methods: bound methods for verified accuracy (``verify.certify`` names).
    pgd_steps: steps of the PGD attack.
    autoattack: also run AutoAttack (standard version) at ``eps``.
    batch_size: examples per call.
    bab_attack_time: seconds of `verify.bab_attack` (affine and ReLU networks) per example
      the attacks leave robust and no method verifies at ``eps``; 0: not run.
    certifiers: further verified accuracies by name (e.g. a learned verifier's,
      `verify.lagrangian_dual.certify`), reported beside the methods'.
    plot_path: where to save the PNG of accuracy against epsilon (None: no plot).

  Returns:
    ``{"eps", "num_examples", "clean_accuracy", "pgd_accuracy",
    ["autoattack_accuracy"], "verified_accuracy": {method: value}, ["bab_attack_accuracy",
    "bab_attack": {"examples", "broken", "verified"}], "sweep": {...}, "seconds"}``;
    ``sweep`` holds the radii and one accuracy list per curve.
  """
  start = time.perf_counter()
  radii = sorted({round(float(e), 6) for e in sweep} | {float(eps)})
  pgd = attacks.pgd(eps=max(radii), steps=pgd_steps)
  pgd_report = attacks.evaluate(logits_fn,
                                x,
                                y,
                                pgd,
                                key=key,
                                eps=radii,
                                batch_size=batch_size,
                                progress=False)
  pgd_at = dict(zip(pgd_report.eps, pgd_report.robust_accuracy))
  report = {
      "eps": float(eps),
      "num_examples": int(x.shape[0]),
      "clean_accuracy": pgd_report.clean_accuracy,
      "pgd_accuracy": pgd_at[float(eps)],
  }
  logging.info("robustness report: clean %.4f, PGD-%d %.4f", report["clean_accuracy"], pgd_steps,
               report["pgd_accuracy"])
  robust = np.asarray(pgd_report.robust_flags[pgd_report.eps.index(float(eps))], bool)
  if autoattack:  # batches of at most 100, so that each logs a progress line within minutes
    aa = attacks.evaluate(logits_fn,
                          x,
                          y,
                          attacks.autoattack(eps=float(eps)),
                          key=jax.random.fold_in(key, 1),
                          batch_size=min(batch_size, AUTOATTACK_BATCH),
                          progress=False)
    report["autoattack_accuracy"] = aa.robust_accuracy[0]
    robust &= np.asarray(aa.robust_flags[0], bool)
    logging.info("robustness report: AutoAttack %.4f", report["autoattack_accuracy"])
  curves = {"pgd": [pgd_at[e] for e in radii]}
  verified = np.zeros(x.shape[0], bool)
  by_name = {m: (lambda a, b, e, m=m: verify.certify(logits_fn, a, b, e, m)) for m in verify_methods}
  by_name.update(certifiers or {})
  for method, certifier in by_name.items():
    curves[method] = []
    for e in radii:
      t = time.perf_counter()
      flags = batched_flags(certifier, x, y, e, batch_size)
      if e == float(eps):
        verified |= flags
      curves[method].append(float(np.mean(flags)))
      logging.info("robustness report: verified (%s) at eps %g: %.4f (%.1f s)", method, e,
                   curves[method][-1],
                   time.perf_counter() - t)
  report["verified_accuracy"] = {m: curves[m][radii.index(float(eps))] for m in by_name}
  if bab_attack_time > 0:
    stage = verify.bab_attack_examples(logits_fn, x, y, float(eps), robust & ~verified,
                                       jax.random.fold_in(key, 2), bab_attack_time)
    robust &= ~stage.pop("broken_flags")
    stage.pop("verified_flags")
    report["bab_attack_accuracy"] = float(np.mean(robust))
    report["bab_attack"] = stage
    logging.info("robustness report: bab_attack %.4f (broke %d of %d)",
                 report["bab_attack_accuracy"], stage["broken"], stage["examples"])
  report["sweep"] = {"eps": radii, **curves}
  report["seconds"] = round(time.perf_counter() - start, 2)
  if plot_path:
    series = {f"PGD-{pgd_steps}": (radii, curves["pgd"])}
    series.update({f"verified ({m})": (radii, curves[m]) for m in by_name})
    plotting.save_line_plots(plot_path, {"robust accuracy": series},
                             xlabel="epsilon (L-inf)",
                             title="empirical and verified robust accuracy")
  return report


def format_table(report: dict) -> str:
  """The report's headline numbers as a text table."""
  rows = [("clean", report["clean_accuracy"]), ("PGD", report["pgd_accuracy"])]
  if "autoattack_accuracy" in report:
    rows.append(("AutoAttack", report["autoattack_accuracy"]))
  if "bab_attack_accuracy" in report:
    rows.append(("bab_attack", report["bab_attack_accuracy"]))
  rows += [(f"verified ({m})", v) for m, v in report["verified_accuracy"].items()]
  width = max(len(r[0]) for r in rows)
  lines = [f"robustness at eps = {report['eps']:g} ({report['num_examples']} examples)"]
  lines += [f"  {name:<{width}}  {value:.2%}" for name, value in rows]
  return "\n".join(lines)

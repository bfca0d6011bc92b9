"""Verified accuracy and time per example of each verifier, beside an attack's robust accuracy.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.verifiers \\
        --workdirs=runs/mnist_pgd,runs/mnist_ibp --eps=0.1 --num_examples=20

For each training run (``python -m training.train``; its latest checkpoint, or the
best with ``--best``), the first ``--num_examples`` test images at L-inf ``--eps``:
clean accuracy, PGD-40's robust accuracy (an upper bound on any verifier's), and for
each of ``--methods`` (IBP, CROWN, alpha-CROWN, SDP-FO) the accuracy `verify.certify`
verifies and its seconds per example (after compilation for the jitted methods;
SDP-FO's sound evaluation is not jitted, so its time includes
it). The gap is PGD's robust accuracy less the verified one. A
verified example PGD breaks would be a bug: the table counts them.
"""

from __future__ import annotations

import time

from absl import flags
import jax
import numpy as np

import attacks
import robustlib
import verify
from robustlib import checkpoints, data, scripts
from verify.certification import CERTIFY_METHODS

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training runs, separated by commas.")
_BEST = flags.DEFINE_bool("best", False, "Each run's best-validation checkpoint.")
_EPS = flags.DEFINE_float("eps", 0.1, "L-inf radius.")
_NUM = flags.DEFINE_integer("num_examples", 20, "First test images.")
_BATCH = flags.DEFINE_integer("batch_size", 10, "Examples per certify call.")
_METHODS = scripts.define_names("methods", ["ibp", "crown", "alpha_crown", "sdp_fo"],
                                CERTIFY_METHODS, "Verifiers.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: the runs').")
flags.mark_flag_as_required("workdirs")


def _timed_certify(fn, x, y, eps, method):
  """Per-example flags and seconds per example (a warm-up call first where it compiles)."""
  if method != "sdp_fo":
    np.asarray(verify.certify(fn, x[:_BATCH.value], y[:_BATCH.value], eps, method=method))
  flags_, start = [], time.perf_counter()
  for i in range(0, x.shape[0], _BATCH.value):
    flags_.append(
        np.asarray(
            verify.certify(fn, x[i:i + _BATCH.value], y[i:i + _BATCH.value], eps, method=method)))
  return np.concatenate(flags_), (time.perf_counter() - start) / x.shape[0]


def main(argv):
  del argv
  eps = _EPS.value
  print(f"verifiers at L-inf {eps}, first {_NUM.value} test images, "
        f"{jax.devices()[0].platform}")
  header = (f"{'run':>24} {'method':>12} {'verified %':>11} {'PGD-40 %':>9} {'gap':>6} "
            f"{'s/example':>10} {'broken':>7}")
  lines = [header]
  for workdir in _WORKDIRS.value:
    config, model, variables = checkpoints.load_run(workdir, best=_BEST.value)
    fn = robustlib.as_logits_fn(model, variables)
    ds = data.load(config["dataset"], "test", data_dir=_DATA_DIR.value or config.get("data_dir"))
    x, y = ds.images[:_NUM.value], ds.labels[:_NUM.value]
    report = attacks.evaluate(fn,
                              x,
                              y,
                              attacks.pgd(eps=eps, steps=40),
                              key=jax.random.PRNGKey(0),
                              eps=[eps],
                              progress=False)
    robust = np.asarray(report.robust_flags[0])
    pgd = 100 * report.robust_accuracy[0]
    name = workdir.rstrip("/").split("/")[-1]
    lines.append(f"{name:>24} {'clean':>12} {100 * report.clean_accuracy:>11.1f}")
    for method in _METHODS.value:
      verified, seconds = _timed_certify(fn, x, y, eps, method)
      broken = int(np.sum(verified & ~robust))
      acc = 100 * verified.mean()
      lines.append(f"{name:>24} {method:>12} {acc:>11.1f} {pgd:>9.1f} {pgd - acc:>6.1f} "
                   f"{seconds:>10.3f} {broken:>7}")
      print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  scripts.run(main)

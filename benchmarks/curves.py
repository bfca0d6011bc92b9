"""Robustness curves from one minimum-norm run against AutoAttack at fixed radii.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.curves \\
        --cases=mlp:l2:0.5,1,1.5,2 --cases=cnn_small:linf:0.05,0.1,0.15 --num_points=500

For each case (a network of `benchmarks.nets`, trained briefly on MNIST, with FGSM
at L-inf 0.1 when the norm is L-inf, so that robust accuracy is not trivially
zero; a norm; radii) it prints, from one run, the robust accuracy at each radius
read from the distances of one unbounded `attacks.fmn` run and of one unbounded
`attacks.fab` run, and AutoAttack's at each radius, with the wall time of each
(compilation included). A curve above AutoAttack's is a weak attack.
"""

from __future__ import annotations

import time

from absl import flags
import jax

import attacks
from benchmarks import nets
from robustlib import scripts

_CASES = flags.DEFINE_multi_string("cases", ["mlp:l2:0.5,1,1.5,2", "cnn_small:linf:0.05,0.1,0.15"],
                                   "NET:NORM:EPS[,EPS...]; repeatable.")
_NUM_POINTS = flags.DEFINE_integer("num_points", 500, "First MNIST test points.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1500, "Training steps per network.")


def _row(name: str, seconds: float, accuracy) -> str:
  return f"{name:<12} {seconds:8.1f}  " + "  ".join(f"{a:7.3f}" for a in accuracy)


def main(argv):
  del argv
  for case in _CASES.value:
    net, norm, radii = case.split(":")
    eps = [float(e) for e in radii.split(",")]
    params = nets.train(net, _TRAIN_STEPS.value, adversarial_eps=0.1 if norm == "linf" else 0.0)
    fn = nets.logits_fn(net, params)
    x, y = nets.mnist_nchw("test", _NUM_POINTS.value)
    print(f"\n{net}, {norm}, {len(y)} points; robust accuracy at eps")
    print(f"{'attack':<12} {'seconds':>8}  " + "  ".join(f"{e:7g}" for e in eps))
    for name, suite in (("fmn", attacks.fmn(norm=norm)), ("fab", attacks.fab(eps=max(eps),
                                                                             norm=norm)),
                        ("autoattack", attacks.autoattack(eps=max(eps), norm=norm))):
      start = time.time()
      report = attacks.evaluate(fn, x, y, suite, eps=eps, key=jax.random.key(0), progress=False)
      print(_row(name, time.time() - start, report.robust_accuracy), flush=True)


if __name__ == "__main__":
  scripts.run(main)

"""Time per batch of IBP, CROWN-IBP and CROWN, and each as a multiple of one forward pass.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.bound_speed \\
        --models=mlp,cnn_small,cnn_large --methods=ibp,crown_ibp,crown

Networks from ``benchmarks.nets`` (trained briefly on MNIST, so that the number
of unstable ReLUs, which drives CROWN's cost, is realistic), MNIST test images,
an L-inf ball of radius ``--eps`` intersected with [0, 1], and the margin
specification of the true label. Every bound is one jitted call, timed after
compilation; the forward pass is the jitted ``logits_fn`` on the same batch.
auto_LiRPA's times on this machine for comparison are in ``../shared/PERFORMANCE.md``
(e.g. CROWN on the small CNN at batch 128: 7.6 s, about 600x its IBP time).
"""

from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp

import verify
from benchmarks import nets
from robustlib import compilation

_MODELS = flags.DEFINE_list("models", ["mlp", "cnn_small", "cnn_large"], "benchmarks.nets names.")
_METHODS = flags.DEFINE_list("methods", ["ibp", "crown_ibp", "crown"], "Bound methods.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per call.")
_EPS = flags.DEFINE_float("eps", 0.03, "L-inf radius.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "Adam steps to train each network.")

BOUNDS = {
    "ibp": lambda fn, box, spec: verify.ibp(lambda z: spec_logits(fn, z, spec), box),
    "crown_ibp": lambda fn, box, spec: verify.crown_ibp(fn, box, spec=spec),
    "crown": lambda fn, box, spec: verify.crown(fn, box, spec=spec),
    "alpha_crown": lambda fn, box, spec: verify.alpha_crown(fn, box, spec=spec),
}


def spec_logits(fn, x, spec):
  return jnp.einsum("nsk,nk->ns", spec, fn(x))


def main(argv):
  del argv
  print(f"bounds on margins, L-inf eps {_EPS.value}, batch {_BATCH.value}, "
        f"{jax.devices()[0].platform}, median of {_REPEATS.value}")
  header = f"{'model':>10} {'forward ms':>11}"
  for m in _METHODS.value:
    header += f" {m + ' ms':>14} {'x fwd':>7} {'verified':>9}"
  rows = []
  for name in _MODELS.value:
    params = nets.train(name, _TRAIN_STEPS.value)
    fn = nets.logits_fn(name, params)
    x_np, y_np = nets.mnist_nchw("test", _BATCH.value)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    box = verify.linf_ball(x, _EPS.value)
    spec = verify.margin_spec(y, 10)
    forward = compilation.jit(fn)
    fwd = nets.median_seconds(lambda: jax.block_until_ready(forward(x)), _REPEATS.value)
    row = f"{name:>10} {1e3 * fwd:>11.2f}"
    for method in _METHODS.value:
      bound = compilation.jit(lambda lo, hi, s, m=method: BOUNDS[m]
                              (fn, verify.Interval(lo, hi), s).lower)
      seconds = nets.median_seconds(
          lambda b=bound: jax.block_until_ready(b(box.lower, box.upper, spec)), _REPEATS.value)
      verified = float(jnp.mean(jnp.all(bound(box.lower, box.upper, spec) > 0, axis=1)))
      row += f" {1e3 * seconds:>14.1f} {seconds / fwd:>7.1f} {verified:>9.3f}"
      print(f"  {name} {method}: {1e3 * seconds:.1f} ms", flush=True)
    rows.append(row)
  print(header)
  for row in rows:
    print(row)


if __name__ == "__main__":
  app.run(main)

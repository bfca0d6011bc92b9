"""Subdomains bounded per second by ReLU-split branch and bound, beside one CROWN call each.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.bab_throughput \\
        --model=mlp_4x256 --batch_size=512 --eps=0.02

A network of `benchmarks.nets` (trained briefly on MNIST), the first test image
whose root bound at L-inf ``--eps`` does not prove robustness, and its
misclassification property. The pool is grown by search steps until it holds
``--batch_size`` open subdomains; then one step (``2 * batch_size`` children,
β-CROWN with ``--steps`` Adam steps, branching and the counterexample check) is
timed, beside the same step without optimisation (CROWN over the clamped
bounds), and beside one jitted `verify.crown` call on one box (what a search
bounding one subdomain per call pays for each). Printed as a table of seconds
per call and subdomains per second; medians of interleaved calls.
"""

from __future__ import annotations

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import verify
from benchmarks import nets
from robustlib import scripts
from verify import relu_bab
from verify.unsafe import UnsafeSet

_MODEL = flags.DEFINE_enum("model", "mlp_4x256", list(nets.ARCHITECTURES),
                           "A benchmarks.nets MLP or CNN.")
_BATCH = flags.DEFINE_integer("batch_size", 512, "Subdomains split per step (children: twice).")
_EPS = flags.DEFINE_float("eps", 0.02, "L-inf radius.")
_STEPS = flags.DEFINE_integer("steps", 10, "beta-CROWN's Adam steps per batch.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1000, "Training steps.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each.")
_BRANCHING = flags.DEFINE_enum("branching", "babsr", list(relu_bab.BRANCHING), "Branching rule.")


def main(argv):
  del argv
  params = nets.train(_MODEL.value, _TRAIN_STEPS.value)
  image_fn = nets.logits_fn(_MODEL.value, params)
  fn = lambda x: image_fn(x.reshape((x.shape[0], 1, 28, 28)))
  x, y = nets.mnist_nchw("test", 200)
  x = x.reshape(len(y), -1)
  batch = _BATCH.value
  for i in range(len(y)):
    lo, hi = np.clip(x[i] - _EPS.value, 0, 1), np.clip(x[i] + _EPS.value, 0, 1)
    unsafe = UnsafeSet.misclassified(int(y[i]), 10)
    setup = relu_bab.prepare(fn, lo, hi, unsafe, root_steps=50, lr=0.1)
    if setup.safety <= 0:
      break
  else:
    raise SystemExit(f"every one of {len(y)} points is proven at the root: raise --eps")
  print(f"test point {i}: {setup.num_unstable} unstable ReLUs, root bound {setup.safety:.4f}")
  timed = {}
  for name, steps in (("beta-crown", _STEPS.value), ("crown (clamped)", 0)):
    options = dict(steps=steps, lr=0.1, lr_beta=0.05, branching=_BRANCHING.value, candidates=3)
    pool, _ = relu_bab.initial_pool(fn, setup, capacity=8 * batch, max_depth=64, **options)
    while 0 < int(jnp.sum(pool.live)) < batch:  # grow the pool (steps with fewer parents)
      pool, _ = relu_bab._step(fn, setup.root, pool, batch_size=batch, **options)
    if int(jnp.sum(pool.live)) == 0:
      raise SystemExit("the search ended before the pool filled: lower --batch_size or raise --eps")
    state = {"pool": pool}

    def one_step(options=options, state=state):
      # The pool is donated: each call takes the last one's result.
      state["pool"], stats = relu_bab._step(fn,
                                            setup.root,
                                            state["pool"],
                                            batch_size=batch,
                                            **options)
      return jax.block_until_ready(stats)

    timed[f"{name}, batch {2 * batch}"] = (one_step, 2 * batch)
  box = verify.Interval(jnp.asarray(lo)[None], jnp.asarray(hi)[None])
  spec = verify.margin_spec(jnp.asarray(y[i:i + 1]), 10)
  crown = jax.jit(lambda b: verify.crown(fn, b, spec).lower)
  timed["verify.crown, one box"] = (lambda: jax.block_until_ready(crown(box)), 1)
  seconds = nets.interleaved_medians({k: v[0] for k, v in timed.items()}, _REPEATS.value)
  print(f"\n{_MODEL.value}, L-inf {_EPS.value:g}, {jax.devices()[0].platform}, "
        f"branching {_BRANCHING.value}")
  print(f"{'bounding':<28} {'s/call':>8} {'subdomains/s':>13}")
  for name, (_, count) in timed.items():
    print(f"{name:<28} {seconds[name]:8.4f} {count / seconds[name]:13.0f}")


if __name__ == "__main__":
  scripts.run(main)

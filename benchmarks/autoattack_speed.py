"""AutoAttack (standard, L-inf) against the original's algorithm, on the same weights and points.

    pip install -e ".[bench]"
    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.autoattack_speed \\
        --models=cnn_small,mlp --num_points=200,1000

For each network of ``benchmarks.nets``, trained on MNIST with FGSM and a random
start at ``--eps`` (so that most points survive the first attacks, as on the
robust models AutoAttack is meant for), and the first ``--num_points`` test
images, it runs from one process:

* **ours**: ``attacks.evaluate(fn, x, y, attacks.autoattack(eps), ...)``, whole
  wall time with compilation (a fresh suite per call), diagnostics included;
* **original**: the original AutoAttack's cascade with its settings (APGD-CE,
  APGD-T over 9 targets, FAB-T over 9 targets, 100 steps each, Square with 5,000
  queries, ``p_init=0.8`` and no schedule rescaling), each attack run on the
  points still robust, written with torchattacks' ports of the original code
  (its own ``AutoAttack`` class runs 10 steps, not AutoAttack's 100);
* **floor**: the network evaluations the cascade cannot avoid, timed alone: for
  the points left robust after each stage, its runs times its steps of jitted
  forward and input-gradient passes (Square: forward passes), at the batch size
  of the evaluation. No implementation of these attacks runs faster than this
  on this machine.

The table gives the three times, the ratio original / ours, and the robust
accuracy after each stage for both (ours must be equal or lower), and how many
points one broke that the other did not.
"""

from __future__ import annotations

import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import attacks
from benchmarks import nets
from robustlib import compilation
from robustlib import fastgrad
from robustlib import scripts

_MODELS = scripts.define_names("models", ["cnn_small", "mlp"], nets.ARCHITECTURES,
                               "Networks in benchmarks.nets.")
_POINTS = flags.DEFINE_list("num_points", ["200"], "First test points, one run per value.")
_EPS = flags.DEFINE_float("eps", 0.1, "L-inf radius (also the training radius).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Our evaluation's batch size.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1000, "FGSM training steps per network.")
_THEIRS = flags.DEFINE_bool("original", True, "Also run the original's algorithm (torch).")

STEPS, TARGETS, QUERIES = 100, 9, 5000


def original_cascade(model, eps: float):
  """The original AutoAttack's standard stages, with its settings, from torchattacks."""
  import torchattacks  # pylint: disable=import-outside-toplevel
  return [
      torchattacks.APGD(model, eps=eps, steps=STEPS, n_restarts=1, loss="ce", seed=0),
      torchattacks.APGDT(model, eps=eps, steps=STEPS, n_restarts=1, n_classes=10, seed=0),
      torchattacks.FAB(model,
                       eps=eps,
                       steps=STEPS,
                       n_restarts=1,
                       multi_targeted=True,
                       n_classes=10,
                       seed=0),
      torchattacks.Square(model,
                          eps=eps,
                          n_queries=QUERIES,
                          n_restarts=1,
                          p_init=0.8,
                          resc_schedule=False,
                          seed=0),
  ]


def run_original(model, x: np.ndarray, y: np.ndarray, eps: float):
  """``(seconds, robust flags [S, N])``: each stage on the points still robust."""
  import torch  # pylint: disable=import-outside-toplevel
  xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
  start = time.perf_counter()
  with torch.no_grad():
    alive = (model(xt).argmax(1) == yt).numpy()
  flags_ = []
  for stage in original_cascade(model, eps):
    idx = np.flatnonzero(alive)
    if idx.size:
      adv = stage(xt[idx], yt[idx])
      with torch.no_grad():
        alive[idx] = (model(adv).argmax(1) == yt[idx]).numpy()
    flags_.append(alive.copy())
  return time.perf_counter() - start, np.stack(flags_)


def per_point_seconds(fn, x: np.ndarray, batch: int, repeats: int = 20) -> tuple[float, float]:
  """Seconds per point of one forward pass and of one forward+input-gradient pass, each
  inside a jitted loop (as the attacks run them), at ``batch`` rows."""
  xb = jnp.asarray(x[:batch] if x.shape[0] >= batch else np.resize(x, (batch,) + x.shape[1:]))

  def forward_loop(z):
    return jax.lax.fori_loop(0, repeats, lambda i, v: v + 1e-7 * fn(v).sum(), z)

  def gradient_loop(z):
    prepared = fastgrad.prepare(fn, z)

    def body(i, v):
      logits, vjp = jax.vjp(prepared, v)
      return v + 1e-7 * vjp(logits)[0]

    return jax.lax.fori_loop(0, repeats, body, z)

  out = []
  for loop in (forward_loop, gradient_loop):
    jitted = compilation.jit(loop)
    seconds = nets.median_seconds(lambda j=jitted: jax.block_until_ready(j(xb)), 3)
    out.append(seconds / repeats / batch)
  return out[0], out[1]


def floor_seconds(robust_after: np.ndarray, correct: int, forward: float, gradient: float) -> float:
  """The network evaluations of the cascade on the points each stage leaves robust."""
  apgd_ce, apgd_t, fab_t, square = robust_after
  del apgd_ce
  return (correct * (STEPS + 1) * gradient + apgd_t * TARGETS * (STEPS + 1) * gradient +
          fab_t * TARGETS * STEPS * gradient + square * QUERIES * forward)


def run_model(name: str, sizes: list[int]) -> list[dict]:
  params = nets.train(name, _TRAIN_STEPS.value, adversarial_eps=_EPS.value)
  fn = nets.logits_fn(name, params)
  model = nets.torch_module(name, params) if _THEIRS.value else None
  rows = []
  for n in sizes:
    x, y = nets.mnist_nchw("test", n)
    eps = _EPS.value
    start = time.perf_counter()
    report = attacks.evaluate(fn,
                              x,
                              y,
                              attacks.autoattack(eps=eps),
                              key=jax.random.key(0),
                              batch_size=_BATCH.value,
                              progress=False)
    ours_seconds = time.perf_counter() - start
    ours = report.stage_flags[0]
    counts = ours.sum(axis=1)
    forward, gradient = per_point_seconds(fn, x, min(_BATCH.value, n))
    row = {
        "model": name,
        "n": n,
        "ours": ours_seconds,
        "ours_acc": report.stage_accuracy[0],
        "floor": floor_seconds(counts, int(report.clean_flags.sum()), forward, gradient),
    }
    if model is not None:
      theirs_seconds, theirs = run_original(model, x, y, eps)
      row.update(theirs=theirs_seconds,
                 theirs_acc=tuple(theirs.mean(axis=1)),
                 only_ours=int((ours[-1] & ~theirs[-1]).sum()),
                 only_theirs=int((theirs[-1] & ~ours[-1]).sum()))
    print(row, flush=True)
    rows.append(row)
  return rows


def main(argv):
  del argv
  if _THEIRS.value:
    scripts.require("torch", "torchattacks")
  sizes = [int(v) for v in _POINTS.value]
  print(f"AutoAttack standard, L-inf eps {_EPS.value}, MNIST, {jax.devices()[0].platform}; "
        f"ours: attacks.evaluate, batch {_BATCH.value}, compilation included")
  rows = [row for name in _MODELS.value for row in run_model(name, sizes)]
  header = (f"{'model':>10} {'points':>6} {'ours s':>7} {'original s':>10} {'floor s':>8} "
            f"{'orig/ours':>9} {'robust after each stage: ours':>32} {'original':>26} "
            f"{'robust only for':>16}")
  print(header)
  print("-" * len(header))
  for r in rows:
    ours_acc = " ".join(f"{a:.3f}" for a in r["ours_acc"])
    theirs = r.get("theirs")
    theirs_acc = " ".join(f"{a:.3f}" for a in r["theirs_acc"]) if theirs else "-"
    ratio = f"{theirs / r['ours']:.2f}" if theirs else "-"
    only = f"ours {r['only_ours']}, orig {r['only_theirs']}" if theirs else "-"
    print(f"{r['model']:>10} {r['n']:>6} {r['ours']:>7.1f} {theirs or float('nan'):>10.1f} "
          f"{r['floor']:>8.1f} {ratio:>9} {ours_acc:>32} {theirs_acc:>26} {only:>16}")


if __name__ == "__main__":
  scripts.run(main)

"""Points the branch-and-bound attack breaks after PGD, MultiTargeted and AutoAttack fail.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.bab_attack_strength \\
        --model=cnn_small --train_eps=0.3 --eps=0.3 --num_points=100

A network of `benchmarks.nets` trained with PGD (``--train_eps``, 10 steps) on
MNIST, or a training run's latest checkpoint (``--workdir``, a run of
``python -m training.train``); its first ``--num_points`` test points at L-inf ``--eps``. PGD-100,
MultiTargeted (5 restarts x 200 steps) and AutoAttack (standard) run in turn on
the points the previous ones left robust; `verify.bab_attack` then runs on the
survivors (``--time_limit`` seconds each). Prints the robust counts after each
stage and how many survivors the branch-and-bound attack broke or proved.
"""

from __future__ import annotations

import os
import time

from absl import flags
import jax
import numpy as np

import attacks
import robustlib
import verify
from benchmarks import nets
from robustlib import checkpoints, data, scripts

_MODEL = flags.DEFINE_enum("model", "cnn_small", list(nets.ARCHITECTURES),
                           "A benchmarks.nets network.")
_TRAIN_EPS = flags.DEFINE_float("train_eps", 0.3, "PGD training radius.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 6000, "Training steps.")
_RAMP_STEPS = flags.DEFINE_integer("ramp_steps", 2000,
                                   "Steps over which the training radius grows from 0.")
_EPS = flags.DEFINE_float("eps", 0.3, "L-inf radius of the evaluation.")
_POINTS = flags.DEFINE_integer("num_points", 100, "First MNIST test points.")
_TIME = flags.DEFINE_float("time_limit", 120.0, "Seconds of bab_attack per survivor.")
_HARDEST = flags.DEFINE_integer(
    "hardest", 0, "Run bab_attack only on this many survivors, those of least margin at "
    "PGD-100's points (0: every survivor).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training run whose latest checkpoint is attacked (instead of "
    "training a --model).")
_PARAMS = flags.DEFINE_string(
    "params", None, "An .npz of the trained weights: loaded when it exists, else written "
    "after training.")


def _trained() -> nets.Params:
  path = _PARAMS.value
  if path and os.path.exists(path):
    with np.load(path) as z:
      return [(z[f"w{i}"], z[f"b{i}"]) for i in range(len(z.files) // 2)]
  params = nets.train(_MODEL.value,
                      _TRAIN_STEPS.value,
                      adversarial_eps=_TRAIN_EPS.value,
                      pgd_steps=10,
                      ramp_steps=_RAMP_STEPS.value)
  if path:
    arrays = {f"{n}{i}": a for i, wb in enumerate(params) for n, a in zip("wb", wb)}
    np.savez(path + ".tmp.npz", **arrays)  # then renamed: never a half-written file
    os.replace(path + ".tmp.npz", path)
  return params


def _network():
  """``(logits_fn, x, y, description)``: the run's or the trained benchmark network's."""
  if _WORKDIR.value:
    config, model, variables = checkpoints.load_run(_WORKDIR.value)
    ds = data.load(config["dataset"], "test", data_dir=config.get("data_dir") or None)
    name = f"{config['model']} ({config['method']} at {config['robust']['eps']:g}, run)"
    return (robustlib.as_logits_fn(model, variables), ds.images[:_POINTS.value],
            ds.labels[:_POINTS.value], name)
  x, y = nets.mnist_nchw("test", _POINTS.value)
  return (nets.logits_fn(_MODEL.value,
                         _trained()), x, y, f"{_MODEL.value} PGD-trained at {_TRAIN_EPS.value:g}")


def main(argv):
  del argv
  scripts.setup_logging()
  fn, x, y, name = _network()
  eps, key = _EPS.value, jax.random.key(0)
  robust = np.asarray(fn(x)).argmax(axis=1) == y
  print(f"{name}, L-inf {eps:g}, {len(y)} points")
  print(f"{'stage':<28} {'robust':>7} {'seconds':>8}")
  print(f"{'clean':<28} {int(robust.sum()):>7}")
  stages = [("pgd-100", attacks.pgd(eps=eps, steps=100)),
            ("multitargeted 5x200", attacks.multitargeted(eps=eps, steps=200, restarts=5)),
            ("autoattack", attacks.autoattack(eps=eps))]
  for name, attack in stages:
    start = time.time()
    idx = np.flatnonzero(robust)
    if idx.size:
      report = attacks.evaluate(fn,
                                x[idx],
                                y[idx],
                                attack,
                                eps=eps,
                                key=key,
                                progress=False,
                                run_diagnostics=False)
      robust[idx] = report.robust_flags[0]
    print(f"{name:<28} {int(robust.sum()):>7} {time.time() - start:8.1f}", flush=True)
  left = int(robust.sum())
  todo = robust.copy()
  if 0 < _HARDEST.value < left:
    x_adv = stages[0][1](fn, x, y, key)
    logits = np.asarray(fn(x_adv))
    others = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits)
    margin = np.where(robust, logits[np.arange(len(y)), y] - others.max(axis=1), np.inf)
    todo = np.zeros_like(robust)
    todo[np.argsort(margin)[:_HARDEST.value]] = True
    print(f"bab_attack on the {_HARDEST.value} survivors of least PGD-100 margin "
          f"({', '.join(f'{m:.2f}' for m in np.sort(margin)[:_HARDEST.value])})")
  start = time.time()
  stage = verify.bab_attack_examples(fn, x, y, eps, todo, key, _TIME.value)
  print(f"{'bab_attack':<28} {left - stage['broken']:>7} {time.time() - start:8.1f}")
  print(f"bab_attack broke {stage['broken']} of the {stage['examples']} points it ran on "
        f"(of the {left} the three attacks left robust), and proved {stage['verified']}")


if __name__ == "__main__":
  scripts.run(main)

"""What robustlib's jitted programs reach on whatever backend is present.

    python -m benchmarks.accelerator                      # MLP, small CNN, CNN7, PreAct ResNet-18
    python -m benchmarks.accelerator --small              # CI size: two small models, seconds on CPU

For each model (random weights; MNIST-shaped inputs for the MLP and the small CNN,
CIFAR-shaped for CNN7 and PreAct ResNet-18) it times, interleaved in one run:
a forward+backward pass, PGD-10 and PGD-40 with the attacks' fast input-gradients
on and off (`robustlib.backend`: ``fast_gradients``), IBP and CROWN-IBP bounds, a
certified-training (IBP) step and a PGD-AT step (PGD-10 inside), and prints
images/s, the FLOP rate XLA's cost analysis gives for the compiled program,
and that rate as a fraction of the device's matrix-product peak measured in the
same run (a large ``jnp.dot`` at the default precision). When PyTorch and
torchattacks are installed, torchattacks' PGD-10 runs on the same weights (the
``benchmarks.nets`` MLP and small CNN) on PyTorch's default device beside
``attacks.pgd``.

The ``--fast_paths`` column of `robustlib.backend`'s table is what a backend
should default to: a fast path belongs in a backend's defaults only where its
rows here are faster than the plain ones.
"""

from __future__ import annotations

import contextlib
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import attacks
from benchmarks import nets
from robustlib import backend
from robustlib import compilation
from robustlib import models
from robustlib import scripts
import verify
from training import methods
from training import optim
from training import state as state_lib
from training import steps
from training.configs import default

MODELS = {  # name: input shape (H, W, C)
    "mlp": (28, 28, 1),
    "cnn_small": (28, 28, 1),
    "cnn7": (32, 32, 3),
    "preact_resnet18": (32, 32, 3),
}
_MODELS = scripts.define_names("models", list(MODELS), MODELS, "Models.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each program; the median is kept.")
_EPS = flags.DEFINE_float("eps", 2 / 255, "L-inf radius of the attacks and bounds.")
_SMALL = flags.DEFINE_bool(
    "small", False, "CI size: the MLP and the small CNN, batch 8, one repeat, PGD-2 and PGD-4.")
_MATMUL = flags.DEFINE_integer("matmul_size", 4096, "Side of the square product timing the peak.")


@contextlib.contextmanager
def fast_paths(setting: str | None):
  """``$ROBUSTLIB_FAST_PATHS`` set to ``setting`` while programs are traced (None: as it is)."""
  old = os.environ.get(backend.ENV)
  if setting is not None:
    os.environ[backend.ENV] = setting
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(backend.ENV, None)
    else:
      os.environ[backend.ENV] = old


def compiled(fn, *args, setting: str | None = None):
  """``(run, flops)``: ``fn(*args)`` compiled once under ``setting``, and its FLOPs per call."""
  with fast_paths(setting):
    exe = compilation.jit(fn).lower(*args).compile()
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (lambda: jax.block_until_ready(exe(*args))), float((cost or {}).get("flops", 0.0))


def matmul_peak(n: int) -> float:
  """FLOP/s of an ``[n, n] @ [n, n]`` float32 product at the default precision."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  run, _ = compiled(jnp.dot, a, a)
  seconds = nets.interleaved_medians({"dot": run}, 3)["dot"]
  return 2.0 * n**3 / seconds


def train_step(model, input_shape, method: str, attack_steps: int, batch):
  """A jitted step of ``method`` (as `training.trainer` builds it) and its state."""
  config = default.get_config()
  robust = config.robust
  robust.eps, robust.attack_steps = _EPS.value, attack_steps
  robust.kappa_start = robust.kappa_end = 0.0  # the robust term at full weight
  tx = optim.make_optimizer(config.optimizer, 1000)
  state = state_lib.create(model, tx, jax.random.key(0), input_shape)
  step = steps.make_train_step(model.apply, tx, methods.make_loss(method, robust))
  return step, state


def programs(name: str, batch: int, pgd_steps: tuple[int, int]) -> dict:
  """The timed programs of one model: ``{row: (run, flops)}``."""
  shape = MODELS[name]
  model = models.create(name, num_classes=10, input_shape=shape)
  variables = models.init(model, jax.random.key(0), shape)
  x = jax.random.uniform(jax.random.key(1), (batch,) + shape)
  y = jnp.arange(batch) % 10
  key = jax.random.key(2)
  logits_fn = lambda v: model.apply(variables, v)

  def fwd_bwd(p, v):  # the loss and its gradient with respect to the parameters
    return jax.value_and_grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({
            **variables, "params": q
        }, v), y).mean())(p)

  rows = {"forward+backward": compiled(fwd_bwd, variables["params"], x)}
  for k in pgd_steps:
    for on in (True, False):
      attack = attacks.pgd(eps=_EPS.value, steps=k, step_size=_EPS.value / 4)
      rows[f"PGD-{k} fast {'on' if on else 'off'}"] = compiled(
          lambda v, t, r, a=attack: a(logits_fn, v, t, r),
          x,
          y,
          key,
          setting=f"fast_gradients={'on' if on else 'off'}")
  box = verify.linf_ball(x, _EPS.value)
  rows["IBP"] = compiled(lambda b: verify.ibp(logits_fn, b), box)
  rows["CROWN-IBP"] = compiled(lambda b: verify.crown_ibp(logits_fn, b), box)
  for row, method, k in (("IBP train step", "ibp", 0), (f"PGD-{pgd_steps[0]} AT step", "pgd",
                                                        pgd_steps[0])):
    step, state = train_step(model, shape, method, max(k, 1), (x, y))
    rows[row] = compiled(step, state, (x, y))
  return rows


def torch_pgd(name: str, batch: int, k: int):
  """``{row: (run, flops)}`` of torchattacks' and our PGD-``k`` on the same `benchmarks.nets`
  weights, or {} without PyTorch and torchattacks."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchattacks  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {}
  if name not in nets.ARCHITECTURES:
    return {}
  params = nets.init_params(name, jax.random.key(0))
  x_np = np.asarray(jax.random.uniform(jax.random.key(1), (batch, 1, 28, 28)))
  y_np = np.arange(batch) % 10
  device = "cuda" if torch.cuda.is_available() else "cpu"
  module = nets.torch_module(name, params).to(device)
  xt = torch.from_numpy(x_np).to(device)
  yt = torch.from_numpy(y_np.astype(np.int64)).to(device)
  theirs = torchattacks.PGD(module,
                            eps=_EPS.value,
                            alpha=_EPS.value / 4,
                            steps=k,
                            random_start=False)

  def run_theirs():
    out = theirs(xt, yt)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  fn = nets.logits_fn(name, params)
  ours = attacks.pgd(eps=_EPS.value, steps=k, step_size=_EPS.value / 4, random_start=False)
  run_ours, flops = compiled(lambda v, t: ours(fn, v, t, jax.random.key(0)), jnp.asarray(x_np),
                             jnp.asarray(y_np))
  return {
      f"PGD-{k} nets.{name}, robustlib": (run_ours, flops),
      f"PGD-{k} nets.{name}, torchattacks ({device})": (run_theirs, flops),
  }


def main(argv):
  del argv
  small = _SMALL.value
  names = [n for n in _MODELS.value if not small or n in ("mlp", "cnn_small")]
  batch = 8 if small else _BATCH.value
  repeats = 1 if small else _REPEATS.value
  pgd_steps = (2, 4) if small else (10, 40)
  device = jax.devices()[0]
  peak = matmul_peak(512 if small else _MATMUL.value)
  print(f"{device.platform} ({device.device_kind}), {len(jax.devices())} device(s), batch {batch}, "
        f"median of {repeats}; fast paths by default: {backend.fast_paths()}")
  print(f"matrix-product peak: {peak / 1e9:.1f} GFLOP/s")
  header = f"{'model':<16} {'program':<40} {'img/s':>10} {'GFLOP/s':>9} {'of peak':>8}"
  lines = []
  for name in names:
    rows = programs(name, batch, pgd_steps)
    rows.update(torch_pgd(name, batch, pgd_steps[0]))
    seconds = nets.interleaved_medians({row: run for row, (run, _) in rows.items()}, repeats)
    for row, (_, flops) in rows.items():
      rate = flops / seconds[row]
      line = (f"{name:<16} {row:<40} {batch / seconds[row]:>10.1f} {rate / 1e9:>9.2f} "
              f"{rate / peak:>8.1%}")
      lines.append(line)
      print(line, flush=True)
  print(header)
  print("\n".join(lines))


if __name__ == "__main__":
  scripts.run(main)

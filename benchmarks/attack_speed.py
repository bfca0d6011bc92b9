"""PGD speed against torchattacks, on the same weights and the same points.

    pip install -e ".[bench]"
    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.attack_speed --models=mlp,cnn_small

For each network (trained briefly on MNIST, weights copied to PyTorch) it runs
L-inf PGD (no random start, so both libraries walk the same path) with
torchattacks and with ``attacks.pgd`` and prints, from one run: images/s of each
and their ratio, the robust accuracy each leaves (they must agree; ours keeps the
best iterate, so it can only be lower), and our attack time divided by
``steps`` x one jitted forward+backward pass (the overhead ratio: 1.0 means the
attack costs exactly its gradient evaluations).

It also times the attack's floor on this machine: ``steps`` forward and
input-gradient passes of the network's linear operations alone (activations
removed, convolutions with the attack's prepared transposes), in one jitted
loop. No attack built on these matrix products and convolutions runs faster,
so torchattacks' time over the floor is the highest ratio reachable here.
"""

from __future__ import annotations

import functools
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import attacks
from benchmarks import nets
from robustlib import compilation
from robustlib import fastgrad
from robustlib import scripts

_MODELS = scripts.define_names("models", ["mlp", "cnn_small"], nets.ARCHITECTURES,
                               "Networks in benchmarks.nets.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per attack call.")
_EPS = flags.DEFINE_float("eps", 0.1, "L-inf radius.")
_STEPS = flags.DEFINE_integer("steps", 40, "PGD steps.")
_ALPHA = flags.DEFINE_float("step_size", 0.01, "PGD step size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "Adam steps to train each network.")


def run_model(name: str) -> dict[str, float]:
  import torch  # pylint: disable=import-outside-toplevel
  import torchattacks  # pylint: disable=import-outside-toplevel

  params = nets.train(name, _TRAIN_STEPS.value)
  x_np, y_np = nets.mnist_nchw("test", _BATCH.value)
  fn = nets.logits_fn(name, params)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  key = jax.random.key(0)
  eps, steps, alpha = _EPS.value, _STEPS.value, _ALPHA.value

  attack = attacks.pgd(eps=eps, steps=steps, step_size=alpha, random_start=False)
  jitted = compilation.jit(functools.partial(attack, fn))
  grad = compilation.jit(
      jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(fn(z), y).sum()))
  floor = compilation.jit(
      functools.partial(linear_floor,
                        nets.logits_fn(name, params, activation=lambda h: h),
                        steps=steps))
  model = nets.torch_module(name, params)
  xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np.astype(np.int64))
  pgd_t = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
  seconds = nets.interleaved_medians(
      {
          "checked": lambda: jax.block_until_ready(attack(fn, x, y, key)),
          "jit": lambda: jax.block_until_ready(jitted(x, y, key)),
          "fwd_bwd": lambda: jax.block_until_ready(grad(x)),
          "floor": lambda: jax.block_until_ready(floor(x)),
          "theirs": lambda: pgd_t(xt, yt),
      }, _REPEATS.value)
  x_adv = jitted(x, y, key)
  ours_acc = float(jnp.mean(jnp.argmax(fn(x_adv), axis=1) == y))
  x_adv_t = pgd_t(xt, yt)
  with torch.no_grad():
    theirs_acc = float((model(x_adv_t).argmax(1) == yt).float().mean())
    clean = float((model(xt).argmax(1) == yt).float().mean())
  n = _BATCH.value
  return {
      "clean": clean,
      "ours_ips": n / seconds["jit"],
      "ours_checked_ips": n / seconds["checked"],
      "theirs_ips": n / seconds["theirs"],
      "ours_acc": ours_acc,
      "theirs_acc": theirs_acc,
      "overhead": seconds["jit"] / (steps * seconds["fwd_bwd"]),
      "floor_ips": n / seconds["floor"],
  }


def linear_floor(linear_fn, x: jax.Array, steps: int) -> jax.Array:
  """``steps`` forward and input-gradient passes of ``linear_fn`` in one loop (the attack's floor).

  Each pass's cotangent is its own output and its gradient moves the next
  point, so XLA can neither drop nor hoist any of them.
  """
  fn = fastgrad.prepare(linear_fn, x)

  def body(_, z):
    logits, vjp = jax.vjp(fn, z)
    (g,) = vjp(logits)
    return z + 1e-6 * g

  return jax.lax.fori_loop(0, steps, body, x)


def main(argv):
  del argv
  scripts.require("torch", "torchattacks")
  print(f"L-inf PGD-{_STEPS.value}, eps {_EPS.value}, step {_ALPHA.value}, batch "
        f"{_BATCH.value}, no random start; {jax.devices()[0].platform}, median of "
        f"{_REPEATS.value} interleaved runs")
  rows = []
  for name in _MODELS.value:
    r = run_model(name)
    rows.append((name, r))
  print(f"{'model':>10} {'ours img/s':>11} {'(checked)':>10} {'torchattacks':>13} {'ratio':>6} "
        f"{'clean':>6} {'robust ours':>12} {'theirs':>7} {'overhead':>9} {'floor img/s':>12} "
        f"{'reachable':>10}")
  for name, r in rows:
    print(f"{name:>10} {r['ours_ips']:>11.0f} {r['ours_checked_ips']:>10.0f} "
          f"{r['theirs_ips']:>13.0f} {r['ours_ips'] / r['theirs_ips']:>6.2f} {r['clean']:>6.3f} "
          f"{r['ours_acc']:>12.3f} {r['theirs_acc']:>7.3f} {r['overhead']:>9.2f} "
          f"{r['floor_ips']:>12.0f} {r['floor_ips'] / r['theirs_ips']:>10.2f}")


if __name__ == "__main__":
  scripts.run(main)

"""Training throughput (images/s) of a jitted train step on MNIST-shaped data.

    python -m benchmarks.train_throughput --model=cnn_small --batch_sizes=32,128,256
    python -m benchmarks.train_throughput --methods=standard,pgd,ibp,crown_ibp --batch_sizes=128

With several ``--methods`` (robust training at ``--eps``, PGD-``--attack_steps``
inside the step) each row also gives the ratio to standard training.

Times the same train step the training loop runs (forward, backward, Adam update,
compiled once), excluding compilation, on synthetic 28x28x1 images. When PyTorch
is installed (``pip install -e ".[bench]"``) the same architecture and update are
timed in PyTorch in the same run, so the ratio is measured under the same load.
"""

import statistics
import time

import jax
from absl import flags

from robustlib import compilation
from robustlib import data, models, parallel, scripts
from training import methods, optim, state as state_lib, steps
from training.configs import default

_MODEL = flags.DEFINE_enum("model", "cnn_small", sorted(models.MODELS),
                           "Model name in robustlib.models.")
_DATASET = flags.DEFINE_string("dataset", "synthetic:mnist", "Data set (shape source).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "128", "256"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats; the median is reported.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch when it is installed.")
_METHODS = scripts.define_names("methods", ["standard"], methods.METHODS,
                                "Training methods (training.methods).")
_EPS = flags.DEFINE_float("eps", 0.1, "Training radius of the robust methods.")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 10, "PGD steps of pgd/trades training.")


def time_jax(model_name: str,
             dataset: str,
             batch_size: int,
             num_steps: int,
             repeats: int,
             method: str = "standard") -> tuple[float, float]:
  """Returns (median images/s, compile seconds) of the jitted train step."""
  train = data.load(dataset, "train")
  info = train.info
  model = models.create(model_name,
                        num_classes=info.num_classes,
                        input_shape=info.input_shape,
                        mean=info.mean,
                        std=info.std)
  opt_cfg = default.get_config().optimizer
  tx = optim.make_optimizer(opt_cfg, num_steps * repeats)
  mesh = parallel.make_mesh()
  rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  state = jax.device_put(state_lib.create(model, tx, jax.random.PRNGKey(0), info.input_shape), rep)
  robust = default.get_config().robust
  robust.eps, robust.attack_steps = _EPS.value, _ATTACK_STEPS.value
  # The full robust loss at every timed step: CROWN-IBP bounds at full weight (not the
  # end of a ramp, where beta = 0 leaves only IBP), no clean-loss share.
  robust.beta_start = robust.beta_end = 1.0
  robust.kappa_start = robust.kappa_end = 0.0
  loss = methods.make_loss(method, robust)
  step = compilation.jit(steps.make_train_step(model.apply, tx, loss),
                         in_shardings=(rep, shard),
                         out_shardings=(rep, rep),
                         donate_argnums=0)
  batches = data.batches(train, batch_size, seed=0, sharding=shard)
  batch = next(batches)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    rates.append(num_steps * batch_size / (time.perf_counter() - start))
  return statistics.median(rates), compile_s


def time_torch(model_name: str, batch_size: int, num_steps: int, repeats: int):
  """Median images/s of the same model and Adam step in PyTorch, or None."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  nn = torch.nn
  if model_name != "cnn_small":
    return None
  net = nn.Sequential(nn.Conv2d(1, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4), nn.ReLU(),
                      nn.Flatten(), nn.Linear(3200, 100), nn.ReLU(), nn.Linear(100, 10))
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  x = torch.rand(batch_size, 1, 28, 28)
  y = torch.randint(0, 10, (batch_size,))
  loss_fn = nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net((x - 0.1307) / 0.3081), y)
    loss.backward()
    opt.step()

  step()
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(num_steps):
      step()
    rates.append(num_steps * batch_size / (time.perf_counter() - start))
  return statistics.median(rates)


def main(argv):
  del argv
  print(f"train-step throughput: {_MODEL.value} on {_DATASET.value}, "
        f"{len(jax.devices())} x {jax.devices()[0].platform}, median of {_REPEATS.value}")
  many = len(_METHODS.value) > 1
  header = f"{'method':>10} {'batch':>6} {'robustlib img/s':>16} {'compile s':>10}"
  use_torch = not many and _TORCH.value and time_torch(_MODEL.value, 2, 1, 1) is not None
  if use_torch:
    header += f" {'pytorch img/s':>14} {'ratio':>6}"
  if many:
    header += f" {'vs standard':>12}"
  rows = []
  for bs in map(int, _BATCH_SIZES.value):
    base = None
    for method in _METHODS.value:
      rate, compile_s = time_jax(_MODEL.value, _DATASET.value, bs, _STEPS.value, _REPEATS.value,
                                 method)
      base = rate if method == "standard" else base
      row = f"{method:>10} {bs:>6} {rate:>16.0f} {compile_s:>10.2f}"
      if use_torch:
        torch_rate = time_torch(_MODEL.value, bs, _STEPS.value, _REPEATS.value)
        row += f" {torch_rate:>14.0f} {rate / torch_rate:>6.2f}"
      if many:
        row += f" {rate / base:>12.3f}" if base else f" {'':>12}"
      rows.append(row)
      print(row, flush=True)
  print(header)
  print("\n".join(rows))


if __name__ == "__main__":
  scripts.run(main)

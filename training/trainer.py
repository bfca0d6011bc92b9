"""``train_and_evaluate(config, workdir)``: the training loop.

One jitted train step, compiled once, runs data-parallel over a mesh of the local
devices; checkpoints make a killed run resume exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import verify
from robustlib import checkpoints, data, evaluation, models, parallel
from robustlib import compilation
from training import methods, optim, robustness, state as state_lib, steps
from training.configs import default
from training.logbook import Logbook, Progress

REPORT_FILE = "report.json"
ROBUSTNESS_PLOT = "robustness.png"


class ConfigError(ValueError):
  """A training config has an unknown field or an invalid value."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for fields the default config does not have, or bad values."""
  _check_fields(config.to_dict(), default.get_config().to_dict(), "")
  try:
    methods.check(config.robust, config.method, config.num_steps)
  except ValueError as e:
    raise ConfigError(f"config: {e}") from None
  if config.dtype not in steps.DTYPES:
    raise ConfigError(f"config.dtype must be one of {steps.DTYPES}, got {config.dtype!r}")
  for field in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
                "eval_batch_size", "keep_checkpoints"):  # keeping 0 checkpoints would delete each
    if int(config[field]) <= 0:
      raise ConfigError(f"config.{field} must be positive, got {config[field]}")
  unknown = set(config.report.verify_methods) - set(verify.METHODS)
  if unknown:
    raise ConfigError(f"config.report.verify_methods: unknown {sorted(unknown)}; choose from "
                      f"{verify.METHODS}")
  if int(config.report.pgd_steps) < 1 or int(config.report.num_examples) < 0:
    raise ConfigError("config.report.pgd_steps must be >= 1 and num_examples >= 0, got "
                      f"{config.report.pgd_steps} and {config.report.num_examples}")
  if not float(config.report.bab_attack_time) >= 0:
    raise ConfigError(f"config.report.bab_attack_time must be seconds >= 0 (0: no "
                      f"bab_attack), got {config.report.bab_attack_time}")
  if any(float(f) < 0 for f in config.report.sweep):
    raise ConfigError(f"config.report.sweep must hold radii >= 0, got {config.report.sweep}")
  try:
    optim.make_optimizer(config.optimizer, config.num_steps)
  except ValueError as e:
    raise ConfigError(f"config.optimizer: {e}") from None
  try:
    data.make_augment(config.augment.crop_padding, config.augment.flip)
  except ValueError as e:
    raise ConfigError(f"config.augment: {e}") from None


def _check_fields(given: dict, known: dict, prefix: str) -> None:
  for key, value in given.items():
    if key not in known:
      raise ConfigError(f"unknown config field {prefix + key!r}; known fields here: "
                        f"{', '.join(sorted(known))}")
    if isinstance(value, dict) and known[key] and isinstance(known[key], dict):
      _check_fields(value, known[key], f"{prefix}{key}.")


def _load_data(config):
  data_dir = config.data_dir or None
  train = data.load(config.dataset, "train", data_dir=data_dir)
  test = data.load(config.dataset, "test", data_dir=data_dir)
  if config.num_eval_examples:
    test = data.Dataset(test.images[:config.num_eval_examples],
                        test.labels[:config.num_eval_examples], test.info)
  return train, test


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured model, evaluating and checkpointing along the way.

  Re-running with the same ``workdir`` after an interruption resumes from the
  last checkpoint and produces the same final parameters as an uninterrupted run.

  Args:
    config: a config built from ``training/configs/default.py``.
    workdir: where ``config.json``, ``checkpoints/``, ``metrics.jsonl``,
      ``curves.png`` and ``report.json`` go.

  Returns:
    The report dict also written to ``workdir/report.json``.
  """
  validate_config(config)
  main_process = jax.process_index() == 0  # only one process writes files
  if main_process:
    checkpoints.write_config(workdir, config.to_dict())
  train, test = _load_data(config)
  info = train.info
  model = models.create(config.model,
                        num_classes=info.num_classes,
                        input_shape=info.input_shape,
                        mean=info.mean,
                        std=info.std,
                        **config.model_kwargs.to_dict())

  try:
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_divisible(config.batch_size, mesh, "config.batch_size")
    parallel.check_divisible(config.eval_batch_size, mesh, "config.eval_batch_size")
  except ValueError as e:  # what the config asks of this machine's devices
    raise ConfigError(str(e)) from None
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)

  tx = optim.make_optimizer(config.optimizer, config.num_steps)
  state = state_lib.create(model,
                           tx,
                           jax.random.PRNGKey(config.seed),
                           info.input_shape,
                           ema=config.robust.ema_decay > 0)
  if config.robust.ibp_init:
    params = methods.ibp_init(state.params, jax.random.PRNGKey(config.seed + 2))
    # The average starts from the re-drawn weights, in buffers of its own (the step donates both).
    ema = jax.tree.map(jnp.copy, params) if state.ema_params else {}
    state = state.replace(params=params, ema_params=ema)
  state = jax.device_put(state, replicated)
  mngr = checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  restored = checkpoints.restore(mngr, state)
  if restored is not None:
    state = restored
    logging.info("Resuming from step %d of %s", int(state.step), workdir)
    saved = checkpoints.saved_device_count(mngr, int(state.step))
    if saved is not None and saved != mesh.devices.size:
      logging.warning(
          "the checkpoint was saved on %d devices and resumes on %d: the global batches and "
          "their order are unchanged, the sums over devices may round differently", saved,
          mesh.devices.size)
  start_step = int(state.step)

  augment = data.make_augment(config.augment.crop_padding, config.augment.flip)

  def jitted_step(with_auxiliary: bool):
    loss = methods.make_loss(config.method, config.robust, with_auxiliary)
    step = steps.make_train_step(steps.mixed_precision(model.apply, config.dtype), tx, loss,
                                 config.robust.ema_decay, augment)
    return compilation.jit(step,
                           in_shardings=(replicated, sharded),
                           out_shardings=(replicated, replicated),
                           donate_argnums=0)

  # Where the method has a scheduled auxiliary term, two steps (each compiled on first use)
  # and the host picks one per step: no conditional inside the differentiated program.
  auxiliary = methods.auxiliary_steps(config.method, config.robust, config.num_steps)
  train_steps = {True: jitted_step(True)}
  if auxiliary is not None:
    train_steps[False] = jitted_step(False)
  logbook = Logbook(workdir, start_step, enabled=main_process)
  progress = Progress(start_step, config.num_steps, config.batch_size)

  def eval_apply(variables, x):
    return model.apply(variables, x, train=False)

  def evaluate(st) -> float:
    return evaluation.accuracy(eval_apply,
                               test.images,
                               test.labels,
                               params=st.eval_variables(),
                               batch_size=config.eval_batch_size,
                               sharding=sharded,
                               progress=False)

  batches = data.batches(train,
                         config.batch_size,
                         seed=config.seed,
                         start_step=start_step,
                         sharding=sharded)
  pending, test_acc = [], None
  start_time = time.perf_counter()
  for step in range(start_step + 1, config.num_steps + 1):
    train_step = train_steps[auxiliary is None or bool(auxiliary[step - 1])]
    state, metrics = train_step(state, next(batches))
    pending.append(metrics)
    if step % config.log_every == 0 or step == config.num_steps:
      host = jax.device_get(pending)  # metrics leave the device only here
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      pending = []
      logbook.write(step, "train", mean)
      progress.line(step, mean)
    if step % config.eval_every == 0 or step == config.num_steps:
      test_acc = evaluate(state)
      logbook.write(step, "test", {"accuracy": test_acc})
      logging.info("step %d: test accuracy %.4f", step, test_acc)
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      checkpoints.save(mngr, step, state)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start_time
  if test_acc is None:  # nothing left to train: the run had already finished
    test_acc = evaluate(state)

  report = {
      "dataset":
          config.dataset,
      "model":
          config.model,
      "method":
          config.method,
      "steps":
          int(state.step),
      "resumed_from_step":
          start_step,
      "seconds":
          round(seconds, 2),
      "images_per_second":
          round((config.num_steps - start_step) * config.batch_size / max(seconds, 1e-9), 1),
      "num_devices":
          int(mesh.devices.size),
      "test_accuracy":
          evaluate(state),
      "num_test_examples":
          len(test),
  }
  eval_eps = float(config.robust.eval_eps or config.robust.eps)
  if eval_eps > 0 and config.report.enabled:
    report.update(_robustness(config, eval_apply, state, test, eval_eps, workdir, main_process))
  if main_process:
    logbook.plot(f"{config.model} on {config.dataset}")
    _write_report(workdir, report)
    print(format_report(report))
  return report


def _robustness(config, eval_apply, state, test, eps: float, workdir: str,
                main_process: bool) -> dict:
  """The robustness report (`training.robustness`) of the evaluated weights (printed and
  plotted by the main process)."""
  n = config.report.num_examples or len(test)
  variables = state.eval_variables()
  result = robustness.robustness_report(
      lambda z: eval_apply(variables, z),
      test.images[:n],
      test.labels[:n],
      eps,
      key=jax.random.PRNGKey(config.seed + 1),
      sweep=[f * eps for f in config.report.sweep],
      verify_methods=tuple(config.report.verify_methods),
      pgd_steps=config.report.pgd_steps,
      autoattack=config.report.autoattack,
      batch_size=config.eval_batch_size,
      bab_attack_time=config.report.bab_attack_time,
      plot_path=os.path.join(workdir, ROBUSTNESS_PLOT) if main_process else None)
  if main_process:
    print(robustness.format_table(result))
  result["report_seconds"] = result.pop("seconds")  # "seconds" is the training's own time
  return result


def _write_report(workdir: str, report: dict) -> None:
  path = os.path.join(workdir, REPORT_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)


def format_report(report: dict) -> str:
  """The report as a two-column table."""
  width = max(len(k) for k in report)
  lines = [f"{'field':<{width}}  value", "-" * (width + 20)]
  for key, value in report.items():
    if key == "sweep":  # curves: in report.json and the plot
      continue
    if isinstance(value, dict):
      shown = ", ".join(f"{k} {v:.4f}" for k, v in value.items())
    else:
      shown = f"{value:.4f}" if isinstance(value, float) and key.endswith("accuracy") else value
    lines.append(f"{key:<{width}}  {shown}")
  return "\n".join(lines)

"""``train_and_evaluate(config, workdir)``: the training loop.

One jitted train step, compiled once, runs data-parallel over a mesh of the local
devices; checkpoints make a killed run resume exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import verify
from robustlib import batching, checkpoints, data, models, parallel
from robustlib import compilation
from training import extra_data, methods, optim, robustness, state as state_lib, steps, validation
from training.configs import default
from training.logbook import Logbook, Progress

REPORT_FILE = "report.json"
ROBUSTNESS_PLOT = "robustness.png"

# Fields a resumed run may change freely: they do not change the parameters it computes.
RESUME_NEUTRAL = ("data_dir", "num_devices", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "eval_batch_size", "num_eval_examples", "report",
                  "max_nonfinite_steps", "allow_config_change")


class ConfigError(ValueError):
  """A training config has an unknown field or an invalid value."""


class TrainingDiverged(RuntimeError):
  """``config.max_nonfinite_steps`` steps in a row were not finite; the run stopped."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for fields the default config does not have, or bad values."""
  _check_fields(config.to_dict(), default.get_config().to_dict(), "")
  try:
    methods.check(config.robust, config.method, config.num_steps)
  except ValueError as e:
    raise ConfigError(f"config: {e}") from None
  if not (isinstance(config.ensemble, int) and config.ensemble >= 1):
    raise ConfigError(f"config.ensemble must be a number of members >= 1 (1: one model), got "
                      f"{config.ensemble!r}")
  if not (isinstance(config.verifier_width, int) and config.verifier_width >= 0):
    raise ConfigError(f"config.verifier_width must be an integer >= 0, got "
                      f"{config.verifier_width!r}")
  if (config.method in methods.VERIFIER_METHODS) != (config.verifier_width > 0):
    raise ConfigError(f"config.verifier_width={config.verifier_width}: methods "
                      f"{methods.VERIFIER_METHODS} train a verifier of width > 0, the others "
                      f"none (0); method is {config.method!r}")
  if config.dtype not in steps.DTYPES:
    raise ConfigError(f"config.dtype must be one of {steps.DTYPES}, got {config.dtype!r}")
  for field in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
                "eval_batch_size", "keep_checkpoints",
                "max_nonfinite_steps"):  # keeping 0 checkpoints would delete each
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


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """``{"optimizer.learning_rate": (old, new), ...}``: the fields in which two configs (as
  plain values, tuples and lists alike) differ; ``history`` is not compared."""
  old, new = (_flat(json.loads(json.dumps({
      k: v for k, v in c.items() if k != "history"
  }))) for c in (old, new))
  return {
      k: (old.get(k), new.get(k))
      for k in sorted(old.keys() | new.keys())
      if old.get(k) != new.get(k)
  }


def _record_config(config: ml_collections.ConfigDict, workdir: str, main_process: bool) -> None:
  """Writes ``config.json``; on resume (the run has checkpoints) a change of any field
  outside `RESUME_NEUTRAL` is a ConfigError unless ``config.allow_config_change``, and
  every change is appended to the file's ``history``."""
  new = config.to_dict()
  steps_saved = checkpoints.saved_steps(workdir)
  if steps_saved and os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)):
    old = checkpoints.read_config(workdir)
    changes = config_changes(old, new)
    training = [k for k in changes if k.split(".")[0] not in RESUME_NEUTRAL]
    if training and not config.allow_config_change:
      listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in training)
      raise ConfigError(f"{workdir} holds a run with another config ({listed}); resuming would "
                        "mix the two. Use a new --workdir, or pass "
                        "--config.allow_config_change=True to resume with the changes")
    new["history"] = list(old.get("history", []))
    if changes:
      logging.warning("resuming with config changes: %s",
                      ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
      new["history"].append({
          "after_step": max(steps_saved),
          "changes": {
              k: list(v) for k, v in changes.items()
          }
      })
  if main_process:
    checkpoints.write_config(workdir, new)


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
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir!r} is a file, not a directory: give a new or a run's "
                      "directory")
  main_process = jax.process_index() == 0  # only one process writes files
  _record_config(config, workdir, main_process)
  train, test = _load_data(config)
  try:
    train, held_out = validation.split(train, int(config.validation.num_examples))
    train, extra = extra_data.prepare(config.extra,
                                      train,
                                      data_dir=config.data_dir or None,
                                      batch_size=config.eval_batch_size)
  except ValueError as e:
    raise ConfigError(f"config: {e}") from None
  info = train.info
  model = models.create(config.model,
                        ensemble=config.ensemble,
                        verifier_width=config.verifier_width,
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
    params = methods.ibp_init(state.params, jax.random.PRNGKey(config.seed + 2), skip=("verifier",))
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
    loss = methods.make_loss(config.method, config.robust, with_auxiliary, input_std=info.std)
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

  test_accuracy = batching.accuracy_fn(eval_apply,
                                       batch_size=config.eval_batch_size,
                                       sharding=sharded)  # compiled once per run

  def evaluate(st) -> float:
    return test_accuracy(test.images, test.labels, params=st.eval_variables())

  eval_eps = float(config.robust.eval_eps or config.robust.eps)
  validate = best = None
  if held_out is not None:
    validate = validation.make_validate(eval_apply,
                                        held_out,
                                        method=config.method,
                                        eps=eval_eps,
                                        pgd_steps=int(config.validation.pgd_steps),
                                        batch_size=config.eval_batch_size,
                                        key=jax.random.PRNGKey(config.seed + 3),
                                        sharding=sharded)
    selection = validation.selection_metric(config.method, eval_eps)
    if config.validation.keep_best:
      best = checkpoints.manager(workdir, max_to_keep=1, subdir=checkpoints.BEST_DIR)
    # The best so far of the steps this run keeps (the logbook holds those up to start_step).
    seen = [r for r in logbook.records if r["split"] == "validation"]
    best_value = max((r[selection] for r in seen), default=-1.0)

  if extra is None:
    batches = data.batches(train,
                           config.batch_size,
                           seed=config.seed,
                           start_step=start_step,
                           sharding=sharded)
  else:
    batches = data.mixed_batches(train,
                                 extra,
                                 config.batch_size,
                                 extra_data.extra_per_batch(config.extra, config.batch_size),
                                 seed=config.seed,
                                 start_step=start_step,
                                 sharding=sharded)
  pending, window, test_acc = [], [], None
  streak, deferred = 0, False  # consecutive non-finite steps seen
  saved_step = start_step if restored is not None else None
  start_time = time.perf_counter()
  for step in range(start_step + 1, config.num_steps + 1):
    train_step = train_steps[auxiliary is None or bool(auxiliary[step - 1])]
    state, metrics = train_step(state, next(batches))
    pending.append(metrics)
    last = step == config.num_steps
    log_now = step % config.log_every == 0 or last
    eval_now = step % config.eval_every == 0 or last
    save_now = step % config.checkpoint_every == 0 or last or deferred
    if not (log_now or eval_now or save_now):
      continue
    host = jax.device_get(pending)  # metrics leave the device only here
    pending = []
    window += host
    for m in host:
      streak = streak + 1 if m["nonfinite"] else 0
    diverged = streak >= config.max_nonfinite_steps
    if log_now or diverged:  # the skipped steps are logged before the run stops
      mean = _window_metrics(window)
      window = []
      logbook.write(step, "train", mean)
      progress.line(step, mean)
    if diverged:
      raise TrainingDiverged(
          f"steps {step - streak + 1}-{step} ({streak} in a row, config.max_nonfinite_steps="
          f"{config.max_nonfinite_steps}) had a non-finite loss, gradient or parameters and "
          "were skipped; the run stops. " +
          (f"The last checkpoint is step {saved_step} (none was written during the non-finite "
           "steps). " if saved_step is not None else "No checkpoint was written. ") +
          "Lower config.optimizer.learning_rate or "
          "set config.optimizer.grad_clip_norm, then resume with "
          "--config.allow_config_change=True")
    if eval_now:
      test_acc = evaluate(state)
      logbook.write(step, "test", {"accuracy": test_acc})
      logging.info("step %d: test accuracy %.4f", step, test_acc)
      if validate is not None:
        scores = validate(state.eval_variables())
        logbook.write(step, "validation", scores)
        logging.info("step %d: validation %s", step,
                     ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores[selection] > best_value:
          best_value = scores[selection]
          if best is not None:
            checkpoints.save(best, step, state, state.eval_fields())
    if save_now:
      # Never right after a non-finite step (unless it is the last): the next finite one is
      # saved instead, so a diverging run keeps its checkpoints from before.
      deferred = bool(streak) and not last
      if not deferred:
        checkpoints.save(mngr, step, state, state.eval_fields())
        saved_step = step
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
  if extra is not None:
    report.update(num_labeled_examples=len(train), num_extra_examples=len(extra))
  if validate is not None:
    chosen = [r for r in logbook.records if r["split"] == "validation"]
    top = max(chosen, key=lambda r: r[selection])  # the first of the best
    report.update(best_validation_step=top["step"], best_validation={selection: top[selection]})
  if eval_eps > 0 and config.report.enabled:
    report.update(
        _robustness(config, model, eval_apply, state, test, eval_eps, workdir, main_process))
  if main_process:
    logbook.plot(f"{config.model} on {config.dataset}")
    _write_report(workdir, report)
    print(format_report(report))
  return report


def _window_metrics(window: list[dict]) -> dict:
  """Means of the logged steps' metrics over the finite ones (NaN if none was), and
  ``nonfinite``: how many steps were skipped."""
  finite = [m for m in window if not m["nonfinite"]]
  mean = {
      k: float(np.mean([m[k] for m in finite])) if finite else float("nan")
      for k in window[0]
      if k != "nonfinite"
  }
  return mean | {"nonfinite": float(sum(m["nonfinite"] for m in window))}


def _robustness(config, model, eval_apply, state, test, eps: float, workdir: str,
                main_process: bool) -> dict:
  """The robustness report (`training.robustness`) of the evaluated weights (printed and
  plotted by the main process); a run with a learned verifier also reports what its duals
  certify (``pvt``), recomputed soundly."""
  n = config.report.num_examples or len(test)
  variables = state.eval_variables()
  logits_fn = lambda z: eval_apply(variables, z)
  certifiers = {}
  if config.verifier_width:
    verifier = lambda f: model.apply(variables, f, method="duals")
    certifiers["pvt"] = lambda x, y, e: verify.lagrangian_dual.certify(logits_fn, x, y, e, verifier)
  result = robustness.robustness_report(
      logits_fn,
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
      certifiers=certifiers,
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

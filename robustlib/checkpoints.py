"""Atomic, resumable checkpoints of pytrees (orbax), and loading a training run.

A run directory holds ``config.json`` (the run's configuration as plain values)
and ``checkpoints/<step>/`` (orbax writes each step to a temporary directory and
renames it when complete, so a killed run never leaves a half-written step).
A checkpoint restores onto any device count: the arrays are read into the
shardings of the restoring process (a target's, or one local device), not the
saving run's topology. A step that does not restore (a truncated file) or holds
non-finite values is skipped with a warning naming it and why, and the newest usable
one is taken; a resuming run moves such a step to ``checkpoints_unusable/`` (never
deletes it), so that it saves that step anew.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from robustlib import checks

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"  # the step of best validation accuracy (training.validation)
UNUSABLE_DIR = "checkpoints_unusable"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
  """A run directory or checkpoint is missing or unusable."""


def manager(workdir: str,
            *,
            max_to_keep: int | None = 2,
            read_only: bool = False,
            subdir: str = CHECKPOINT_DIR) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/checkpoints`` (or ``workdir/subdir``; saves are
  synchronous)."""
  directory = os.path.abspath(os.path.join(workdir, subdir))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory,
                               options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(mngr: ocp.CheckpointManager, step: int, tree: Any) -> None:
  """Saves ``tree`` as step ``step`` (an existing step is left as it is)."""
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.StandardSave(tree))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """Restores step ``step`` into the structure, shapes and shardings of ``target``;
  returns None when there is no checkpoint.

  Without ``step``, the newest usable step: newer ones that fail to restore or hold
  non-finite values are moved to ``checkpoints_unusable/`` with a warning (see
  `newest_usable`).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

  def restore_step(s):
    return mngr.restore(s, args=ocp.args.StandardRestore(abstract))

  if step is not None:
    return restore_step(step)
  found = newest_usable(mngr, restore_step, set_aside=True)
  return None if found is None else found[1]


def restore_on(mngr: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding) -> Any:
  """Restores step ``step`` as saved (its own structure, shapes and dtypes), every array
  placed with ``sharding`` whatever devices the saving run had."""
  metadata = mngr.item_metadata(step)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def _problem(restore_step: Callable[[int], Any], step: int) -> tuple[Any, str | None]:
  """``(tree, None)``, or ``(None, why step is unusable)``."""
  try:
    tree = restore_step(step)
  except Exception as e:  # pylint: disable=broad-except  # orbax/TensorStore raise bare Exception
    while e.__cause__ is not None:  # the innermost error says what is wrong with which file
      e = e.__cause__
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return None, f"it does not restore ({lines[0][:300]})"
  if not bool(jax.jit(checks.all_finite)(tree)):
    return None, "it holds non-finite values"
  return tree, None


def newest_usable(mngr: ocp.CheckpointManager,
                  restore_step: Callable[[int], Any],
                  set_aside: bool = False) -> tuple[int, Any] | None:
  """``(step, restore_step(step))`` for the newest step that restores and is finite; None
  when there is no checkpoint.

  Each newer step is skipped with a warning saying why; with ``set_aside`` (a resuming
  run) it is then moved to ``checkpoints_unusable/STEP`` beside ``checkpoints/`` (by
  process 0), so the run can save that step again and nothing is deleted.

  Raises:
    CheckpointError: when no step is usable (a run of another model or code version, or
      every step damaged): nothing is moved, and the message lists each step's problem.
  """
  skipped = []
  for step in sorted(mngr.all_steps(), reverse=True):
    tree, problem = _problem(restore_step, step)
    if problem is None:
      for bad, why in skipped:
        logging.warning("checkpoint step %d in %s is skipped: %s", bad, mngr.directory, why)
        if set_aside:
          _set_aside(mngr, bad)
      return step, tree
    skipped.append((step, problem))
  if skipped:
    raise CheckpointError(f"no usable checkpoint in {mngr.directory}: " +
                          "; ".join(f"step {s}: {why}" for s, why in skipped) +
                          " (a run of another model or code version? use another workdir, "
                          "or move the steps away to start afresh)")
  return None


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    directory = os.fspath(mngr.directory)
    aside = os.path.join(os.path.dirname(directory), UNUSABLE_DIR)
    os.makedirs(aside, exist_ok=True)
    target, n = os.path.join(aside, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(aside, f"{step}.{n}"), n + 1
    os.replace(os.path.join(directory, str(step)), target)
    logging.warning("moved the unusable step %d to %s", step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
  mngr.reload()


def saved_device_count(mngr: ocp.CheckpointManager, step: int) -> int | None:
  """The number of devices the run that saved step ``step`` had (None if not recorded)."""
  shardings = [getattr(m, "sharding", None) for m in jax.tree.leaves(mngr.item_metadata(step))]
  shapes = [getattr(s, "shape", None) for s in shardings if s is not None]
  return math.prod(shapes[0]) if shapes and shapes[0] is not None else None


def saved_steps(workdir: str) -> list[int]:
  """The steps ``workdir/checkpoints`` holds (committed or not), without opening them."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def write_config(workdir: str, config: dict) -> None:
  """Writes the run's configuration (plain values) to ``workdir/config.json``."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def read_config(workdir: str) -> dict:
  """Reads ``workdir/config.json``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir!r} is not a training run directory: {CONFIG_FILE} is missing "
                          "(train with `python -m training.train --workdir=DIR` first)")
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str, step: int | None = None, best: bool = False):
  """Loads a training run's model in eval mode.

  Args:
    workdir: the directory a training run wrote.
    best: load the checkpoint of best validation accuracy (``checkpoints_best/``, kept
      by a run with ``config.validation``) instead of the latest.
    step: the checkpoint step; default the newest usable one (newer steps that fail
      to restore or are not finite are skipped with a warning).

  Returns:
    ``(config, model, variables)``: the configuration dict, the Flax module
    and its variables (``params``, the averaged ones where the run kept an
    average, and, where the model has them, ``batch_stats``).
    ``robustlib.as_logits_fn(model, variables)`` turns them into a pure
    ``logits_fn``.
  """
  from robustlib import data, models  # pylint: disable=import-outside-toplevel

  config = read_config(workdir)
  info = data.info(config["dataset"])
  model = models.create(config["model"],
                        ensemble=config.get("ensemble", 1),
                        num_classes=info.num_classes,
                        input_shape=info.input_shape,
                        mean=info.mean,
                        std=info.std,
                        **config.get("model_kwargs", {}))
  template = models.init(model, jax.random.PRNGKey(0), info.input_shape)
  subdir = BEST_DIR if best else CHECKPOINT_DIR
  mngr = manager(workdir, max_to_keep=None, read_only=True, subdir=subdir)
  if mngr.latest_step() is None:
    hint = (" (the run kept no best checkpoint: train with config.validation.num_examples > 0)"
            if best else "")
    raise CheckpointError(f"no checkpoint in {os.path.join(workdir, subdir)}{hint}")
  on_one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if step is not None:
    state = restore_on(mngr, step, on_one)
  else:
    state = newest_usable(mngr, lambda s: restore_on(mngr, s, on_one))[1]
  # A run with weight averaging is evaluated with the averaged parameters and statistics.
  averaged = bool(state.get("ema_params"))
  variables = {"params": state["ema_params"] if averaged else state["params"]}
  stats = (averaged and state.get("ema_batch_stats")) or state.get("batch_stats")
  if stats:
    variables["batch_stats"] = stats
  jax.tree.map(_check_same_shape, template, variables)
  return config, model, variables


def _check_same_shape(expected, got):
  if expected.shape != got.shape:
    raise CheckpointError(f"checkpoint does not match the configured model: a parameter has shape "
                          f"{got.shape}, the model expects {expected.shape}")

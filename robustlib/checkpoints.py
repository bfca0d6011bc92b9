"""Atomic, resumable checkpoints of pytrees (orbax), and loading a training run.

A run directory holds ``config.json`` (the run's configuration as plain values)
and ``checkpoints/<step>/`` (orbax writes each step to a temporary directory and
renames it when complete, so a killed run never leaves a half-written step).
A checkpoint restores onto any device count: the arrays are read into the
shardings of the restoring process (a target's, or one local device), not the
saving run's topology.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
  """A run directory or checkpoint is missing or unusable."""


def manager(workdir: str,
            *,
            max_to_keep: int | None = 2,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/checkpoints`` (saves are synchronous)."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
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
  """Restores step ``step`` (default: the latest) into the structure, shapes and
  shardings of ``target``; returns None when there is no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_on(mngr: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding) -> Any:
  """Restores step ``step`` as saved (its own structure, shapes and dtypes), every array
  placed with ``sharding`` whatever devices the saving run had."""
  metadata = mngr.item_metadata(step)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def saved_device_count(mngr: ocp.CheckpointManager, step: int) -> int | None:
  """The number of devices the run that saved step ``step`` had (None if not recorded)."""
  shardings = [getattr(m, "sharding", None) for m in jax.tree.leaves(mngr.item_metadata(step))]
  shapes = [getattr(s, "shape", None) for s in shardings if s is not None]
  return math.prod(shapes[0]) if shapes and shapes[0] is not None else None


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


def load_run(workdir: str, step: int | None = None):
  """Loads a training run's model in eval mode.

  Args:
    workdir: the directory a training run wrote.
    step: the checkpoint step; default the latest.

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
                        num_classes=info.num_classes,
                        input_shape=info.input_shape,
                        mean=info.mean,
                        std=info.std,
                        **config.get("model_kwargs", {}))
  template = models.init(model, jax.random.PRNGKey(0), info.input_shape)
  mngr = manager(workdir, max_to_keep=None, read_only=True)
  if mngr.latest_step() is None:
    raise CheckpointError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}")
  state = restore_on(mngr, step if step is not None else mngr.latest_step(),
                     jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  # A run with weight averaging is evaluated with the averaged parameters.
  variables = {"params": state.get("ema_params") or state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  jax.tree.map(_check_same_shape, template, variables)
  return config, model, variables


def _check_same_shape(expected, got):
  if expected.shape != got.shape:
    raise CheckpointError(f"checkpoint does not match the configured model: a parameter has shape "
                          f"{got.shape}, the model expects {expected.shape}")

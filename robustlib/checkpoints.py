"""Atomic, resumable checkpoints of pytrees (orbax), and loading a training run.

A run directory holds ``config.json`` (the run's configuration as plain values:
``model``, ``model_kwargs``, ``dataset``, ``ensemble``, ...) and
``checkpoints/<step>/`` (orbax writes each step to a temporary directory and renames
it when complete, so a killed run never leaves a half-written step); with validation,
also ``checkpoints_best/<step>/``. Each step holds a tree of named fields (a train
state) and, in its metadata, ``checksum`` (see `checksum`) and ``variables``: which
field holds each of the model's variable collections to evaluate (a run that averages
its weights maps ``params`` and ``batch_stats`` to the fields of the averages; a step
without the map is read by the collections' own names). `load_run`
reads exactly this, so it knows nothing of the training code's fields.
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
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from robustlib import checks

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"  # the step of best validation accuracy (training.validation)
UNUSABLE_DIR = "checkpoints_unusable"
CONFIG_FILE = "config.json"
CHECKSUM_KEY = "checksum"  # in each step's custom metadata (`save`)
VARIABLES_KEY = "variables"  # the same: {collection: field of the saved state}


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


def _bits(leaf: jax.Array) -> jax.Array:
  """The leaf's bit patterns as uint32 (64-bit values folded to their two halves)."""
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  leaf = jnp.asarray(leaf)
  if leaf.dtype == jnp.bool_:
    return leaf.astype(jnp.uint32).ravel()
  width = leaf.dtype.itemsize * 8
  bits = jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{width}")).ravel()
  if width == 64:
    return jnp.concatenate([(bits & 0xFFFFFFFF).astype(jnp.uint32),
                            (bits >> 32).astype(jnp.uint32)])
  return bits.astype(jnp.uint32)


@jax.jit
def checksum(tree: Any) -> jax.Array:
  """A uint32 digest of every bit of the arrays in ``tree``: each leaf's bit patterns
  summed with odd position weights (mod 2**32), so any one flipped bit changes it; a
  jitted reduction, so it works on arrays sharded over any devices. Leaves are summed
  in any order (a saved and a restored tree may flatten differently)."""
  total = jnp.uint32(0)
  for leaf in jax.tree.leaves(tree):
    bits = _bits(leaf)
    weights = (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1) * jnp.uint32(2654435761)
    mixed = bits * weights
    total = total + jnp.sum(mixed ^ (mixed >> 15), dtype=jnp.uint32) * jnp.uint32(2 * bits.size + 1)
  return total


def save(mngr: ocp.CheckpointManager,
         step: int,
         tree: Any,
         variables: dict[str, str] | None = None) -> None:
  """Saves ``tree`` as step ``step`` (an existing step is left as it is), with its
  `checksum` in the step's metadata (a restore that reads other bits is refused) and,
  for a train state, ``variables``: which of its fields holds each variable collection
  of the model to evaluate (``{"params": FIELD, ...}``; see the module doc)."""
  if mngr.latest_step() == step:
    return
  metadata = {CHECKSUM_KEY: int(checksum(tree))}
  if variables is not None:
    metadata[VARIABLES_KEY] = dict(variables)
  mngr.save(step, args=ocp.args.StandardSave(tree), custom_metadata=metadata)
  mngr.wait_until_finished()


def _custom_metadata(mngr: ocp.CheckpointManager, step: int) -> dict:
  try:
    return dict(mngr.metadata(step).custom_metadata or {})
  except Exception:  # pylint: disable=broad-except  # a damaged metadata file: restore says why
    return {}


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
  """Restores step ``step`` into the structure, shapes and shardings of ``target``;
  returns None when there is no checkpoint.

  Without ``step``, the newest usable step: newer ones that fail to restore or hold
  non-finite values are moved to ``checkpoints_unusable/`` with a warning (see
  `newest_usable`).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

  def restore_step(s):
    return verified(mngr, s, mngr.restore(s, args=ocp.args.StandardRestore(abstract)))

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
  return verified(mngr, step, mngr.restore(step, args=ocp.args.StandardRestore(abstract)))


def verified(mngr: ocp.CheckpointManager, step: int, tree: Any) -> Any:
  """``tree``, restored from step ``step``, after its `checksum` matched the one saved
  with it (steps saved without one are taken as they are).

  Raises:
    CheckpointError: when the bits differ from those saved (a damaged file).
  """
  expected = _custom_metadata(mngr, step).get(CHECKSUM_KEY)
  if expected is not None and int(checksum(tree)) != expected:
    raise CheckpointError(f"step {step} in {mngr.directory} is damaged: its arrays' checksum "
                          f"differs from the one saved with them (files under "
                          f"{os.path.join(os.fspath(mngr.directory), str(step))} changed)")
  return tree


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
                          " (damaged files, or a run of another model or code version: "
                          "restore the steps from a copy, use another workdir, or move the "
                          "steps away to start afresh)")
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
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is damaged ({e}): restore it from a copy, or train in a new "
                          "workdir") from None
  if not isinstance(config, dict) or "model" not in config or "dataset" not in config:
    raise CheckpointError(f"{path} is not a training run's config (no 'model' and 'dataset'): "
                          "restore it from a copy, or train in a new workdir")
  return config


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
                        verifier_width=config.get("verifier_width", 0),
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
    if step not in mngr.all_steps():
      raise CheckpointError(f"no step {step} in {mngr.directory}; it holds {mngr.all_steps()}")
    state, problem = _problem(lambda s: restore_on(mngr, s, on_one), step)
    if problem is not None:
      raise CheckpointError(f"step {step} in {mngr.directory} is unusable: {problem} (restore "
                            "it from a copy, or load another step)")
  else:
    step, state = newest_usable(mngr, lambda s: restore_on(mngr, s, on_one))
  fields = _custom_metadata(mngr, step).get(VARIABLES_KEY) or {
      name: name for name in template if name in state
  }
  missing = sorted(set(template) - set(fields))
  if missing or any(field not in state for field in fields.values()):
    raise CheckpointError(f"step {step} in {mngr.directory} does not hold the model's variables "
                          f"{sorted(template)} (its metadata maps {fields}; its fields are "
                          f"{sorted(state)})")
  variables = {name: state[fields[name]] for name in template}
  jax.tree.map(_check_same_shape, template, variables)
  return config, model, variables


def _check_same_shape(expected, got):
  if expected.shape != got.shape:
    raise CheckpointError(f"checkpoint does not match the configured model: a parameter has shape "
                          f"{got.shape}, the model expects {expected.shape}")

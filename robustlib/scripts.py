"""What the absl scripts (training, attacks, verification) share: logging, errors, run configs."""

from __future__ import annotations

import dataclasses
import importlib
import logging as std_logging
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging
import jax

from robustlib import checkpoints, checks, data, models

# Errors a user's input causes: scripts print them as usage errors, without a traceback.
USER_ERRORS = (checks.InputError, checkpoints.CheckpointError, data.DataError,
               models.ModelInputError)


def setup_logging() -> None:
  """INFO logging with checkpointing's and JAX's start-up INFO lines dropped, so progress
  lines stay readable."""
  logging.set_verbosity(logging.INFO)
  # JAX's start-up notes (no TPU library on a CPU machine...) are not the script's progress.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "orbax" not in record.pathname)


def usage_error(message: str) -> NoReturn:
  """Exits with status 2 after one line on stderr: ``error: MESSAGE; see --help``."""
  message = "; ".join(
      line.strip().rstrip(".") for line in str(message).splitlines() if line.strip())
  sys.stderr.write(f"error: {message}; see --help\n")
  sys.stderr.flush()
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with status 0 for ``--help`` (absl exits with 1) and a one-line
  error with status 2 for a bad flag."""
  wants_help = any(
      a.split("=")[0] in ("--help", "-help", "--helpshort", "--helpfull", "-?") for a in argv[1:])
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if wants_help:
      sys.exit(0)
    raise
  except flags.Error as e:
    usage_error(str(e))


def run(main: Callable[[list[str]], Any],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
  """``absl.app.run(main)`` with :func:`parse_flags`: a usage error (``app.UsageError``, or
  one of `USER_ERRORS` escaping ``main``) is one line on stderr and exit status 2 (absl
  would print the whole usage first); what every script's ``__main__`` calls."""

  def checked(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      usage_error(f"{type(e).__name__}: {e}")
    except app.UsageError as e:
      usage_error(str(e))

  app.run(checked, flags_parser=flags_parser)


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
  """``--distributed`` and the coordinator flags of a script that runs over several processes
  (`define_distributed_flags`)."""
  distributed: Any
  coordinator_address: Any
  num_processes: Any
  process_id: Any

  def initialize(self) -> None:
    """Calls ``jax.distributed.initialize`` with the flags given, when ``--distributed``;
    a coordinator flag without ``--distributed`` is a usage error."""
    given = {
        "coordinator_address": self.coordinator_address.value,
        "num_processes": self.num_processes.value,
        "process_id": self.process_id.value
    }
    if any(v is not None for v in given.values()) and not self.distributed.value:
      raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                           "--distributed")
    if self.distributed.value:
      jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def define_distributed_flags(work: str) -> DistributedFlags:
  """Defines ``--distributed``, ``--coordinator_address``, ``--num_processes`` and
  ``--process_id`` for a script whose ``work`` (say "training") can span several hosts."""
  return DistributedFlags(
      flags.DEFINE_bool(
          "distributed", False, f"Call jax.distributed.initialize() first, for {work} over "
          "several hosts (coordinator and process ids come from the flags below where given, "
          "else from the cluster environment: TPU pods, SLURM, Open MPI)."),
      flags.DEFINE_string(
          "coordinator_address", None, "With --distributed: host:port of process 0's "
          "coordinator, e.g. 127.0.0.1:12345 (default: $JAX_COORDINATOR_ADDRESS or the "
          "cluster's)."),
      flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes."),
      flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, from 0."))


def define_names(name: str, default: Sequence[str], known: Sequence[str], help_text: str):
  """A comma-separated list flag whose values must be among ``known``: anything else is a
  one-line usage error naming the valid names."""
  known = list(known)
  flag = flags.DEFINE_list(name, list(default), f"{help_text} Of: {', '.join(known)}.")
  flags.register_validator(name,
                           lambda values: set(values) <= set(known),
                           message=f"--{name} takes names among {', '.join(known)}")
  return flag


def require(*modules: str, extra: str = "bench") -> None:
  """Imports optional dependencies; a missing one is a usage error naming the extra that
  installs it (``pip install "robustlib[bench]"``)."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError:
      raise app.UsageError(f"this needs {module}, which is not installed: pip install "
                           f"\"robustlib[{extra}]\" (or pip install {module})") from None


def define_checkpoint_flag():
  """``--checkpoint=latest|best``: which checkpoint of ``--workdir`` an evaluation reads."""
  return flags.DEFINE_enum(
      "checkpoint", "latest", ["latest", "best"], "Which checkpoint of --workdir: the latest, "
      "or the one of best validation accuracy (checkpoints_best/, kept by a run with "
      "config.validation).")


def parse_radii(values: list[str], flag: str = "--eps") -> list[float]:
  """A comma-separated list flag of radii as floats; a usage error names the flag otherwise."""
  try:
    return [float(v) for v in values]
  except ValueError:
    raise app.UsageError(f"{flag} must be numbers separated by commas, got {values}") from None


def _normalize(value: Any) -> Any:
  """Lists and tuples compare equal (JSON turns tuples into lists)."""
  if isinstance(value, (list, tuple)):
    return [_normalize(v) for v in value]
  if isinstance(value, dict):
    return {k: _normalize(v) for k, v in value.items()}
  return value


def data_of_config(workdir: str, config: Any,
                   data_dir: str | None) -> tuple[str | None, str | None]:
  """``(dataset, data_dir)`` that a ``--config`` given beside ``--workdir`` picks.

  Args:
    workdir: a training run's directory.
    config: the training config given on the command line, or None.
    data_dir: a ``--data_dir`` flag (wins over the config's).

  Returns:
    ``(None, data_dir)`` without a config (the run's own data), else the config's
    data set and data directory.

  Raises:
    app.UsageError: when the config names another model than the run's checkpoint.
  """
  if config is None:
    return None, data_dir
  run_config = checkpoints.read_config(workdir)
  given = (config.model, config.model_kwargs.to_dict())
  trained = (run_config["model"], run_config.get("model_kwargs", {}))
  if _normalize(given) != _normalize(trained):
    raise app.UsageError(f"--config names the model {given}, but the checkpoint in --workdir "
                         f"holds {trained}")
  return config.dataset, data_dir or config.data_dir or None


def data_of_flags(workdir: str | None, onnx: str | None, config: Any, dataset: str | None,
                  data_dir: str | None) -> tuple[str | None, str | None]:
  """``(dataset, data_dir)`` of an evaluation script's ``--workdir`` or ``--onnx`` flags.

  A run's own data set is the default; ``--dataset`` (or a ``--config``'s) picks
  another, and is required with ``--onnx``.

  Raises:
    app.UsageError: for neither or both of ``--workdir`` and ``--onnx``, an ONNX
      network without a data set, or a config naming another model than the run's.
  """
  if (workdir is None) == (onnx is None):
    raise app.UsageError("pass either --workdir (a training run) or --onnx (a network file)")
  if onnx is not None:
    dataset = dataset or (config.dataset if config is not None else None)
    if not dataset:
      raise app.UsageError("--onnx needs --dataset (the data set the network classifies)")
    return dataset, data_dir or (config.data_dir if config is not None else None) or None
  config_dataset, data_dir = data_of_config(workdir, config, data_dir)
  return dataset or config_dataset, data_dir

"""Trains a model: ``python -m training.train --config=training/configs/NAME.py --workdir=DIR``.

Every config field can be overridden: ``--config.num_steps=500``,
``--config.optimizer.learning_rate=3e-4``; a config file takes a variant after a
colon (``--config=training/configs/mnist_cnn_small.py:tiny``). Re-running the same
command after an interruption resumes from the last checkpoint.
``--config_help`` lists every config field with its default (or with the value the
given ``--config`` sets).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from robustlib import scripts
from training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Training configuration file, e.g. training/configs/digits_mlp.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir",
                               None, "Directory for checkpoints, metrics "
                               "and the report.",
                               required=True)
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False, "List every config field with its value (the --config given, "
    "else training/configs/default.py) and exit.")

_DISTRIBUTED = scripts.define_distributed_flags("training")

# Errors about what the user asked for: shown as one line, without a stack trace.
USER_ERRORS = (trainer.ConfigError,) + scripts.USER_ERRORS


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv):
  """Parses flags; a missing config file or an override of a field the config does not
  have is a one-line usage error."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.split(":")[0]):
    scripts.usage_error(f"--config: no such file {path.split(':')[0]!r}")
  if "--config_help" in argv and path is None:
    argv = argv + ["--config=" + os.path.join(os.path.dirname(__file__), "configs", "default.py")]
  if "--config_help" in argv:
    argv = argv + ["--workdir=unused"]  # --workdir is only needed to train
  try:
    return scripts.parse_flags(argv)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
      e = e.args[0]
    lines = str(e.args[0] if e.args else e).splitlines()
    field, hint = lines[0].strip("\"'"), " ".join(lines[1:])
    scripts.usage_error(f"unknown config field {field!r}" + (f" ({hint})" if hint else "") +
                        "; --config_help lists every field")


def _print_fields(config, prefix: str = "") -> None:
  for name, value in sorted(config.items()):
    if hasattr(value, "items"):
      _print_fields(value, f"{prefix}{name}.")
    else:
      print(f"--config.{prefix}{name}={value!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG_HELP.value:
    _print_fields(_CONFIG.value)
    return
  scripts.setup_logging()
  _DISTRIBUTED.initialize()
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  except trainer.TrainingDiverged as e:  # not a usage error: status 1, one line
    sys.stderr.write(f"FATAL TrainingDiverged: {e}\n")
    sys.exit(1)


flags.mark_flag_as_required("config")

if __name__ == "__main__":
  scripts.run(main, flags_parser=parse_flags)

"""Trains a model: ``python -m training.train --config=training/configs/NAME.py --workdir=DIR``.

Every config field can be overridden: ``--config.num_steps=500``,
``--config.optimizer.learning_rate=3e-4``; a config file takes a variant after a
colon (``--config=training/configs/mnist_cnn_small.py:tiny``). Re-running the same
command after an interruption resumes from the last checkpoint.
"""

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

_DISTRIBUTED = scripts.define_distributed_flags("training")

# Errors about what the user asked for: shown as one line, without a stack trace.
USER_ERRORS = (trainer.ConfigError,) + scripts.USER_ERRORS


def parse_flags(argv):
  """Parses flags; an override of a field the config does not have is a flag error."""
  try:
    return scripts.parse_flags(argv)
  except (AttributeError, KeyError) as e:
    field = str(e).strip("\"'")
    given = [a for a in argv if a.startswith("--config.") and field in a]
    sys.stderr.write(f"FATAL Flags parsing error: unknown config field {field!r} in "
                     f"{' '.join(given) or argv}; see training/configs/default.py for every "
                     "field\n")
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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

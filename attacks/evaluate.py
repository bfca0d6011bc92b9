"""Evaluates a trained model under attack: ``python -m attacks.evaluate --workdir=DIR``.

Loads the latest checkpoint of the training run in ``--workdir`` (its
``config.json`` names the model and the data set), runs the suite on the first
``--num_examples`` test examples for each epsilon, prints a table (epsilon,
clean accuracy, robust accuracy after each attack, robust accuracy) and writes
``DIR/attacks.json`` and ``DIR/attacks.png``. A rerun after an interruption
resumes from ``DIR/attacks_state/``.

Examples::

  python -m attacks.evaluate --workdir=runs/digits_mlp --suite=autoattack --eps=0.05,0.1
  python -m attacks.evaluate --workdir=runs/digits_mlp --suite=fgsm,pgd --norm=l2 --eps=0.5,1
  python -m attacks.evaluate --workdir=runs/digits_mlp --suite=fmn --norm=l2 --eps=0.25,0.5,1,2

A minimum-norm attack alone (``fmn``, ``fab``) runs once, unbounded, and reads every
radius from the smallest adversarial perturbation it finds per example
(``attacks.json`` holds them; the plot shows the whole curve).

A network from elsewhere: ``--onnx=model.onnx --dataset=mnist`` instead of
``--workdir`` (inputs NCHW, NHWC or flattened, values in [0, 1]; results go beside
the file unless ``--output_dir`` says otherwise).

Each batch is split over every device; ``--distributed`` (with
``--coordinator_address``, ``--num_processes``, ``--process_id`` where the cluster does
not say them) spreads it over several processes, which all get the same results.

``--config=FILE.py[:VARIANT]`` (a training config) is optional and only picks the
data (its ``dataset`` and ``data_dir``); the weights always come from the
checkpoint in ``--workdir``, and the config must name the run's model. An
untrained model is never evaluated.
"""

import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from attacks import evaluation
from robustlib import modules, scripts

evaluate = evaluation.evaluate  # what attacks.evaluate(...) calls once this is imported
modules.make_callable(__name__)

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (with a checkpoint).")
_ONNX = flags.DEFINE_string(
    "onnx", None, "Instead of --workdir: an ONNX classifier (NCHW, NHWC or "
    "flattened inputs in [0, 1]); needs --dataset.")
_DATASET = flags.DEFINE_string("dataset", None, "The data set (default: the run's).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional training config file: picks the data set and data_dir; must name "
    "the run's model.")
_SUITE = flags.DEFINE_string(
    "suite", "autoattack", "Attack names separated by commas (a cascade): "
    f"{', '.join(evaluation.SUITES)}.")
_EPS = flags.DEFINE_list("eps", ["0.1"], "Radii, separated by commas (a sweep compiles once).")
_NORM = flags.DEFINE_enum("norm", "linf", ["linf", "l2", "l1", "l0"],
                          "Threat model (l1: apgd, apgd_t, fab, fmn, autoattack; l0: fmn).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "First test examples to use (0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per batch.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' PRNG key.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: --workdir).")
_RESUME = flags.DEFINE_bool("resume", True, "Keep resumable state and resume from it.")
_CHECKPOINT = scripts.define_checkpoint_flag()
_DISTRIBUTED = scripts.define_distributed_flags("an evaluation")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  scripts.setup_logging()
  _DISTRIBUTED.initialize()
  eps = scripts.parse_radii(_EPS.value)
  try:
    dataset, data_dir = scripts.data_of_flags(_WORKDIR.value, _ONNX.value, _CONFIG.value,
                                              _DATASET.value, _DATA_DIR.value)
    report = evaluation.evaluate_run(_WORKDIR.value,
                                     onnx=_ONNX.value,
                                     suite=_SUITE.value,
                                     eps=eps,
                                     norm=_NORM.value,
                                     num_examples=_NUM_EXAMPLES.value,
                                     batch_size=_BATCH_SIZE.value,
                                     data_dir=data_dir,
                                     dataset=dataset,
                                     seed=_SEED.value,
                                     output_dir=_OUTPUT_DIR.value,
                                     resume=_RESUME.value,
                                     checkpoint=_CHECKPOINT.value)
  except scripts.USER_ERRORS as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  if jax.process_index() > 0:
    return  # process 0 prints
  print(f"{report.suite} ({report.norm}) on {report.num_examples} examples, "
        f"{report.seconds:.1f} s")
  print(report.table())
  for message in report.warnings:
    print(f"WARNING: {message}")
  sys.stdout.flush()


if __name__ == "__main__":
  scripts.run(main)

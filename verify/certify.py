"""Certified accuracy of a training run: ``python -m verify.certify --workdir=DIR``.

Loads the latest checkpoint of the training run in ``--workdir`` (its
``config.json`` names the model and the data set), bounds the first
``--num_examples`` test examples with each ``--method`` at each ``--eps``
(L-inf, inputs in [0, 1]) and prints clean, PGD and verified accuracy side by
side. It writes ``DIR/verify.json`` (accuracies and per-example flags) and
``DIR/verify.png`` (verified and empirical robust accuracy against epsilon).

The PGD column is read from ``DIR/attacks.json`` (written by
``python -m attacks.evaluate --workdir=DIR --suite=pgd --eps=...``; verification
does not run attacks): per-example flags restricted to the same examples, at the
radii both files share. Without that file the column is left out, and the
output says so. With it, every verified example is checked against the
attack's per-example flags: the output (and ``verified_but_attacked`` in
``verify.json``) counts, per method and radius, the examples that are both
verified and broken by the attack, which is 0 unless a bound is unsound or
the attack is wrong.

Examples::

  python -m verify.certify --workdir=runs/digits_mlp --method=ibp,crown --eps=0.005,0.01,0.02
  python -m verify.certify --workdir=runs/mnist_cnn --method=crown_ibp --num_examples=500
  python -m verify.certify --workdir=runs/mnist_cnn --method=ibp,crown,milp --eps=0.1

``--method=milp`` is exact verification of ReLU networks: every example that the
other methods (CROWN at least) leave unverified gets a mixed-integer program
(`verify.milp`, up to ``--milp_time_limit`` seconds each); the table then gives
the exact robust accuracy, up to the examples left undecided, which the output
counts along with those it found counterexamples for.

``--bab_attack_time=SECONDS`` runs the branch-and-bound attack (`verify.bab_attack`)
on the examples left between the columns: neither verified nor broken by the attack.
The output counts those it breaks and those it proves.

A network from elsewhere: ``--onnx=model.onnx --dataset=mnist`` instead of
``--workdir`` (inputs NCHW, NHWC or flattened, values in [0, 1]; results, and the
``attacks.json`` read for the PGD column, beside the file unless ``--output_dir``
says otherwise).

``--config=FILE.py[:VARIANT]`` (a training config) is optional and only picks
the data (its ``dataset`` and ``data_dir``); it must name the run's model.

The work is done by `verify.runs.certify_run`. Importing this script keeps
``verify.certify`` the function too (the module is callable as it).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from robustlib import modules, scripts
from verify import certification
from verify.runs import METHODS, certify_run, table

certify = certification.certify  # what verify.certify(...) calls once this is imported
modules.make_callable(__name__)

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (with a checkpoint).")
_ONNX = flags.DEFINE_string(
    "onnx", None, "Instead of --workdir: an ONNX classifier (NCHW, NHWC or "
    "flattened inputs in [0, 1]); needs --dataset.")
_DATASET = flags.DEFINE_string("dataset", None, "The data set (default: the run's).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional training config file: picks the data set and data_dir; must name "
    "the run's model.")
_METHOD = flags.DEFINE_string("method", "ibp,crown",
                              f"Bound methods separated by commas: {', '.join(METHODS)}.")
_EPS = flags.DEFINE_list("eps", ["0.01"], "L-inf radii, separated by commas.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "First test examples to use (0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per bound computation.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: the run's).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: --workdir).")
_MILP_TIME_LIMIT = flags.DEFINE_float("milp_time_limit", 60.0,
                                      "Seconds per example for --method=milp.")
_BAB_ATTACK_TIME = flags.DEFINE_float(
    "bab_attack_time", 0.0, "Seconds of verify.bab_attack per example left neither verified "
    "nor broken by the attack (0: not run).")
_CHECKPOINT = scripts.define_checkpoint_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  scripts.setup_logging()
  eps = scripts.parse_radii(_EPS.value)
  try:
    dataset, data_dir = scripts.data_of_flags(_WORKDIR.value, _ONNX.value, _CONFIG.value,
                                              _DATASET.value, _DATA_DIR.value)
    content = certify_run(_WORKDIR.value,
                          onnx=_ONNX.value,
                          methods=_METHOD.value,
                          eps=eps,
                          num_examples=_NUM_EXAMPLES.value,
                          batch_size=_BATCH_SIZE.value,
                          data_dir=data_dir,
                          dataset=dataset,
                          output_dir=_OUTPUT_DIR.value,
                          milp_time_limit=_MILP_TIME_LIMIT.value,
                          bab_attack_time=_BAB_ATTACK_TIME.value,
                          checkpoint=_CHECKPOINT.value)
  except scripts.USER_ERRORS as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  print(f"{content['model']} on {content['dataset']}, {content['num_examples']} examples, "
        f"{content['seconds']:.1f} s")
  print(table(content))
  sys.stdout.flush()


if __name__ == "__main__":
  scripts.run(main)

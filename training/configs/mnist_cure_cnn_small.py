"""CURE (Moosavi-Dezfooli et al. 2019) on MNIST: the small CNN with the curvature regularizer.

Cross-entropy plus 4 times ``||grad l(x + h z) - grad l(x)||^2`` (``z`` the unit-L2 sign
of the input gradient), ``h`` ramped from 0 to 1 (L2, pixels) over the first 2000 steps as
the authors anneal it; Adam 1e-3, 5 epochs of 100. The report attacks at L-inf 0.1: CURE
trains without a radius. Needs MNIST (``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``).

Measured on 2 CPU cores (477 s of training beside an AutoAttack run), one seed: test
accuracy 99.02 %; on the first 1000 test images at L-inf 0.1, clean 99.10 %, PGD-40
90.50 %, AutoAttack 89.40 %, IBP-verified 0 % (the training report).
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "mnist"
  config.model = "cnn_small"
  config.method = "cure"
  config.batch_size = 100
  config.num_steps = 3000
  config.robust.eval_eps = 0.1
  config.robust.cure_lambda = 4.0
  config.robust.cure_h = 1.0
  config.robust.ramp_steps = 2000
  config.report.num_examples = 1000
  config.report.verify_methods = ("ibp",)
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.eval_batch_size = 500
  if variant == "tiny":
    default.shrink_to_tiny(config)
    config.robust.ramp_steps = 2
    config.report.enabled = False
  return config

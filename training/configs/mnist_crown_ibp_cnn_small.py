"""CROWN-IBP training of the small CNN on MNIST at test eps 0.3 (train 0.4), after Zhang et al. 2020.

Adam 5e-4, batch 256, 100 epochs (23.4k steps), learning rate / 10 at 60 % and
90 %; eps = 0 for 3 epochs, then a linear ramp over 30 epochs; kappa from 1 to
0 and beta (CROWN-IBP against IBP bounds) from 1 to 0 along the ramp. Needs
MNIST (``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``).
"""

from training.configs import default

EPOCH = 235  # steps of 256 images


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "mnist"
  config.model = "cnn_small"
  config.method = "crown_ibp"
  config.batch_size = 256
  config.num_steps = 100 * EPOCH
  config.optimizer.learning_rate = 5e-4
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_boundaries = (0.6, 0.9)
  config.optimizer.decay_factor = 0.1
  config.robust.eps = 0.4
  config.robust.eval_eps = 0.3
  config.robust.warmup_steps = 3 * EPOCH
  config.robust.ramp_steps = 30 * EPOCH
  config.robust.kappa_start, config.robust.kappa_end = 1.0, 0.0
  config.robust.beta_start, config.robust.beta_end = 1.0, 0.0
  config.report.num_examples = 1000
  config.log_every = 200
  config.eval_every = 10 * EPOCH
  config.checkpoint_every = 5 * EPOCH
  config.eval_batch_size = 500
  if variant == "tiny":
    default.shrink_to_tiny(config)
    config.robust.warmup_steps, config.robust.ramp_steps = 0, 1
    config.report.enabled = False  # the report has its own tests
  return config

"""PGD adversarial training (Madry et al. 2018) of the small CNN on MNIST at eps 0.3.

The attack of the paper's MNIST model: 40 steps of 0.01 from a random start, at
the full radius from the first step; Adam 1e-4 (the paper trains 100k steps of 50
images; here 30 epochs of 100). Needs MNIST (``--config.data_dir=DIR`` or
``ROBUSTLIB_DATA_DIR``). ``--config.method=trades`` gives TRADES (beta 6).
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "mnist"
  config.model = "cnn_small"
  config.method = "pgd"
  config.batch_size = 100
  config.num_steps = 18000
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = "constant"
  config.robust.eps = 0.3
  config.robust.attack_steps = 40
  config.robust.attack_step_size = 0.01
  config.robust.trades_beta = 6.0
  config.report.num_examples = 1000
  config.report.verify_methods = ("ibp",)
  config.log_every = 200
  config.eval_every = 3000
  config.checkpoint_every = 3000
  config.eval_batch_size = 500
  if variant == "tiny":
    default.shrink_to_tiny(config)
    config.robust.attack_steps = 3
    config.report.enabled = False  # the report has its own tests
  return config

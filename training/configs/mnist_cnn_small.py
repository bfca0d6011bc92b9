"""The IBP paper's small CNN on MNIST (Gowal et al. 2018), standard training.

Needs MNIST: ``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR`` (see README).
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "mnist"
  config.model = "cnn_small"
  config.batch_size = 100
  config.num_steps = 6000  # 10 epochs
  config.optimizer.learning_rate = 1e-3
  config.log_every = 200
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.eval_batch_size = 1000
  if variant == "tiny":
    default.shrink_to_tiny(config)
  return config

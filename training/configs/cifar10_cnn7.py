"""CNN7 (the large IBP CNN with BatchNorm) on CIFAR-10, standard training.

Needs CIFAR-10's python batches: ``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``.
"""

from training.configs import default


def get_config(variant: str = ""):
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "cnn7"
  config.batch_size = 128
  config.num_steps = 39000  # 100 epochs
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.log_every = 200
  config.eval_every = 3900
  config.checkpoint_every = 3900
  if variant == "tiny":
    config.dataset = "synthetic:cifar10"
    config.num_steps = 4
    config.batch_size = 16
    config.log_every = config.eval_every = config.checkpoint_every = 2
    config.num_eval_examples = 64
    config.eval_batch_size = 32
  return config

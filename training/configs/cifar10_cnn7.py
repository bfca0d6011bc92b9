"""CNN7 (the large IBP CNN with BatchNorm) on CIFAR-10, standard training.

Random crops (4 pixels of zero padding) and horizontal flips of every batch.

Needs CIFAR-10's python batches: ``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``.
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "cnn7"
  config.batch_size = 128
  config.num_steps = 39000  # 100 epochs
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.log_every = 200
  config.eval_every = 3900
  config.checkpoint_every = 3900
  if variant == "tiny":
    default.shrink_to_tiny(config)
  return config

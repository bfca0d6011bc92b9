"""MLP on the embedded 8x8 digits: the README's main job (about a minute on 2 CPU cores)."""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs.hidden = (256, 256)
  config.batch_size = 128
  config.num_steps = 3000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.log_every = 250
  config.eval_every = 1000
  config.checkpoint_every = 1000
  if variant == "tiny":
    config.num_steps = 20
    config.log_every = config.eval_every = config.checkpoint_every = 10
  return config

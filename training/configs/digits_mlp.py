"""Certified (IBP) training of an MLP on the embedded 8x8 digits at eps = 0.1: the README's main job.

About three minutes on 2 CPU cores, robustness report included; no data files or
network needed. ``--config.method=standard --config.robust.eps=0`` gives plain training.
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs.hidden = (256, 256)
  config.method = "ibp"
  config.batch_size = 128
  config.num_steps = 3000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  # Gowal et al. 2018: train at 1.1x the test radius; eps = 0 for the first steps, then a ramp;
  # kappa from 1 to 0.5 along the ramp.
  config.robust.eps = 0.11
  config.robust.eval_eps = 0.1
  config.robust.warmup_steps = 200
  config.robust.ramp_steps = 1600
  config.log_every = 250
  config.eval_every = 1000
  config.checkpoint_every = 1000
  if variant == "tiny":
    config.num_steps = 20
    config.robust.warmup_steps, config.robust.ramp_steps = 0, 1
    config.log_every = config.eval_every = config.checkpoint_every = 10
    config.report.autoattack = False
    config.report.verify_methods = ("ibp",)
    config.report.num_examples = 64
  return config

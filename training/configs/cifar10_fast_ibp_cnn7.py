"""Fast certified training (Shi et al. 2021) of CNN7 on CIFAR-10 at eps 8/255.

IBP initialization; the warm-up regularizers (lambda 0.5, tau 0.5) during the
ramp; eps = 0 for 1 epoch, then the smoothed ramp over 80 epochs; 160 epochs of
128 images, Adam 5e-4, learning rate x 0.2 at epochs 120 and 140; gradient norm
clipped at 10; the robust loss alone (kappa 0); random crops (4 pixels of padding) and
horizontal flips. A GPU run. Needs CIFAR-10
(``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``). For MNIST at eps 0.3
(train 0.4), Shi et al. use 70 epochs with a 20-epoch ramp and decays at 50 and 60.
"""

from training.configs import default

EPOCH = 391  # steps of 128 images


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "cnn7"
  config.method = "fast_ibp"
  config.batch_size = 128
  config.num_steps = 160 * EPOCH
  config.optimizer.learning_rate = 5e-4
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_boundaries = (120 / 160, 140 / 160)
  config.optimizer.decay_factor = 0.2
  config.optimizer.grad_clip_norm = 10.0
  config.robust.eps = 8 / 255
  config.robust.warmup_steps = 1 * EPOCH
  config.robust.ramp_steps = 80 * EPOCH
  config.robust.schedule = "smooth"
  config.robust.kappa_start = config.robust.kappa_end = 0.0
  config.robust.ibp_init = True
  config.robust.reg_lambda = 0.5
  config.robust.reg_tol = 0.5
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.report.num_examples = 1000
  config.log_every = 200
  config.eval_every = 10 * EPOCH
  config.checkpoint_every = 5 * EPOCH
  if variant == "tiny":
    default.shrink_to_tiny(config)
    config.robust.warmup_steps, config.robust.ramp_steps = 0, 2
    config.report.enabled = False  # the report has its own tests
  return config

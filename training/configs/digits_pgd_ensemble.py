"""An adversarially-trained ensemble (Grefenstette et al. 2018) on the embedded 8x8 digits.

Three MLPs (one hidden layer of 128) trained jointly with PGD-10 at L-inf 0.1 against the
ensemble, whose logits are the mean of the members'; the attacks and bounds of the report
see the ensemble as one network. ``--config.ensemble=1`` gives one member trained alike.
No data files needed.

Measured on a 2-core CPU (the 359 test digits at L-inf 0.1): three members reach 97.5 %
clean, 83.3 % under PGD and 82.5 % under AutoAttack, 19.8 % CROWN-verified (18 s of
training); one member trained alike (``--config.ensemble=1``) 97.5 %, 82.7 %, 81.6 % and
31.8 % (12 s): the ensemble is a little harder to attack and harder to verify.
"""

from training.configs import default


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = default.get_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.model_kwargs.hidden = (128,)
  config.ensemble = 3
  config.method = "pgd"
  config.batch_size = 128
  config.num_steps = 2000
  config.optimizer.learning_rate = 1e-3
  config.robust.eps = 0.1
  config.robust.ramp_steps = 500
  config.report.verify_methods = ("ibp", "crown")
  config.log_every = 200
  config.eval_every = 1000
  config.checkpoint_every = 1000
  if variant == "tiny":
    default.shrink_to_tiny(config)
    config.ensemble = 2
    config.robust.ramp_steps = 2
    config.robust.attack_steps = 3
    config.report.autoattack = False
    config.report.num_examples = 32
  return config

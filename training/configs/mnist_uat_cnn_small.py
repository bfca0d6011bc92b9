"""Unsupervised adversarial training (UAT-FT, Uesato et al. 2019) on MNIST with 1,000 labels.

The first 1,000 training images keep their labels; the other 59,000 are unlabeled and get
a standard-trained teacher's predictions as labels. PGD adversarial training of the small
CNN at L-inf 0.3 (PGD-10 inside the step, the radius ramped over 500 steps, 2000 steps of
100 images) then draws half of each batch from them. Three runs, in order::

  python -m training.train --config=training/configs/mnist_uat_cnn_small.py:teacher \\
      --workdir=runs/uat_teacher          # standard training on the 1,000 labeled
  python -m training.train --config=training/configs/mnist_uat_cnn_small.py:labeled_only \\
      --workdir=runs/uat_labeled_only     # PGD training on the 1,000 labeled alone
  python -m training.train --config=training/configs/mnist_uat_cnn_small.py \\
      --config.extra.teacher_workdir=runs/uat_teacher --workdir=runs/uat

Needs MNIST (``--config.data_dir=DIR`` or ``ROBUSTLIB_DATA_DIR``).

Measured on a 2-core CPU (the report's first 1,000 test images, PGD-40 at L-inf 0.3):
the teacher reaches 91.2 % test accuracy (1,000 steps, 28 s); PGD training on the 1,000
labeled images alone leaves 47.0 % robust (95.2 % clean, 335 s); with the 59,000
pseudo-labeled images in every batch, 78.0 % robust (95.0 % clean, 311 s).
"""

from training.configs import default

VARIANTS = ("teacher", "labeled_only")


def get_config(variant: str = ""):
  default.check_variant(variant, VARIANTS)
  config = default.get_config()
  config.dataset = "mnist"
  config.model = "cnn_small"
  config.method = "pgd"
  config.batch_size = 100
  config.num_steps = 2000
  config.optimizer.learning_rate = 1e-3
  config.robust.eps = 0.3
  config.robust.ramp_steps = 500
  config.robust.attack_steps = 10
  config.extra.labeled_examples = 1000
  config.extra.source = "rest"
  config.extra.ratio = 0.5
  config.report.num_examples = 1000
  config.report.pgd_steps = 40  # Uesato et al. measure PGD; AutoAttack is left to attacks.evaluate
  config.report.autoattack = False
  config.report.verify_methods = ("ibp",)
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.eval_batch_size = 500
  if variant in ("teacher", "labeled_only"):
    config.extra.source = ""
  if variant == "teacher":
    config.method, config.robust.eps, config.robust.ramp_steps = "standard", 0.0, 0
    config.num_steps = 1000
    config.report.enabled = False
  if variant == "tiny":  # runs alone: labeled-only; a test gives it a teacher and source 'rest'
    default.shrink_to_tiny(config)
    config.extra.source = ""
    config.extra.labeled_examples = 100
    config.robust.ramp_steps = 2
    config.robust.attack_steps = 3
    config.report.enabled = False
  return config

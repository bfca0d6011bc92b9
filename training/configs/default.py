"""Every field a training run reads, with its default.

Experiment configs start from this one and change what they need; any field can
be overridden on the command line (``--config.optimizer.learning_rate=1e-3``).
A field that is not here is an error, so a typo never passes silently.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Data: a name understood by robustlib.data.load; data_dir '' means the
  # ROBUSTLIB_DATA_DIR environment variable (or download into the cache).
  config.dataset = "digits"
  config.data_dir = ""
  # Model: a name in robustlib.models.MODELS and its keyword arguments.
  config.model = "mlp"
  config.model_kwargs = ml_collections.ConfigDict()
  # More than 1: an ensemble of that many models trained jointly (robustlib.models.Ensemble,
  # Grefenstette et al. 2018): one logits_fn, the mean of the members' logits, for the loss,
  # the attacks and the bounds.
  config.ensemble = 1
  # Hidden width of the learned verifier beside the model (robustlib.models.WithVerifier);
  # method "pvt" needs one (> 0), the other methods none (0).
  config.verifier_width = 0
  config.method = "standard"
  config.batch_size = 128  # global batch, split over the devices
  config.num_steps = 1000
  config.num_devices = 0  # 0: every local device
  # The training step's compute dtype: float32, or bfloat16 mixed precision (parameters,
  # optimizer state, BatchNorm statistics and the loss stay float32; evaluation is float32).
  config.dtype = "float32"

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd | adam | adamw
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"  # constant | cosine | piecewise
  config.optimizer.warmup_steps = 0
  config.optimizer.decay_boundaries = (0.5, 0.75)  # piecewise: fractions of num_steps
  config.optimizer.decay_factor = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

  # Augmentation of training batches, inside the train step (robustlib.data.make_augment).
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # random crops of the image padded by this many zeros
  config.augment.flip = False  # random horizontal flips

  # Robust training (training.methods): method is standard | pgd | trades | ibp | crown_ibp |
  # fast_ibp | cure | pvt (with config.verifier_width > 0).
  config.robust = ml_collections.ConfigDict()
  config.robust.eps = 0.0  # training radius (L-inf, pixels in [0, 1]); e.g. 1.1x the test radius
  config.robust.eval_eps = 0.0  # test radius of the robustness report (0: same as eps)
  config.robust.warmup_steps = 0  # steps at eps = 0 before the ramp
  config.robust.ramp_steps = 0  # steps of the ramp from 0 to eps
  config.robust.schedule = "linear"  # linear | smooth (Shi et al. 2021)
  config.robust.kappa_start = 1.0  # weight of the clean loss (ibp, crown_ibp), ramped with eps
  config.robust.kappa_end = 0.5
  config.robust.beta_start = 1.0  # weight of CROWN-IBP against IBP bounds (crown_ibp)
  config.robust.beta_end = 0.0
  config.robust.attack_steps = 10  # PGD steps inside the train step (pgd, trades)
  config.robust.attack_step_size = 0.0  # 0: 2.5 eps / attack_steps
  config.robust.trades_beta = 6.0
  config.robust.ema_decay = 0.0  # weight averaging of the parameters (0: off)
  # fast_ibp (Shi et al. 2021): IBP initialization and warm-up regularizers.
  config.robust.ibp_init = False  # re-draw hidden weights with std sqrt(2 pi) / fan_in
  config.robust.reg_lambda = 0.5  # weight of the regularizers, times (1 - eps(t) / eps)
  config.robust.reg_tol = 0.5  # their tolerance tau
  # cure (Moosavi-Dezfooli et al. 2019): the regularizer's weight and its finite-difference
  # length h (L2, pixels), ramped from 0 over warmup_steps + ramp_steps.
  config.robust.cure_lambda = 4.0
  config.robust.cure_h = 1.0

  # The robustness report at the end of a run (when robust.eps or robust.eval_eps is set).
  config.report = ml_collections.ConfigDict()
  config.report.enabled = True
  config.report.sweep = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5
                        )  # radii of the curves, as multiples of the test eps
  config.report.verify_methods = ("ibp", "crown")
  config.report.pgd_steps = 40
  config.report.autoattack = True
  config.report.num_examples = 0  # 0: every evaluation example
  # Seconds of verify.bab_attack per example left neither broken nor verified (0: not run).
  config.report.bab_attack_time = 0.0

  # Unlabeled or extra data in every batch (training.extra_data; UAT, Uesato et al. 2019;
  # Gowal et al. 2020): source is '' (none), 'rest' (the training split beyond
  # labeled_examples, its labels dropped) or a data set's name; teacher_workdir is a run
  # whose predictions label it; ratio is its share of each batch.
  config.extra = ml_collections.ConfigDict()
  config.extra.source = ""
  config.extra.labeled_examples = 0  # > 0: only the first this many keep their labels
  config.extra.teacher_workdir = ""
  config.extra.ratio = 0.5

  # Validation (training.validation): every eval_every steps, clean, PGD and (certified
  # methods) IBP accuracy at the test radius on the last num_examples of the training split,
  # held out of training (0: none); with keep_best, the checkpoint of the best robust
  # validation accuracy is kept in checkpoints_best/ beside the latest (Rice et al. 2020).
  config.validation = ml_collections.ConfigDict()
  config.validation.num_examples = 0
  config.validation.pgd_steps = 10
  config.validation.keep_best = True

  # A step whose loss, gradients or new parameters are not finite is skipped (the state is
  # kept, the step counted); this many in a row stop the run before any checkpoint of them.
  config.max_nonfinite_steps = 10
  # Resuming with a config that changes the training (anything but the fields of
  # training.trainer.RESUME_NEUTRAL) is refused unless this is True; config.json keeps a
  # history of the changes.
  config.allow_config_change = False

  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.eval_batch_size = 500
  config.num_eval_examples = 0  # 0: the whole test split
  return config


VARIANTS = ("", "tiny")


def check_variant(variant: str, own: tuple[str, ...] = ()) -> None:
  """Raises ValueError for a config variant (``--config=FILE.py:VARIANT``) that neither every
  config (`VARIANTS`) nor this one (``own``) offers."""
  if variant not in VARIANTS + own:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS + own}")


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``tiny`` variant of a config: a few steps on synthetic data of the same
  shape, for smoke tests without data files."""
  if not config.dataset.startswith("synthetic:"):
    config.dataset = f"synthetic:{config.dataset}"
  config.num_steps = 4
  config.batch_size = 16
  config.log_every = config.eval_every = config.checkpoint_every = 2
  config.num_eval_examples = 64
  config.eval_batch_size = 32
  return config

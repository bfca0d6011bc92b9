"""TRADES (Zhang et al. 2019) of the small CNN on MNIST at eps 0.3: ``mnist_pgd_cnn_small``'s
schedule, data and best-checkpoint selection with the TRADES loss (beta 6; its inner
maximization of the KL divergence from the clean prediction, 20 steps of 2.5 eps / 20
from a small random start). Needs MNIST (``--config.data_dir=DIR`` or
``ROBUSTLIB_DATA_DIR``).

Measured on 2 CPU cores (about 16 min of training alone at 12-13 steps/s), one seed:
test accuracy 98.45 %. AutoAttack (standard) at L-inf 0.3 on all 10,000 test images
(``python -m attacks.evaluate --workdir=DIR --suite=autoattack --eps=0.3
--num_examples=0``, 30-35 min): the latest checkpoint keeps 92.39 % (93.31, 92.95,
92.87 % after APGD-CE, APGD-T, FAB-T); the best-validation one (``--checkpoint=best``,
step 8,000 of PGD-10 validation accuracies 90.5, 95.3, 95.3, 96.2, 96.2, 95.8 % every
2,000 steps) keeps 91.85 % (clean 98.24 %; 93.76, 93.14, 92.98 %): a point above
PGD-AT's 91.39 % (``mnist_pgd_cnn_small``) for the latest, and again no gain from
selecting the best checkpoint on MNIST. Square removes 0.5 (latest) and 1.1 (best)
points after the white-box attacks: some gradient masking, which the black-box stage
catches. The training report on the first 1000 test images: clean 98.20 %, PGD-40
92.90 %, AutoAttack 90.60 %, IBP-verified 0 %.
"""

from training.configs import default, mnist_pgd_cnn_small


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = mnist_pgd_cnn_small.get_config(variant)
  config.method = "trades"
  config.robust.trades_beta = 6.0
  return config

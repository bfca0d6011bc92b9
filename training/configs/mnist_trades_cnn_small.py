"""TRADES (Zhang et al. 2019) of the small CNN on MNIST at eps 0.3: ``mnist_pgd_cnn_small``'s
schedule, data and best-checkpoint selection with the TRADES loss (beta 6; its inner
maximization of the KL divergence from the clean prediction, 20 steps of 2.5 eps / 20
from a small random start). Needs MNIST (``--config.data_dir=DIR`` or
``ROBUSTLIB_DATA_DIR``).
"""

from training.configs import default, mnist_pgd_cnn_small


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = mnist_pgd_cnn_small.get_config(variant)
  config.method = "trades"
  config.robust.trades_beta = 6.0
  return config

"""The IBP paper's large CNN on MNIST (Gowal et al. 2018), standard training."""

from training.configs import mnist_cnn_small


def get_config(variant: str = ""):
  config = mnist_cnn_small.get_config(variant)
  config.model = "cnn_large"
  return config

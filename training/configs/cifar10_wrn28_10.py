"""WideResNet-28-10 on CIFAR-10, standard training (SGD, cosine, 200 epochs)."""

from training.configs import cifar10_cnn7


def get_config(variant: str = ""):
  config = cifar10_cnn7.get_config(variant)
  config.model = "wide_resnet"
  config.model_kwargs.depth = 28
  config.model_kwargs.width = 10
  config.model_kwargs.activation = "relu"
  if variant == "tiny":
    config.model_kwargs.depth = 10
    config.model_kwargs.width = 1
    config.batch_size = 8
  else:
    config.num_steps = 78000
  return config

"""PreAct ResNet-18 on CIFAR-10, standard training (SGD, cosine, 200 epochs)."""

from training.configs import cifar10_cnn7


def get_config(variant: str = ""):
  config = cifar10_cnn7.get_config(variant)
  config.model = "preact_resnet18"
  config.model_kwargs.activation = "relu"
  if not variant:
    config.num_steps = 78000
  return config

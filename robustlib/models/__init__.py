"""Classifiers in Flax: IBP CNNs, PreActResNet-18, WideResNets, an MLP, ensembles of them, and
a classifier beside a learned verifier.

Every model maps float images ``[N, H, W, C]`` in [0, 1] to logits
``[N, num_classes]`` and normalizes its input with ``mean``/``std`` as its
first operation, so data is never normalized beforehand.
"""

from robustlib.models.activations import ACTIVATIONS, activation
from robustlib.models.ensemble import Ensemble
from robustlib.models.geometry import SpatialLayer, min_input_size, output_size
from robustlib.models.ibp_cnns import CNN7, CNNLarge, CNNMedium, CNNSmall
from robustlib.models.inputs import ModelInputError, check_input, check_stats
from robustlib.models.mlp import MLP
from robustlib.models.normalize import Normalize
from robustlib.models.preact_block import PreActBlock
from robustlib.models.preact_resnet import PreActResNet18
from robustlib.models.registry import MODELS, check_input_shape, create, init
from robustlib.models.verifier import NUM_FEATURES, DualVerifier, WithVerifier
from robustlib.models.wide_resnet import WideResNet

__all__ = [
    "ACTIVATIONS",
    "CNN7",
    "CNNLarge",
    "CNNMedium",
    "CNNSmall",
    "DualVerifier",
    "Ensemble",
    "MLP",
    "MODELS",
    "NUM_FEATURES",
    "ModelInputError",
    "Normalize",
    "PreActBlock",
    "PreActResNet18",
    "SpatialLayer",
    "WideResNet",
    "WithVerifier",
    "activation",
    "check_input",
    "check_input_shape",
    "check_stats",
    "create",
    "init",
    "min_input_size",
    "output_size",
]

"""Models by name: a read-only registry, a validating factory and ``init``.

Example:
  >>> model = create("cnn_small", num_classes=10, input_shape=(28, 28, 1))
  >>> variables = init(model, jax.random.key(0), (28, 28, 1))
  >>> logits = model.apply(variables, x)  # x: [N, 28, 28, 1] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from robustlib.checks import as_key
from robustlib.models.ensemble import Ensemble
from robustlib.models.geometry import min_input_size, output_size
from robustlib.models.ibp_cnns import CNN7, CNNLarge, CNNMedium, CNNSmall
from robustlib.models.inputs import ModelInputError, check_stats
from robustlib.models.mlp import MLP
from robustlib.models.preact_resnet import PreActResNet18
from robustlib.models.verifier import WithVerifier
from robustlib.models.wide_resnet import WideResNet

MODELS: types.MappingProxyType[str, type[nn.Module]] = types.MappingProxyType({
    "mlp": MLP,
    "cnn_small": CNNSmall,
    "cnn_medium": CNNMedium,
    "cnn_large": CNNLarge,
    "cnn7": CNN7,
    "preact_resnet18": PreActResNet18,
    "wide_resnet": WideResNet,
    "wrn28_10": WideResNet,
})

# Fields that a name fixes; ``create`` refuses to override them.
_PRESETS: types.MappingProxyType[str, dict[str, Any]] = types.MappingProxyType({
    "wrn28_10": {
        "depth": 28,
        "width": 10
    },
})

_SET_BY_CREATE = ("num_classes", "mean", "std")


def _options(cls: type[nn.Module]) -> list[str]:
  """The fields a model takes as keyword arguments besides those of create."""
  return [
      f.name
      for f in dataclasses.fields(cls)
      if f.init and f.name not in ("parent", "name", *_SET_BY_CREATE)
  ]


def check_input_shape(model: nn.Module,
                      input_shape: Sequence[int],
                      name: str | None = None) -> None:
  """Checks that ``model`` can take images of shape ``input_shape``.

  Models of this package describe their convolutions with
  ``spatial_layers()`` and carry ``mean``/``std``; for other modules only the
  form of ``input_shape`` is checked.

  Args:
    model: the module.
    input_shape: ``(H, W, C)``.
    name: the model's name in error messages; its class name by default.

  Raises:
    ModelInputError: if ``input_shape`` is not ``(H, W, C)`` of positive
      sizes, is smaller than the model's smallest accepted image, or the
      model's ``mean``/``std`` do not fit ``C``.
  """
  name = name or type(model).__name__
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
    raise ModelInputError(f"{name}: input_shape must be (H, W, C) of positive ints, got {shape}")
  height, width, channels = shape
  layers = model.spatial_layers() if hasattr(model, "spatial_layers") else ()
  smallest = min_input_size(layers)
  if min(height, width) < smallest:
    raise ModelInputError(f"{name} cannot take input_shape {shape}: its convolutions need images "
                          f"of at least {smallest}x{smallest}, got {height}x{width} (feature map "
                          f"{output_size(height, layers)}x{output_size(width, layers)})")
  if hasattr(model, "mean") and hasattr(model, "std"):
    try:
      check_stats(model.mean, model.std, channels)
    except ModelInputError as e:
      raise ModelInputError(f"{name} with input_shape {shape}: {e}") from None


def create(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    ensemble: int = 1,
    verifier_width: int = 0,
    **kwargs: Any,
) -> nn.Module:
  """Builds the model called ``name`` and checks that it can take ``input_shape``.

  Args:
    name: a key of ``MODELS``.
    num_classes: number of logits.
    input_shape: ``(H, W, C)`` of one image.
    mean: per-channel input mean (one value or ``C`` values).
    std: per-channel input standard deviation (nonzero).
    ensemble: more than 1: an `Ensemble` of that many independently initialized
      models, whose output is the mean of their logits.
    verifier_width: more than 0: the model `WithVerifier`, a learned verifier of that
      hidden width beside it (predictor-verifier training).
    **kwargs: the model's other fields, e.g. ``hidden`` for ``mlp`` or
      ``depth``, ``width`` and ``activation`` for ``wide_resnet``.

  Returns:
    The unbound module; initialize it with ``init``.

  Raises:
    ModelInputError: naming the valid names if ``name`` is unknown, or the
      accepted options if a keyword is not one of them; if ``num_classes`` or
      ``ensemble`` is not an integer >= 1; if the model cannot take
      ``input_shape`` (too small for its convolutions, not of rank 3) or
      ``mean``/``std`` do not fit it.
    ValueError: if an option has an invalid value (e.g. a WideResNet depth).
  """
  if name not in MODELS:
    raise ModelInputError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
  cls = MODELS[name]
  preset = _PRESETS.get(name, {})
  options = [o for o in _options(cls) if o not in preset]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ModelInputError(f"{name} got unknown options {unknown}; it accepts {options} "
                          f"besides {list(_SET_BY_CREATE)}")
  # Lists (from JSON or YAML configs) become tuples: module attributes must be hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if not isinstance(ensemble, numbers.Integral) or isinstance(ensemble, bool) or ensemble < 1:
    raise ModelInputError(f"ensemble must be a number of members >= 1, got {ensemble!r}")
  if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes,
                                                                 bool) or num_classes < 1:
    raise ModelInputError(f"num_classes must be an integer >= 1, got {num_classes!r}")
  model = cls(num_classes=num_classes, mean=tuple(mean), std=tuple(std), **preset, **kwargs)
  check_input_shape(model, input_shape, name)
  if not isinstance(verifier_width, numbers.Integral) or isinstance(verifier_width,
                                                                    bool) or verifier_width < 0:
    raise ModelInputError(f"verifier_width must be an integer >= 0, got {verifier_width!r}")
  model = Ensemble(model, int(ensemble)) if ensemble > 1 else model
  return WithVerifier(model, int(verifier_width)) if verifier_width else model


def _init_fn(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Any:
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)


_init = jax.jit(_init_fn, static_argnums=(0, 2))
# Initialization runs once per model, so at the top level it is compiled for
# compile time rather than run time: unoptimized, the many random draws of a
# ResNet compile several times faster on CPU. XLA takes compiler options only
# at the top level; inside a transformation (e.g. ``jax.eval_shape``) ``_init``
# is used.
_init_top_level = jax.jit(_init_fn,
                          static_argnums=(0, 2),
                          compiler_options={"xla_backend_optimization_level": 0})


def init(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Initializes ``model`` for images of shape ``input_shape``, under jit.

  Args:
    model: an unbound model, e.g. from ``create``.
    key: a PRNG key.
    input_shape: ``(H, W, C)``.

  Returns:
    The variables ``{"params": ...}``, with ``"batch_stats"`` for models with
    BatchNorm, made from a dummy batch of one image in eval mode.

  Raises:
    ModelInputError: as ``check_input_shape``.
  """
  check_input_shape(model, input_shape)
  key = as_key(key)
  initialize = _init if isinstance(key, jax.core.Tracer) else _init_top_level
  return dict(initialize(model, key, tuple(int(d) for d in input_shape)))

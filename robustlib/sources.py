"""A classifier and its test data, from a training run or an ONNX file.

The evaluation scripts (``attacks.evaluate``, ``verify.certify``) take either a
training run's ``--workdir`` (its config names the model and the data set) or
``--onnx=model.onnx`` with ``--dataset=``. Either way they get a pure
``logits_fn`` of the data set's images (NHWC, values in [0, 1]): an ONNX
network that reads NCHW or flattened images gets them rearranged in front of it
(flattened in C, H, W order, as PyTorch's ``flatten`` of an NCHW tensor does).
"""

from __future__ import annotations

import dataclasses
import os
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import checkpoints, data
from robustlib.checks import InputError
from robustlib.pipelines import LogitsFn, as_logits_fn

CHECKPOINTS = ("latest", "best")  # which checkpoint of a run `load_test_set` evaluates
CHECKPOINT_FIELD = "checkpoint"  # where a result file records which one it evaluated


@dataclasses.dataclass(frozen=True)
class TestSet:
  """A classifier with the test examples to evaluate it on.

  Attributes:
    logits_fn: ``[N, H, W, C] -> [N, K]``, pure.
    images: ``[N, H, W, C]`` float32 in [0, 1].
    labels: ``[N]`` int.
    dataset: the data set's name.
    model: the model's name (the run's, or the ONNX file's).
    source: absolute path of the run's directory or of the ONNX file.
    verifier: for a run trained with a learned verifier (``config.verifier_width > 0``),
      its per-neuron predictions ``features [..., F] -> [..., 2]``
      (`robustlib.models.WithVerifier.duals`); else None.
  """
  logits_fn: LogitsFn
  images: np.ndarray
  labels: np.ndarray
  dataset: str
  model: str
  source: str
  verifier: Callable | None = None


def onnx_layout(model_shape: Sequence[int], image_shape: Sequence[int]):
  """The map from NHWC images ``[N, *image_shape]`` to the network's ``[N, *model_shape]``.

  Raises:
    InputError: when the network takes neither ``(H, W, C)``, ``(C, H, W)`` nor
      ``H * W * C`` features.
  """
  model_shape, image_shape = tuple(model_shape), tuple(image_shape)
  if model_shape == image_shape:
    return lambda x: x
  h, w, c = image_shape
  if model_shape == (c, h, w):
    return lambda x: jnp.transpose(x, (0, 3, 1, 2))
  if model_shape in ((h * w * c,), (1, h * w * c)):
    return lambda x: jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0],) + model_shape)
  raise InputError(f"the ONNX network takes inputs of shape {model_shape}; the data set's images "
                   f"are {image_shape} (H, W, C), which fits neither that, (C, H, W) nor "
                   f"{h * w * c} features")


def _onnx_logits_fn(path: str, info) -> tuple[LogitsFn, str]:
  from robustlib import onnx as ronnx  # pylint: disable=import-outside-toplevel
  model = ronnx.load(path)
  if tuple(model.output_shape) != (info.num_classes,):
    raise InputError(f"{path}: the network's outputs have shape {model.output_shape}; the data "
                     f"set has {info.num_classes} classes")
  layout = onnx_layout(model.input_shape, info.input_shape)
  return (lambda x: model.fn(layout(x))), os.path.basename(path)


def load_test_set(workdir: str | None = None,
                  *,
                  onnx: str | None = None,
                  dataset: str | None = None,
                  data_dir: str | None = None,
                  num_examples: int = 0,
                  checkpoint: str = "latest") -> TestSet:
  """The classifier of ``workdir`` (its latest checkpoint) or of ``onnx``, with test data.

  Args:
    workdir: a training run's directory; exclusive with ``onnx``.
    onnx: an ONNX file (needs the ``onnx`` extra and ``dataset``).
    dataset: the data set (default: the run's); for a run, another data set
      must have the same input shape and classes.
    data_dir: where the data files are (default: the run's, then
      ``ROBUSTLIB_DATA_DIR``).
    num_examples: the first this many test examples (0: all).
    checkpoint: a run's ``"latest"`` checkpoint, or its ``"best"`` (of best validation
      accuracy, ``checkpoints_best/``).

  Returns:
    A `TestSet`.
  """
  if checkpoint not in CHECKPOINTS:
    raise InputError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
  if (workdir is None) == (onnx is None):
    raise InputError("give either a training run's workdir or an ONNX file, not both or neither")
  if num_examples < 0:
    raise InputError(f"num_examples must be >= 0, got {num_examples}")
  verifier = None
  if onnx is not None:
    if not dataset:
      raise InputError("an ONNX network needs the data set it classifies (dataset=)")
    info = data.info(dataset)
    logits_fn, model = _onnx_logits_fn(onnx, info)
    source = os.path.abspath(onnx)
  else:
    config, flax_model, variables = checkpoints.load_run(workdir, best=checkpoint == "best")
    info = data.info(config["dataset"])
    dataset = dataset or config["dataset"]
    if dataset != config["dataset"]:
      other = data.info(dataset)
      if (other.input_shape, other.num_classes) != (info.input_shape, info.num_classes):
        raise InputError(f"the run was trained on {config['dataset']!r} ({info.input_shape}, "
                         f"{info.num_classes} classes); {dataset!r} does not match")
    data_dir = data_dir or config.get("data_dir") or None
    logits_fn, model = as_logits_fn(flax_model, variables, info.input_shape), config["model"]
    if config.get("verifier_width", 0):
      verifier = functools.partial(flax_model.apply, variables, method="duals")
    source = os.path.abspath(workdir)
  test = data.load(dataset, "test", data_dir=data_dir)
  images, labels = np.asarray(test.images), np.asarray(test.labels)
  if num_examples:
    images, labels = images[:num_examples], labels[:num_examples]
  jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32))
  return TestSet(logits_fn, images, labels, dataset, model, source, verifier)

"""Static facts about each supported data set: shape, classes, statistics."""

from __future__ import annotations

import dataclasses

from robustlib.data.errors import DataError

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_TRAIN_SIZE = 2048
SYNTHETIC_TEST_SIZE = 512
SPLITS = ("train", "test")

_DIGIT_NAMES = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Description of an image-classification data set.

    Attributes:
        name: Name accepted by `load` and `info`, e.g. ``"mnist"``.
        input_shape: ``(H, W, C)`` of one image (NHWC layout without N).
        num_classes: Labels lie in ``[0, num_classes)``.
        mean: Per-channel mean of the training pixels in ``[0, 1]`` units, length ``C``.
        std: Per-channel standard deviation in ``[0, 1]`` units, length ``C``.
        class_names: Human-readable name of each label, length ``num_classes``.
        train_size: Number of examples in the ``"train"`` split.
        test_size: Number of examples in the ``"test"`` split.
    """

  name: str
  input_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  train_size: int
  test_size: int

  def __post_init__(self) -> None:
    channels = self.input_shape[-1]
    if len(self.input_shape) != 3 or len(self.mean) != channels or len(self.std) != channels:
      raise DataError(f"DatasetInfo {self.name!r}: input_shape must be (H, W, C) and mean/std must "
                      f"have C entries; got input_shape={self.input_shape}, mean={self.mean}, "
                      f"std={self.std}.")
    if len(self.class_names) != self.num_classes:
      raise DataError(f"DatasetInfo {self.name!r}: {len(self.class_names)} class names for "
                      f"{self.num_classes} classes.")

  def split_size(self, split: str) -> int:
    """Number of examples in ``split`` (``"train"`` or ``"test"``)."""
    check_split(split)
    return self.train_size if split == "train" else self.test_size


_BASE_INFOS: dict[str, DatasetInfo] = {
    # scikit-learn's 8x8 digits with the fixed stratified split of `digits.py`.
    # Statistics: the 1438 training images, pixels / 16.
    "digits":
        DatasetInfo(
            name="digits",
            input_shape=(8, 8, 1),
            num_classes=10,
            mean=(0.3055,),
            std=(0.3761,),
            class_names=_DIGIT_NAMES,
            train_size=1438,
            test_size=359,
        ),
    "mnist":
        DatasetInfo(
            name="mnist",
            input_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            class_names=_DIGIT_NAMES,
            train_size=60000,
            test_size=10000,
        ),
    "fashion_mnist":
        DatasetInfo(
            name="fashion_mnist",
            input_shape=(28, 28, 1),
            num_classes=10,
            mean=(0.2860,),
            std=(0.3530,),
            class_names=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            train_size=60000,
            test_size=10000,
        ),
    "cifar10":
        DatasetInfo(
            name="cifar10",
            input_shape=(32, 32, 3),
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            class_names=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
            train_size=50000,
            test_size=10000,
        ),
}

BASE_NAMES: tuple[str, ...] = tuple(_BASE_INFOS)


def valid_names() -> tuple[str, ...]:
  """All names accepted by `info` and `load`, synthetic variants included."""
  return BASE_NAMES + tuple(SYNTHETIC_PREFIX + name for name in BASE_NAMES)


def check_split(split: str) -> None:
  """Raises `DataError` unless ``split`` is ``"train"`` or ``"test"``."""
  if split not in SPLITS:
    raise DataError(f"Unknown split {split!r}; valid splits are {', '.join(SPLITS)}.")


def info(name: str) -> DatasetInfo:
  """Returns the description of a data set.

    Args:
        name: One of ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, or
            ``"synthetic:<name>"`` for random images with ``<name>``'s shape, classes and
            statistics (2048 train / 512 test examples).

    Returns:
        The `DatasetInfo`; no file is read.

    Raises:
        DataError: If ``name`` is unknown; the message lists the valid names.

    Example:
        >>> info("mnist").input_shape
        (28, 28, 1)
    """
  if not isinstance(name, str):
    raise DataError(f"a data set's name must be a string, got {name!r}; valid names are "
                    f"{', '.join(valid_names())}.")
  if name in _BASE_INFOS:
    return _BASE_INFOS[name]
  if name.startswith(SYNTHETIC_PREFIX) and name[len(SYNTHETIC_PREFIX):] in _BASE_INFOS:
    base = _BASE_INFOS[name[len(SYNTHETIC_PREFIX):]]
    return dataclasses.replace(base,
                               name=name,
                               train_size=SYNTHETIC_TRAIN_SIZE,
                               test_size=SYNTHETIC_TEST_SIZE)
  raise DataError(f"Unknown dataset {name!r}; valid names are {', '.join(valid_names())}.")

"""Reader of the CIFAR-10 python batches, from a directory or from the tar archive."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from robustlib.data.errors import DataError

BATCHES_DIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
_PIXELS = 32 * 32 * 3

# The only globals a CIFAR batch needs: numpy's array reconstruction, and the bytes
# encoder protocol-2 pickles written by Python 3 use for raw buffers.
_ALLOWED_GLOBALS = frozenset({("_codecs", "encode")}) | frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")) | frozenset(
        (module, name)
        for module in ("numpy", "numpy.core.numeric", "numpy._core.numeric")
        for name in ("ndarray", "dtype", "_frombuffer"))


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global except numpy array reconstruction."""

  def find_class(self, module: str, name: str):  # noqa: D102
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
    return super().find_class(module, name)


def split_batches(split: str) -> tuple[str, ...]:
  """Names of the batch files of ``split`` (``"train"`` or ``"test"``)."""
  return TRAIN_BATCHES if split == "train" else TEST_BATCHES


def parse_cifar_batch(data: bytes, *, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
  """Parses one pickled CIFAR-10 batch.

    A batch is a dict with ``b"data"``, uint8 ``[n, 3072]`` whose rows hold the 1024 red,
    then 1024 green, then 1024 blue pixels of a 32x32 image in row-major order, and
    ``b"labels"``, ``n`` integers in ``[0, 10)``. Only numpy array reconstruction is
    allowed while unpickling; any other global is refused.

    Args:
        data: The pickle bytes.
        source: Name used in error messages.

    Returns:
        ``(images, labels)``: uint8 ``[n, 32, 32, 3]`` (NHWC, RGB) and int32 ``[n]``.

    Raises:
        DataError: If the pickle is malformed or the arrays have the wrong type or shape.
    """
  try:
    batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # Malformed pickles raise many different types.
    raise DataError(f"{source}: not a valid CIFAR-10 batch pickle ({e!r}).") from e
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise DataError(
        f"{source}: a CIFAR-10 batch is a dict with keys b'data' and b'labels'; got {keys}.")
  pixels = batch[b"data"]
  if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or
      pixels.shape[1] != _PIXELS):
    raise DataError(f"{source}: b'data' must be uint8 [n, {_PIXELS}]; got "
                    f"{getattr(pixels, 'dtype', type(pixels).__name__)} with shape "
                    f"{getattr(pixels, 'shape', None)}.")
  try:
    labels = np.asarray(batch[b"labels"])
  except Exception as e:
    raise DataError(f"{source}: b'labels' is not a list of integers ({e!r}).") from e
  if labels.ndim != 1 or labels.shape[0] != pixels.shape[0] or not (np.issubdtype(
      labels.dtype, np.integer)):
    raise DataError(f"{source}: b'labels' must hold {pixels.shape[0]} integers, one per row of "
                    f"b'data'; got dtype {labels.dtype} with shape {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataError(f"{source}: labels must lie in [0, 10); got [{labels.min()}, "
                    f"{labels.max()}].")
  images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 batch file; see `parse_cifar_batch` for the format.

    Returns:
        ``(images, labels)``: uint8 ``[n, 32, 32, 3]`` and int32 ``[n]``.
    """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e}).") from e
  return parse_cifar_batch(data, source=path)


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def read_cifar_dir(directory: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the batches of ``split`` from an extracted ``cifar-10-batches-py`` directory.

    Returns:
        ``(images, labels)``: uint8 ``[N, 32, 32, 3]`` and int32 ``[N]``, batches in order.
    """
  return _concatenate([read_cifar_batch(os.path.join(directory, b)) for b in split_batches(split)])


def read_cifar_archive(path: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the batches of ``split`` from ``cifar-10-python.tar.gz`` without extracting.

    Returns:
        ``(images, labels)``: uint8 ``[N, 32, 32, 3]`` and int32 ``[N]``, batches in order.

    Raises:
        DataError: If the archive is unreadable or lacks a batch.
    """
  path = os.fspath(path)
  parts = []
  try:
    with tarfile.open(path, "r:gz") as tar:
      for batch in split_batches(split):
        member = f"{BATCHES_DIR}/{batch}"
        try:
          f = tar.extractfile(member)
        except KeyError:
          f = None
        if f is None:
          raise DataError(f"{path}: the archive has no regular file {member}.")
        with f:
          parts.append(parse_cifar_batch(f.read(), source=f"{path}:{member}"))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f"{path}: not a readable tar.gz archive ({e}).") from e
  return _concatenate(parts)

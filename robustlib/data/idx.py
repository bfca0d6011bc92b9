"""Strict reader of the IDX format used by MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from robustlib.data.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
  """Returns the content of ``path``, gunzipped if it is (or is named as) gzip."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e}).") from e
  if raw[:2] == _GZIP_MAGIC:
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: bad gzip data ({e}); the file is truncated or corrupt, "
                      "delete it and fetch it again.") from e
  if path.endswith(".gz"):
    raise DataError(f"{path}: bad gzip data (the name ends in .gz but the file does not start with "
                    f"the gzip magic bytes 1f 8b; it starts with {raw[:4].hex()}).")
  return raw


def parse_idx(data: bytes,
              *,
              source: str = "<bytes>",
              expected_magic: int | None = None) -> np.ndarray:
  """Parses an uncompressed IDX buffer.

    Args:
        data: The IDX bytes: a 4-byte magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
            uint32 dimensions, then exactly ``prod(dims)`` big-endian items.
        source: Name used in error messages.
        expected_magic: If given, the magic number the buffer must carry
            (`IMAGES_MAGIC` or `LABELS_MAGIC`).

    Returns:
        An array of shape ``dims`` in native byte order (uint8 for MNIST files).

    Raises:
        DataError: On a bad magic number, an unknown type code, a header cut short, or a
            payload whose length differs from the one the header announces.
    """
  if len(data) < 4:
    raise DataError(f"{source}: only {len(data)} bytes, too short for an IDX header.")
  (magic,) = struct.unpack(">I", data[:4])
  type_code, ndim = data[2], data[3]
  if data[:2] != b"\x00\x00" or type_code not in _DTYPES or ndim == 0:
    raise DataError(f"{source}: bad magic number {magic} (0x{magic:08x}); an IDX file starts with "
                    "00 00 <type> <ndim>, e.g. 2051 for images and 2049 for labels.")
  if expected_magic is not None and magic != expected_magic:
    raise DataError(f"{source}: bad magic number {magic}, expected {expected_magic}.")
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise DataError(f"{source}: header cut short: {len(data)} bytes, {header_size} needed for "
                    f"{ndim} dimensions.")
  dims = struct.unpack(f">{ndim}I", data[4:header_size])
  dtype = _DTYPES[type_code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  actual = len(data) - header_size
  if actual != expected:
    raise DataError(f"{source}: size mismatch: the header announces dims {dims} "
                    f"({expected} bytes of data) but {actual} bytes follow the header; the file is "
                    f"{'truncated' if actual < expected else 'too long'}.")
  array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
  return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or raw.

    Args:
        path: File to read; gzip content is recognised by its magic bytes.
        expected_magic: If given, the magic number the file must carry
            (2051 for image files, 2049 for label files).

    Returns:
        The array, e.g. uint8 ``[N, 28, 28]`` for an MNIST image file or uint8 ``[N]``
        for a label file.

    Raises:
        DataError: If the file is unreadable, not valid gzip, or not valid IDX (bad magic,
            header cut short, payload size different from the header's).

    Example:
        >>> read_idx("mnist/t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
  path = os.fspath(path)
  return parse_idx(_read_bytes(path), source=path, expected_magic=expected_magic)


def read_idx_pair(images_path: str | os.PathLike[str],
                  labels_path: str | os.PathLike[str],
                  *,
                  image_hw: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
  """Reads an IDX image file and its label file and checks that they agree.

    Args:
        images_path: IDX file with magic 2051 and dims ``[N, H, W]``.
        labels_path: IDX file with magic 2049 and dims ``[N]``.
        image_hw: Expected ``(H, W)``.

    Returns:
        ``(images, labels)``: uint8 ``[N, H, W]`` and uint8 ``[N]``.

    Raises:
        DataError: On any format problem, unexpected image size, or a count mismatch.
    """
  images = read_idx(images_path, expected_magic=IMAGES_MAGIC)
  labels = read_idx(labels_path, expected_magic=LABELS_MAGIC)
  if tuple(images.shape[1:]) != tuple(image_hw):
    raise DataError(f"{os.fspath(images_path)}: images are {images.shape[1]}x{images.shape[2]}, "
                    f"expected {image_hw[0]}x{image_hw[1]}.")
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"count mismatch: {os.fspath(images_path)} holds {images.shape[0]} images but "
                    f"{os.fspath(labels_path)} holds {labels.shape[0]} labels.")
  return images, labels

"""`load`: one entry point that turns a data set name and split into a `Dataset`."""

from __future__ import annotations

import os

from robustlib.data import cifar, digits, idx, synthetic
from robustlib.data.dataset import Dataset, from_uint8
from robustlib.data.errors import DataError
from robustlib.data.files import locate, resolve_cache_dir, resolve_data_dir, verify_file
from robustlib.data.info import SYNTHETIC_PREFIX, DatasetInfo, check_split, info
from robustlib.data.catalog import CIFAR10_BATCH_FILES, SOURCES

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _check_count(data_info: DatasetInfo, split: str, count: int, where: str) -> None:
  expected = data_info.split_size(split)
  if count != expected:
    raise DataError(f"wrong count: {where} holds {count} examples, but the {split} split of "
                    f"{data_info.name} has {expected}.")


def _load_idx(name: str, split: str, data_dir: str | None, download: bool,
              cache_dir: str | None) -> Dataset:
  """MNIST or Fashion-MNIST from the four official IDX gzip files."""
  data_info = info(name)
  prefix = _IDX_PREFIX[split]
  images_name = f"{prefix}-images-idx3-ubyte.gz"
  labels_name = f"{prefix}-labels-idx1-ubyte.gz"
  paths = locate(name,
                 SOURCES[name], (images_name, labels_name),
                 data_dir=data_dir,
                 download=download,
                 cache_dir=cache_dir)
  images, labels = idx.read_idx_pair(paths[images_name], paths[labels_name])
  _check_count(data_info, split, len(labels), paths[images_name])
  return from_uint8(images, labels, data_info)


def _load_cifar10(split: str, data_dir: str | None, download: bool,
                  cache_dir: str | None) -> Dataset:
  """CIFAR-10 from extracted python batches if present, else from the tar.gz archive."""
  data_info = info("cifar10")
  subdir = SOURCES["cifar10"].subdir
  roots = [r for r in (resolve_data_dir(data_dir), resolve_cache_dir(cache_dir)) if r]
  for root in roots:
    batches_dir = os.path.join(root, subdir, cifar.BATCHES_DIR)
    specs = [s for s in CIFAR10_BATCH_FILES if s.name in cifar.split_batches(split)]
    if all(os.path.isfile(os.path.join(batches_dir, s.name)) for s in specs):
      for spec in specs:
        verify_file(os.path.join(batches_dir, spec.name), spec)
      images, labels = cifar.read_cifar_dir(batches_dir, split)
      _check_count(data_info, split, len(labels), batches_dir)
      return from_uint8(images, labels, data_info)
  batches = ", ".join(cifar.split_batches(split))
  hint = (f" Alternatively put the extracted batches {batches} in "
          f"<data_dir>/{subdir}/{cifar.BATCHES_DIR}/.")
  paths = locate("cifar10",
                 SOURCES["cifar10"], (cifar.ARCHIVE,),
                 data_dir=data_dir,
                 download=download,
                 cache_dir=cache_dir,
                 hint=hint)
  images, labels = cifar.read_cifar_archive(paths[cifar.ARCHIVE], split)
  _check_count(data_info, split, len(labels), paths[cifar.ARCHIVE])
  return from_uint8(images, labels, data_info)


def load(name: str,
         split: str = "train",
         *,
         data_dir: str | None = None,
         download: bool = True,
         cache_dir: str | None = None) -> Dataset:
  """Loads one split of a data set into memory.

    Sources by name:

    * ``"digits"``: scikit-learn's 8x8 digits, shipped with scikit-learn (no file, no
      network); pixels / 16; a fixed stratified split, 1438 train / 359 test.
    * ``"mnist"``, ``"fashion_mnist"``: the official IDX gzip files
      ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in ``<data_dir>/<name>/``.
    * ``"cifar10"``: the official python batches in
      ``<data_dir>/cifar10/cifar-10-batches-py/`` or the archive
      ``<data_dir>/cifar10/cifar-10-python.tar.gz`` (read without extracting).
    * ``"synthetic:<name>"``: deterministic uniform random images shaped like ``<name>``.

    Files are looked for in the data directory, then in the cache; every file is checked
    against its official SHA-256 (MD5 for extracted CIFAR batches). Missing files are
    downloaded into the cache when ``download`` is true.

    Args:
        name: Data set name; see `info`.
        split: ``"train"`` or ``"test"``.
        data_dir: Directory with one sub-directory per data set; defaults to
            ``$ROBUSTLIB_DATA_DIR``.
        download: Whether missing files may be fetched from the official mirrors.
        cache_dir: Download directory; defaults to ``$ROBUSTLIB_CACHE_DIR``, then
            ``$XDG_CACHE_HOME/robustlib``, then ``~/.cache/robustlib``.

    Returns:
        A `Dataset`: float32 images ``[N, H, W, C]`` in ``[0, 1]`` and int32 labels ``[N]``.

    Raises:
        DataError: For an unknown name or split, missing files (naming them and the
            directory to put them in), a failed download, a checksum mismatch, or a
            malformed file.

    Example:
        >>> ds = load("mnist", "test", data_dir="/data")
        >>> ds.images.shape
        (10000, 28, 28, 1)
    """
  data_info = info(name)
  check_split(split)
  if name.startswith(SYNTHETIC_PREFIX):
    images, labels = synthetic.synthetic_arrays(data_info, split)
    return Dataset(images, labels, data_info)
  if name == "digits":
    images, labels = digits.load_digits_split(split)
    return Dataset(images, labels, data_info)
  if name == "cifar10":
    return _load_cifar10(split, data_dir, download, cache_dir)
  return _load_idx(name, split, data_dir, download, cache_dir)

"""Specification of robustlib.data: formats, checksums, errors, splits and batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from robustlib import data
from robustlib.data import digits as digits_module
from robustlib.data import catalog, files, loaders
from robustlib.data.dataset import from_uint8
from robustlib.data.idx import read_idx_pair
from robustlib.data.cifar import parse_cifar_batch, read_cifar_dir

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
DIGITS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]

# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, dims, row-major bytes."""
  if magic is None:
    magic = 0x0800 | array.ndim
  header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write(path: Path, content: bytes, *, compress: bool = True) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(content) if compress else content)
  return path


def cifar_batch_bytes(images_nhwc: np.ndarray, labels: list[int]) -> bytes:
  """A pickled batch in the layout of the official CIFAR-10 python files."""
  rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072)
  return pickle.dumps(
      {
          b"batch_label": b"test",
          b"labels": labels,
          b"data": rows,
          b"filenames": [b"x.png"] * len(labels)
      },
      protocol=2)


def toy_info(num_classes: int = 10, shape: tuple[int, int, int] = (1, 1, 1)) -> data.DatasetInfo:
  return data.DatasetInfo(name="toy",
                          input_shape=shape,
                          num_classes=num_classes,
                          mean=(0.5,) * shape[-1],
                          std=(0.5,) * shape[-1],
                          class_names=tuple(str(c) for c in range(num_classes)),
                          train_size=0,
                          test_size=0)


def indexed_dataset(n: int) -> data.Dataset:
  """Example i has the single pixel value i / n, so batches reveal their indices."""
  images = (np.arange(n, dtype=np.float32) / n).reshape(n, 1, 1, 1)
  return data.Dataset(images, (np.arange(n) % 10).astype(np.int32), toy_info())


def indices_of(images: np.ndarray, n: int) -> np.ndarray:
  return np.rint(np.asarray(images).reshape(-1) * n).astype(np.int64)


def shared_data_dir() -> Path:
  env = os.environ.get("ROBUSTLIB_DATA_DIR")
  return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture
def no_env(monkeypatch, tmp_path):
  """No data directory from the environment; downloads would go to a fresh cache."""
  monkeypatch.delenv("ROBUSTLIB_DATA_DIR", raising=False)
  monkeypatch.setenv("ROBUSTLIB_CACHE_DIR", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- IDX


def test_read_idx_round_trips_gzip_images_and_labels(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  img_path = write(tmp_path / "imgs-idx3-ubyte.gz", idx_bytes(images))
  lbl_path = write(tmp_path / "lbls-idx1-ubyte.gz", idx_bytes(labels))

  got_images, got_labels = read_idx_pair(img_path, lbl_path)

  assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(data.read_idx(lbl_path), labels)
  np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_reads_uncompressed_files_row_major(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = write(tmp_path / "raw-idx3-ubyte", idx_bytes(array), compress=False)
  got = data.read_idx(path)
  assert got.shape == (2, 3, 4)
  assert got[1, 2, 3] == 23 and got[0, 1, 0] == 4


def test_read_idx_rejects_truncated_payload(tmp_path):
  images = np.zeros((5, 28, 28), np.uint8)
  path = write(tmp_path / "cut-idx3-ubyte.gz", idx_bytes(images)[:-10])
  with pytest.raises(data.DataError, match=r"size mismatch.*truncated") as e:
    data.read_idx(path)
  assert str(path) in str(e.value)


def test_read_idx_rejects_header_count_larger_than_payload(tmp_path):
  content = bytearray(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
  content[4:8] = struct.pack(">I", 6)  # Header claims 6 images, 5 follow.
  path = write(tmp_path / "count-idx3-ubyte.gz", bytes(content))
  with pytest.raises(data.DataError, match="size mismatch"):
    data.read_idx(path)


def test_read_idx_rejects_bad_magic(tmp_path):
  path = write(tmp_path / "magic-idx3-ubyte.gz", b"\x12\x34\x08\x03" + bytes(12 + 784))
  with pytest.raises(data.DataError, match="bad magic"):
    data.read_idx(path)


def test_read_idx_rejects_labels_where_images_expected(tmp_path):
  path = write(tmp_path / "labels-idx1-ubyte.gz", idx_bytes(np.zeros(5, np.uint8)))
  with pytest.raises(data.DataError, match="bad magic number 2049, expected 2051"):
    data.read_idx(path, expected_magic=2051)


def test_read_idx_pair_rejects_count_mismatch(tmp_path):
  img = write(tmp_path / "i.gz", idx_bytes(np.zeros((5, 28, 28), np.uint8)))
  lbl = write(tmp_path / "l.gz", idx_bytes(np.zeros(4, np.uint8)))
  with pytest.raises(data.DataError, match="count mismatch.*5 images.*4 labels"):
    read_idx_pair(img, lbl)


def test_read_idx_rejects_bad_gzip(tmp_path):
  whole = gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
  cut = tmp_path / "cut.gz"
  cut.write_bytes(whole[:len(whole) // 2])
  with pytest.raises(data.DataError, match="bad gzip"):
    data.read_idx(cut)
  not_gzip = tmp_path / "plain.gz"
  not_gzip.write_bytes(b"<html>404 Not Found</html>")
  with pytest.raises(data.DataError, match="bad gzip"):
    data.read_idx(not_gzip)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar_batch_rows_are_planar_rgb_and_become_nhwc():
  row = np.zeros(3072, np.uint8)
  row[:1024], row[1024:2048], row[2048:] = 10, 20, 30  # R, G, B planes.
  row[1] = 200  # Red of pixel (row 0, column 1).
  row[32] = 201  # Red of pixel (row 1, column 0).
  row[2048 + 33] = 202  # Blue of pixel (row 1, column 1).
  blob = pickle.dumps({b"data": row[None], b"labels": [7]}, protocol=2)

  images, labels = parse_cifar_batch(blob)

  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[0, 0, 0], [10, 20, 30])
  np.testing.assert_array_equal(images[0, 0, 1], [200, 20, 30])
  np.testing.assert_array_equal(images[0, 1, 0], [201, 20, 30])
  np.testing.assert_array_equal(images[0, 1, 1], [10, 20, 202])
  assert labels.dtype == np.int32 and labels.tolist() == [7]


def test_read_cifar_batch_round_trips_random_images(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  path = write(tmp_path / "data_batch_1", cifar_batch_bytes(images, [0, 9, 2, 2]), compress=False)
  got_images, got_labels = data.read_cifar_batch(path)
  np.testing.assert_array_equal(got_images, images)
  assert got_labels.tolist() == [0, 9, 2, 2]


def make_cifar_tree(root: Path) -> tuple[np.ndarray, np.ndarray]:
  """Writes tiny data_batch_1..5 (2 rows each) and test_batch (3 rows) under root."""
  rng = np.random.default_rng(2)
  train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  for i in range(5):
    write(root / f"data_batch_{i + 1}",
          cifar_batch_bytes(train[2 * i:2 * i + 2], [i, i + 1]),
          compress=False)
  write(root / "test_batch", cifar_batch_bytes(test, [9, 8, 7]), compress=False)
  return train, test


def test_cifar_directory_and_archive_give_the_same_batches_in_order(tmp_path):
  batches_dir = tmp_path / "cifar-10-batches-py"
  train, test = make_cifar_tree(batches_dir)
  archive = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(batches_dir, arcname="cifar-10-batches-py")

  dir_images, dir_labels = read_cifar_dir(batches_dir, "train")
  tar_images, tar_labels = data.read_cifar_archive(archive, "train")
  test_images, test_labels = data.read_cifar_archive(archive, "test")

  np.testing.assert_array_equal(dir_images, train)
  np.testing.assert_array_equal(tar_images, train)
  assert dir_labels.tolist() == tar_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
  np.testing.assert_array_equal(test_images, test)
  assert test_labels.tolist() == [9, 8, 7]


@pytest.mark.parametrize("blob, message", [
    (b"not a pickle at all", "not a valid CIFAR-10 batch pickle"),
    (pickle.dumps([1, 2, 3]), "dict with keys"),
    (pickle.dumps({
        b"data": np.zeros((2, 3072), np.float32),
        b"labels": [0, 1]
    }), r"b'data' must be uint8"),
    (pickle.dumps({
        b"data": np.zeros((2, 100), np.uint8),
        b"labels": [0, 1]
    }), r"b'data' must be uint8 \[n, 3072\]"),
    (pickle.dumps({
        b"data": np.zeros((2, 3072), np.uint8),
        b"labels": [0]
    }), "must hold 2 integers"),
    (pickle.dumps({
        b"data": np.zeros((1, 3072), np.uint8),
        b"labels": [10]
    }), r"labels must lie in \[0, 10\)"),
])
def test_malformed_cifar_batches_are_rejected(blob, message):
  with pytest.raises(data.DataError, match=message):
    parse_cifar_batch(blob, source="batch")


def test_cifar_unpickling_refuses_non_numpy_globals():
  import datetime
  blob = pickle.dumps({b"data": datetime.date(2020, 1, 1), b"labels": []})
  with pytest.raises(data.DataError, match="datetime.date is not allowed"):
    parse_cifar_batch(blob)


def test_cifar_archive_without_batch_is_rejected(tmp_path):
  archive = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    tar.addfile(info, io.BytesIO(b""))
  with pytest.raises(data.DataError, match="no regular file cifar-10-batches-py/test_batch"):
    data.read_cifar_archive(archive, "test")


# ----------------------------------------------------------------------------- Dataset


def test_from_uint8_scales_by_255_and_adds_channel_axis():
  raw = np.array([[[0, 51], [255, 128]]], np.uint8)
  ds = from_uint8(raw, np.array([4]), toy_info(shape=(2, 2, 1)))
  assert ds.images.dtype == np.float32 and ds.images.shape == (1, 2, 2, 1)
  expected = np.array([[0.0, 0.2], [1.0, 128 / 255]], np.float32)
  np.testing.assert_array_equal(ds.images[0, :, :, 0], expected)
  assert ds.labels.dtype == np.int32 and len(ds) == 1


@pytest.mark.parametrize("images, labels, message", [
    (np.full((1, 1, 1, 1), np.nan, np.float32), [0], "NaN or infinite"),
    (np.full((1, 1, 1, 1), np.inf, np.float32), [0], "NaN or infinite"),
    (np.full((1, 1, 1, 1), 1.5, np.float32), [0], r"\[0, 1\]"),
    (np.full((1, 1, 1, 1), -0.1, np.float32), [0], r"\[0, 1\]"),
    (np.zeros((1, 1, 1, 1), np.float64), [0], "float32"),
    (np.zeros((1, 1, 1), np.float32), [0], "rank 4"),
    (np.zeros((1, 2, 2, 1), np.float32), [0], "differs from info.input_shape"),
    (np.zeros((2, 1, 1, 1), np.float32), [0], "2 images but 1 labels"),
    (np.zeros((1, 1, 1, 1), np.float32), [10], r"labels must lie in \[0, 10\)"),
    (np.zeros((1, 1, 1, 1), np.float32), [-1], r"labels must lie in \[0, 10\)"),
])
def test_dataset_rejects_invalid_arrays(images, labels, message):
  with pytest.raises(data.DataError, match=message):
    data.Dataset(images, np.asarray(labels, np.int32), toy_info())


def test_dataset_rejects_int64_labels():
  with pytest.raises(data.DataError, match="int32"):
    data.Dataset(np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.int64), toy_info())


def test_shuffle_permutes_pairs_together_and_is_deterministic():
  ds = indexed_dataset(50)
  a, b = data.shuffle(ds, seed=3), data.shuffle(ds, seed=3)
  order = indices_of(a.images, 50)
  np.testing.assert_array_equal(a.images, b.images)
  assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
  np.testing.assert_array_equal(a.labels, order % 10)
  np.testing.assert_array_equal(indices_of(ds.images, 50), np.arange(50))  # Unchanged.


# ----------------------------------------------------------------------------- names


def test_info_standard_statistics():
  assert data.info("mnist").mean == (0.1307,) and data.info("mnist").std == (0.3081,)
  assert data.info("fashion_mnist").mean == (0.2860,)
  assert data.info("cifar10").std == (0.2470, 0.2435, 0.2616)
  assert data.info("cifar10").input_shape == (32, 32, 3)
  assert data.info("fashion_mnist").class_names[9] == "Ankle boot"
  assert data.info("cifar10").class_names[3] == "cat"


def test_synthetic_info_copies_shape_classes_and_statistics():
  base, syn = data.info("cifar10"), data.info("synthetic:cifar10")
  assert syn.name == "synthetic:cifar10"
  assert (syn.input_shape, syn.num_classes, syn.mean, syn.std,
          syn.class_names) == (base.input_shape, base.num_classes, base.mean, base.std,
                               base.class_names)
  assert (syn.train_size, syn.test_size) == (2048, 512)


def test_unknown_name_lists_valid_names():
  with pytest.raises(data.DataError, match="Unknown dataset 'imagenet'") as e:
    data.load("imagenet")
  for name in ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic:mnist"):
    assert name in str(e.value)
  with pytest.raises(data.DataError, match="Unknown dataset 'synthetic:svhn'"):
    data.info("synthetic:svhn")


def test_unknown_split_lists_valid_splits():
  with pytest.raises(data.DataError, match="Unknown split 'validation'.*train, test"):
    data.load("digits", "validation")


# ----------------------------------------------------------------------------- digits


def test_digits_splits_have_documented_sizes_shapes_and_range():
  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert (len(train), len(test)) == (1438, 359)
  assert (data.info("digits").train_size, data.info("digits").test_size) == (1438, 359)
  assert train.images.shape == (1438, 8, 8, 1) and train.images.dtype == np.float32
  assert train.labels.dtype == np.int32
  assert train.images.min() == 0.0 and train.images.max() == 1.0  # 16 / 16.
  assert np.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def test_digits_split_is_stable_disjoint_and_complete():
  _, labels = digits_module.load_digits_arrays()
  train_idx, test_idx = digits_module.split_indices(labels)
  again_train, again_test = digits_module.split_indices(labels)
  np.testing.assert_array_equal(train_idx, again_train)
  np.testing.assert_array_equal(test_idx, again_test)
  assert np.intersect1d(train_idx, test_idx).size == 0
  np.testing.assert_array_equal(np.union1d(train_idx, test_idx), np.arange(1797))
  np.testing.assert_array_equal(data.load("digits", "test").labels, labels[test_idx])


def test_digits_whole_set_label_histogram():
  images, labels = digits_module.load_digits_arrays()
  assert images.shape == (1797, 8, 8, 1)
  assert np.bincount(labels).tolist() == DIGITS_COUNTS


def test_digits_statistics_match_the_training_split():
  train = data.load("digits", "train")
  assert data.info("digits").mean == (round(float(train.images.mean()), 4),)
  assert data.info("digits").std == (round(float(train.images.std()), 4),)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_shaped_like_its_base():
  a, b = data.load("synthetic:mnist", "train"), data.load("synthetic:mnist", "train")
  test = data.load("synthetic:mnist", "test")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.images.shape == (2048, 28, 28, 1) and test.images.shape == (512, 28, 28, 1)
  assert not np.array_equal(a.images[:512], test.images)
  assert set(np.unique(a.labels).tolist()) == set(range(10))


# ----------------------------------------------------------------------------- files


def test_data_dir_resolution_prefers_argument_then_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("ROBUSTLIB_DATA_DIR", raising=False)
  assert data.resolve_data_dir(None) is None
  monkeypatch.setenv("ROBUSTLIB_DATA_DIR", str(tmp_path / "env"))
  assert data.resolve_data_dir(None) == str(tmp_path / "env")
  assert data.resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_cache_dir_resolution_order(monkeypatch, tmp_path):
  monkeypatch.delenv("ROBUSTLIB_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data.resolve_cache_dir(None) == str(tmp_path / "xdg" / "robustlib")
  monkeypatch.setenv("ROBUSTLIB_CACHE_DIR", str(tmp_path / "env"))
  assert data.resolve_cache_dir(None) == str(tmp_path / "env")
  assert data.resolve_cache_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_missing_files_without_download_say_what_to_put_where(no_env, tmp_path):
  target = tmp_path / "nowhere"
  with pytest.raises(data.DataError) as e:
    data.load("mnist", "train", data_dir=str(target), download=False)
  message = str(e.value)
  assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
  assert str(target / "mnist") in message
  assert "ROBUSTLIB_DATA_DIR" in message and "download=False" in message


def test_missing_data_dir_setting_is_explained(no_env):
  with pytest.raises(data.DataError, match="No data directory is set.*ROBUSTLIB_DATA_DIR"):
    data.load("fashion_mnist", "test", download=False)


def test_download_failure_names_files_directory_and_network(no_env, tmp_path, monkeypatch):
  tried = []

  def offline(url, *args, **kwargs):
    tried.append(url)
    raise urllib.error.URLError("Name or service not known")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(data.DataError) as e:
    data.load("mnist", "test", data_dir=str(tmp_path / "data"), download=True)
  message = str(e.value)
  assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
  assert str(tmp_path / "data" / "mnist") in message and "ROBUSTLIB_DATA_DIR" in message
  assert "network unreachable" in message and "Name or service not known" in message
  assert tried[:3] == [m + "t10k-images-idx3-ubyte.gz" for m in catalog.SOURCES["mnist"].mirrors]
  cache = tmp_path / "cache" / "mnist"
  assert not cache.exists() or list(cache.iterdir()) == []  # No partial files left.


def test_cifar_missing_message_mentions_archive_and_extracted_batches(no_env, tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load("cifar10", "test", data_dir=str(tmp_path), download=False)
  assert "cifar-10-python.tar.gz" in str(e.value)
  assert "cifar-10-batches-py" in str(e.value) and "test_batch" in str(e.value)


def fake_source(content: bytes, name: str = "blob.gz") -> catalog.Source:
  return catalog.Source(subdir="fake",
                        mirrors=("https://a.invalid/", "https://b.invalid/"),
                        files=(catalog.FileSpec(name,
                                                len(content),
                                                sha256=hashlib.sha256(content).hexdigest()),))


def test_download_tries_mirrors_in_order_and_caches_verified_file(tmp_path, monkeypatch):
  content = b"official bytes"
  source = fake_source(content)

  def second_mirror_only(url, *args, timeout=None, **kwargs):
    assert timeout is not None and timeout > 0
    if url.startswith("https://a.invalid/"):
      raise urllib.error.HTTPError(url, 503, "unavailable", None, None)
    return io.BytesIO(content)

  monkeypatch.setattr(urllib.request, "urlopen", second_mirror_only)
  paths = files.locate("fake",
                       source, ("blob.gz",),
                       data_dir=None,
                       download=True,
                       cache_dir=str(tmp_path))
  assert paths["blob.gz"] == str(tmp_path / "fake" / "blob.gz")
  assert (tmp_path / "fake" / "blob.gz").read_bytes() == content
  assert os.listdir(tmp_path / "fake") == ["blob.gz"]  # Temp file renamed away.

  monkeypatch.setattr(urllib.request, "urlopen", None)  # Cached now: no network needed.
  again = files.locate("fake",
                       source, ("blob.gz",),
                       data_dir=None,
                       download=False,
                       cache_dir=str(tmp_path))
  assert again == paths


def test_download_with_wrong_checksum_is_rejected_and_not_kept(tmp_path, monkeypatch):
  source = fake_source(b"official bytes")
  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered!!!!!!"))
  with pytest.raises(data.DataError, match="checksum mismatch"):
    files.locate("fake",
                 source, ("blob.gz",),
                 data_dir=None,
                 download=True,
                 cache_dir=str(tmp_path))
  assert os.listdir(tmp_path / "fake") == []


def test_file_in_data_dir_with_wrong_checksum_is_rejected(no_env, tmp_path):
  spec = catalog.SOURCES["mnist"].file("t10k-labels-idx1-ubyte.gz")
  content = bytes(spec.size)  # Right size, wrong content.
  path = write(tmp_path / "mnist" / spec.name, content, compress=False)
  with pytest.raises(data.DataError) as e:
    data.load("mnist", "test", data_dir=str(tmp_path), download=False)
  message = str(e.value)
  assert "checksum mismatch" in message and str(path) in message
  assert spec.sha256 in message and hashlib.sha256(content).hexdigest() in message


def test_file_in_data_dir_with_wrong_size_is_rejected(no_env, tmp_path):
  write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", b"short", compress=False)
  with pytest.raises(data.DataError, match="size mismatch: 5 bytes, expected 4542"):
    data.load("mnist", "test", data_dir=str(tmp_path), download=False)


def test_load_verifies_then_parses_then_checks_the_split_size(no_env, tmp_path, monkeypatch):
  images = idx_bytes(np.zeros((5, 28, 28), np.uint8))
  labels = idx_bytes(np.arange(5, dtype=np.uint8))
  write(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", images)
  write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", labels)
  specs = tuple(
      catalog.FileSpec(p.name, p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest())
      for p in sorted((tmp_path / "mnist").iterdir()))
  monkeypatch.setitem(catalog.SOURCES, "mnist",
                      catalog.Source("mnist", catalog.SOURCES["mnist"].mirrors, specs))
  with pytest.raises(data.DataError, match="holds 5 examples.*test split of mnist has 10000"):
    data.load("mnist", "test", data_dir=str(tmp_path), download=False)


def test_load_cifar_from_extracted_batches_checks_their_md5(no_env, tmp_path, monkeypatch):
  batches_dir = tmp_path / "cifar10" / "cifar-10-batches-py"
  make_cifar_tree(batches_dir)
  with pytest.raises(data.DataError, match="checksum mismatch: expected md5"):
    data.load("cifar10", "test", data_dir=str(tmp_path), download=False)
  md5 = hashlib.md5((batches_dir / "test_batch").read_bytes()).hexdigest()
  monkeypatch.setattr(loaders, "CIFAR10_BATCH_FILES", (catalog.FileSpec("test_batch", md5=md5),))
  with pytest.raises(data.DataError, match="holds 3 examples.*has 10000"):
    data.load("cifar10", "test", data_dir=str(tmp_path), download=False)


# ----------------------------------------------------------------------------- real data


def test_real_mnist_counts_and_class_histograms():
  root = shared_data_dir()
  if not (root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"MNIST not found in {root / 'mnist'} (set ROBUSTLIB_DATA_DIR to run)")
  train = data.load("mnist", "train", data_dir=str(root), download=False)
  test = data.load("mnist", "test", data_dir=str(root), download=False)
  assert train.images.shape == (60000, 28, 28, 1) and len(test) == 10000
  assert np.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
  assert np.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
  raw = data.read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
  np.testing.assert_array_equal(test.images[..., 0], raw.astype(np.float32) / 255.0)
  assert abs(float(train.images.mean()) - data.info("mnist").mean[0]) < 1e-4
  assert abs(float(train.images.std()) - data.info("mnist").std[0]) < 1e-4


def test_real_fashion_mnist_first500_subset():
  root = shared_data_dir() / "fashion_mnist"
  if not (root / "train-images-first500-idx3-ubyte.gz").is_file():
    pytest.skip(f"Fashion-MNIST subset not found in {root}")
  for prefix, total in (("train", 60000), ("t10k", 10000)):
    images = data.read_idx(root / f"{prefix}-images-first500-idx3-ubyte.gz", expected_magic=2051)
    labels = data.read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", expected_magic=2049)
    assert images.shape == (500, 28, 28) and images.dtype == np.uint8
    assert images.max() > 200 and images.min() == 0
    assert labels.shape == (total,)
    assert np.bincount(labels).tolist() == [total // 10] * 10


def test_real_cifar10_prefix_through_the_batch_parser():
  path = shared_data_dir() / "cifar10" / "test_first100.npz"
  if not path.is_file():
    pytest.skip(f"CIFAR-10 prefix not found at {path}")
  with np.load(path) as npz:
    x, y = npz["x"], npz["y"]
  images, labels = parse_cifar_batch(cifar_batch_bytes(x, y.tolist()))
  np.testing.assert_array_equal(images, x)
  assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  assert np.bincount(labels).tolist() == [10, 6, 8, 10, 7, 8, 16, 11, 13, 11]


# ----------------------------------------------------------------------------- batches


def test_epoch_permutation_is_pinned_and_platform_independent():
  perm = data.epoch_permutation(10, seed=0, epoch=0)
  assert perm.dtype == np.int64
  assert perm.tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
  assert data.epoch_permutation(10, 0, 1).tolist() == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]
  assert sorted(data.epoch_permutation(1000, 5, 2).tolist()) == list(range(1000))


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_batches_have_fixed_shape_and_dtype():
  ds = data.load("digits", "train")
  images, labels = next(data.batches(ds, 64, seed=0))
  assert images.shape == (64, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (64,) and labels.dtype == np.int32


def test_batches_are_deterministic_given_the_seed():
  ds = indexed_dataset(40)
  a = take(data.batches(ds, 8, seed=1), 12)
  b = take(data.batches(ds, 8, seed=1), 12)
  c = take(data.batches(ds, 8, seed=2), 12)
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7, 10])
def test_resuming_at_step_k_equals_skipping_k_batches(start):
  ds = indexed_dataset(10)  # batch 3: 3 steps per epoch, one example dropped each epoch.
  reference = take(data.batches(ds, 3, seed=4), start + 6)[start:]
  resumed = take(data.batches(ds, 3, seed=4, start_step=start), 6)
  for (xr, yr), (xs, ys) in zip(reference, resumed):
    np.testing.assert_array_equal(xr, xs)
    np.testing.assert_array_equal(yr, ys)


def test_each_epoch_visits_every_example_once_in_its_permutation_order():
  n, batch = 48, 8
  ds = indexed_dataset(n)
  stream = take(data.batches(ds, batch, seed=9), 2 * n // batch)
  seen = np.concatenate([indices_of(x, n) for x, _ in stream])
  for epoch in range(2):
    chunk = seen[epoch * n:(epoch + 1) * n]
    assert sorted(chunk.tolist()) == list(range(n))
    np.testing.assert_array_equal(chunk, data.epoch_permutation(n, 9, epoch))
  np.testing.assert_array_equal(np.concatenate([y for _, y in stream]), seen % 10)


def test_batches_drop_the_remainder_of_each_epoch():
  n, batch = 10, 4  # 2 steps per epoch; 2 examples per epoch unused.
  stream = take(data.batches(indexed_dataset(n), batch, seed=0), 3)
  np.testing.assert_array_equal(indices_of(stream[2][0], n), data.epoch_permutation(n, 0, 1)[:4])


def test_batches_reject_bad_sizes():
  ds = indexed_dataset(10)
  with pytest.raises(data.DataError, match=r"batch_size must be in \[1, 10\]"):
    data.batches(ds, 11, seed=0)
  with pytest.raises(data.DataError, match="batch_size must be"):
    data.batches(ds, 0, seed=0)
  with pytest.raises(data.DataError, match="start_step must be >= 0"):
    data.batches(ds, 2, seed=0, start_step=-1)


def test_batches_reject_batch_not_divisible_by_sharded_devices():
  sharding = NamedSharding(AbstractMesh((2,), ("data",)), PartitionSpec("data"))
  with pytest.raises(data.DataError, match="not divisible by the 2 devices"):
    data.batches(indexed_dataset(10), 3, seed=0, sharding=sharding)


def test_sharded_batches_are_jax_arrays_with_the_requested_sharding():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  ds = indexed_dataset(16)
  images, labels = next(data.batches(ds, 4, seed=0, sharding=sharding))
  plain_images, plain_labels = next(data.batches(ds, 4, seed=0))
  assert isinstance(images, jax.Array) and isinstance(labels, jax.Array)
  assert images.sharding == sharding and labels.sharding == sharding
  np.testing.assert_array_equal(np.asarray(images), plain_images)
  np.testing.assert_array_equal(np.asarray(labels), plain_labels)

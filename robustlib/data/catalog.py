"""The catalog of official data files: where each comes from (its mirrors) and the checksum
it must have; the one table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """One official data file.

    Attributes:
        name: File name, relative to the data set's directory.
        size: Size in bytes, or None where it is not published.
        sha256: Hex SHA-256 of the file, or None where only an MD5 is published.
        md5: Hex MD5, used only when ``sha256`` is None.
    """

  name: str
  size: int | None = None
  sha256: str | None = None
  md5: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """The official files of a data set and the mirrors that serve them.

    Attributes:
        subdir: Directory of the data set under a data or cache directory.
        mirrors: Base URLs tried in order; a file's URL is ``mirror + name``.
        files: The downloadable files.
    """

  subdir: str
  mirrors: tuple[str, ...]
  files: tuple[FileSpec, ...]

  def file(self, name: str) -> FileSpec:
    """Returns the `FileSpec` called ``name``."""
    return next(f for f in self.files if f.name == name)


# MNIST: SHA-256 and sizes of the canonical files, whose MD5s equal those of pytorch/vision,
# torchvision/datasets/mnist.py.
# Fashion-MNIST: SHA-256 as stated in pytorch/vision,
# torchvision/prototype/datasets/_builtin/mnist.py (_CHECKSUMS); label-file MD5s equal the
# official ones of zalandoresearch/fashion-mnist.
# CIFAR-10 archive: SHA-256 as stated in tensorflow/tensorflow,
# tensorflow/python/keras/datasets/cifar10.py (file_hash); its MD5 is the official
# c58f30108f718f92721af3b95e74349a. The extracted batch files have no published SHA-256:
# they are checked with the MD5s of pytorch/vision, torchvision/datasets/cifar.py.
SOURCES: dict[str, Source] = {
    "mnist":
        Source(
            subdir="mnist",
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            files=(
                FileSpec(
                    "train-images-idx3-ubyte.gz",
                    9912422,
                    sha256=("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609")),
                FileSpec(
                    "train-labels-idx1-ubyte.gz",
                    28881,
                    sha256=("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c")),
                FileSpec(
                    "t10k-images-idx3-ubyte.gz",
                    1648877,
                    sha256=("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6")),
                FileSpec(
                    "t10k-labels-idx1-ubyte.gz",
                    4542,
                    sha256=("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
            ),
        ),
    "fashion_mnist":
        Source(
            subdir="fashion_mnist",
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            files=(
                FileSpec(
                    "train-images-idx3-ubyte.gz",
                    26421880,
                    sha256=("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84")),
                FileSpec(
                    "train-labels-idx1-ubyte.gz",
                    29515,
                    sha256=("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845")),
                FileSpec(
                    "t10k-images-idx3-ubyte.gz",
                    4422102,
                    sha256=("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073")),
                FileSpec(
                    "t10k-labels-idx1-ubyte.gz",
                    5148,
                    sha256=("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")),
            ),
        ),
    "cifar10":
        Source(
            subdir="cifar10",
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            files=(FileSpec(
                "cifar-10-python.tar.gz",
                170498071,
                sha256=("6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")),),
        ),
}

# Extracted CIFAR-10 batches (`<dir>/cifar10/cifar-10-batches-py/<name>`); MD5 only.
CIFAR10_BATCH_FILES: tuple[FileSpec, ...] = (
    FileSpec("data_batch_1", md5="c99cafc152244af753f735de768cd75f"),
    FileSpec("data_batch_2", md5="d4bba439e000b95fd0a9bffe97cbabec"),
    FileSpec("data_batch_3", md5="54ebc095f3ab1f0389bbae665268c751"),
    FileSpec("data_batch_4", md5="634d18415352ddfa80567beed471001a"),
    FileSpec("data_batch_5", md5="482c414d41f54cd18b22e5b47cb7c3cb"),
    FileSpec("test_batch", md5="40351d587109b95175f43aff81a1287e"),
)

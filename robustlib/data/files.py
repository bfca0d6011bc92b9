"""Finding data files on disk, verifying their checksums, and downloading them."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request

from robustlib.data.errors import DataError
from robustlib.data.catalog import FileSpec, Source

DATA_DIR_ENV = "ROBUSTLIB_DATA_DIR"
CACHE_DIR_ENV = "ROBUSTLIB_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


def resolve_data_dir(data_dir: str | None) -> str | None:
  """Returns the directory holding data sets, or None if none is configured.

    Args:
        data_dir: Explicit directory; wins over the environment.

    Returns:
        ``data_dir`` if given, else ``$ROBUSTLIB_DATA_DIR`` if set and non-empty, else
        None. Each data set lives in a sub-directory named after it, e.g.
        ``<dir>/mnist/train-images-idx3-ubyte.gz``.
    """
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir))
  env = os.environ.get(DATA_DIR_ENV)
  return os.path.expanduser(env) if env else None


def resolve_cache_dir(cache_dir: str | None) -> str:
  """Returns the directory downloads go to.

    Args:
        cache_dir: Explicit directory; wins over the environment.

    Returns:
        ``cache_dir`` if given, else ``$ROBUSTLIB_CACHE_DIR``, else
        ``$XDG_CACHE_HOME/robustlib``, else ``~/.cache/robustlib``.
    """
  if cache_dir:
    return os.path.expanduser(os.fspath(cache_dir))
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.expanduser(os.environ[CACHE_DIR_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "robustlib")


def file_digests(path: str) -> tuple[str, str]:
  """Returns the hex ``(sha256, md5)`` of the file at ``path``."""
  sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      sha256.update(chunk)
      md5.update(chunk)
  return sha256.hexdigest(), md5.hexdigest()


def verify_file(path: str, spec: FileSpec) -> None:
  """Checks the size and checksum of ``path`` against ``spec``.

    The SHA-256 is checked where ``spec`` has one, the MD5 otherwise.

    Raises:
        DataError: Naming the file, the expected and the actual value.
    """
  size = os.path.getsize(path)
  if spec.size is not None and size != spec.size:
    raise DataError(f"{path}: size mismatch: {size} bytes, expected {spec.size}; the file is "
                    "truncated or not the official one. Delete it and fetch it again.")
  sha256, md5 = file_digests(path)
  if spec.sha256 is not None and sha256 != spec.sha256:
    raise DataError(f"{path}: checksum mismatch: expected sha256 {spec.sha256}, actual sha256 "
                    f"{sha256}. The file is corrupt or not the official one; delete it and fetch "
                    "it again.")
  if spec.sha256 is None and spec.md5 is not None and md5 != spec.md5:
    raise DataError(f"{path}: checksum mismatch: expected md5 {spec.md5}, actual md5 {md5}. The "
                    "file is corrupt or not the official one; delete it and fetch it again.")


def _fetch(url: str, destination: str, spec: FileSpec) -> None:
  """Downloads ``url`` to ``destination`` atomically; raises OSError or DataError."""
  directory = os.path.dirname(destination)
  os.makedirs(directory, exist_ok=True)
  fd, temp = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".part", dir=directory)
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url,
                                                            timeout=DOWNLOAD_TIMEOUT_S) as response:
      while chunk := response.read(_CHUNK):
        out.write(chunk)
    verify_file(temp, spec)
    os.replace(temp, destination)
  finally:
    if os.path.exists(temp):
      os.remove(temp)


def _missing_message(dataset: str, source: Source, missing: list[FileSpec], searched: list[str],
                     data_dir: str | None, reason: str, hint: str) -> str:
  names = ", ".join(f.name for f in missing)
  where = (os.path.join(data_dir, source.subdir) if data_dir else os.path.join(
      "<data_dir>", source.subdir))
  looked = "; ".join(searched) if searched else "nowhere"
  no_dir = "" if data_dir else (
      " No data directory is set: pass data_dir=... or set the ROBUSTLIB_DATA_DIR "
      "environment variable.")
  return (f"{dataset}: missing file(s) {names} ({reason}). Looked in: {looked}.{no_dir} "
          f"Put {names} in {where}/ (the data directory comes from the `data_dir` argument "
          f"or the ROBUSTLIB_DATA_DIR environment variable, with one sub-directory per data "
          f"set), or call load(..., download=True) with network access to fetch them from "
          f"{source.mirrors[0]}.{hint}")


def locate(dataset: str,
           source: Source,
           names: tuple[str, ...],
           *,
           data_dir: str | None,
           download: bool,
           cache_dir: str | None,
           hint: str = "") -> dict[str, str]:
  """Finds, verifies and if needed downloads the files ``names`` of ``source``.

    Each file is looked for in ``<data_dir>/<subdir>/`` (see `resolve_data_dir`), then in
    ``<cache_dir>/<subdir>/`` (see `resolve_cache_dir`). Files found are verified against
    the checksum table; a file found nowhere is downloaded into the cache when
    ``download`` is true, from each mirror in turn, to a temporary file that is verified
    and then renamed into place.

    Args:
        dataset: Name used in messages.
        source: The data set's entry of the checksum table.
        names: File names needed.
        data_dir: Explicit data directory or None.
        download: Whether missing files may be downloaded.
        cache_dir: Explicit cache directory or None.
        hint: Sentence appended to the message about missing files.

    Returns:
        Mapping from each name to the path of a verified file.

    Raises:
        DataError: If a file is missing and cannot be downloaded (the message says which
            files to put where), or if a file fails verification.
    """
  root = resolve_data_dir(data_dir)
  cache = os.path.join(resolve_cache_dir(cache_dir), source.subdir)
  directories = ([os.path.join(root, source.subdir)] if root else []) + [cache]
  found: dict[str, str] = {}
  missing: list[FileSpec] = []
  for name in names:
    spec = source.file(name)
    path = next(
        (os.path.join(d, name) for d in directories if os.path.isfile(os.path.join(d, name))), None)
    if path is None:
      missing.append(spec)
    else:
      verify_file(path, spec)
      found[name] = path
  if missing and not download:
    raise DataError(
        _missing_message(dataset, source, missing, directories, root, "download=False", hint))
  failures: list[str] = []
  for spec in missing:
    destination = os.path.join(cache, spec.name)
    for mirror in source.mirrors:
      url = mirror + spec.name
      try:
        _fetch(url, destination, spec)
      except (OSError, ValueError, http.client.HTTPException) as e:
        failures.append(f"{url}: {e}")
        continue
      found[spec.name] = destination
      break
  still_missing = [spec for spec in missing if spec.name not in found]
  if still_missing:
    raise DataError(
        _missing_message(dataset, source, still_missing, directories, root,
                         "the download failed: network unreachable or the files were "
                         "not served", hint) + " Download errors: " + " | ".join(failures))
  return found

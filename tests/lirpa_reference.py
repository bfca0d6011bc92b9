"""auto_LiRPA's reference bounds (``../shared/reference/lirpa_bounds.npz``) and its four networks.

The networks are rebuilt as plain JAX functions of NCHW inputs from the stored
PyTorch weights (conv kernels OIHW, linear weights ``[out, in]``, channel-major
flatten), following the README beside the file. The folder is found through
``ROBUSTLIB_REFERENCE_DIR`` or at ``REPO/../shared/reference``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FILE_NAME = "lirpa_bounds.npz"
NAMES = ("mlp", "cnn_small", "cnn_maxpool", "resblock_bn_avgpool")
# The reference's method names and ours.
METHODS = {"IBP": "ibp", "CROWN": "crown", "CROWN-IBP": "crown_ibp"}
EPSILONS = ("0.03", "0.1")
BN_EPS = 1e-5


def reference_path() -> pathlib.Path:
  """Where the reference file is expected (it may be absent)."""
  folder = os.environ.get("ROBUSTLIB_REFERENCE_DIR") or REPO.parent / "shared" / "reference"
  return pathlib.Path(folder) / FILE_NAME


def load() -> dict[str, np.ndarray] | None:
  """Every array of the reference file by key, or None when the file is absent."""
  path = reference_path()
  if not path.is_file():
    return None
  with np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def _conv(h, w, b, stride: int = 1, pad: int = 0):
  out = lax.conv_general_dilated(h,
                                 jnp.asarray(w), (stride, stride), [(pad, pad)] * 2,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return out + jnp.asarray(b)[None, :, None, None]


def _linear(h, w, b):
  return h @ jnp.asarray(w).T + jnp.asarray(b)


def _flatten(h):
  return h.reshape(h.shape[0], -1)  # NCHW: channel-major, as torch.flatten


def _pool(h, op: str):
  if op == "max":
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
  return lax.reduce_window(h, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4


def network(ref: dict[str, np.ndarray], name: str) -> Callable[[jax.Array], jax.Array]:
  """The reference network ``name`` as ``fn(x [N, 1, 28, 28]) -> logits [N, 10]``."""
  p = lambda key: ref[f"{name}/{key}"]
  relu = jax.nn.relu

  if name == "mlp":

    def fn(x):
      h = relu(_linear(_flatten(x), p("1.weight"), p("1.bias")))
      h = relu(_linear(h, p("3.weight"), p("3.bias")))
      return _linear(h, p("5.weight"), p("5.bias"))
  elif name == "cnn_small":

    def fn(x):
      h = relu(_conv(x, p("0.weight"), p("0.bias"), stride=2))
      h = relu(_conv(h, p("2.weight"), p("2.bias")))
      h = relu(_linear(_flatten(h), p("5.weight"), p("5.bias")))
      return _linear(h, p("7.weight"), p("7.bias"))
  elif name == "cnn_maxpool":

    def fn(x):
      h = _pool(relu(_conv(x, p("0.weight"), p("0.bias"), pad=1)), "max")
      h = relu(_conv(h, p("3.weight"), p("3.bias"), pad=1))
      return _linear(_flatten(h), p("6.weight"), p("6.bias"))
  elif name == "resblock_bn_avgpool":
    # BatchNorm in eval mode: (h - running_mean) / sqrt(running_var + eps) * weight + bias.
    chan = lambda v: jnp.asarray(v, jnp.float32)[None, :, None, None]
    mean, bias = chan(p("bn.running_mean")), chan(p("bn.bias"))
    scale = chan(p("bn.weight") / np.sqrt(p("bn.running_var") + BN_EPS))

    def fn(x):
      h = relu((_conv(x, p("c1.weight"), p("c1.bias"), pad=1) - mean) * scale + bias)
      h = relu(h + _conv(h, p("c2.weight"), p("c2.bias"), pad=1))
      return _linear(_flatten(_pool(h, "avg")), p("fc.weight"), p("fc.bias"))
  else:
    raise KeyError(f"unknown reference network {name!r}; choose from {NAMES}")
  return fn


def bounds(ref: dict[str, np.ndarray], name: str, method: str, eps: str):
  """``(logit_lower [N, 10], logit_upper [N, 10], margin_lower [N, 9])`` of the reference."""
  key = f"{name}/{method}/{eps}"
  return ref[f"{key}/logit_lower"], ref[f"{key}/logit_upper"], ref[f"{key}/margin_lower"]

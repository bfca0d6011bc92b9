"""How robustlib compiles: `jax.jit` with compiler options chosen for the backend.

On XLA's CPU backend, YNNPACK library fusions take convolutions and fused
element-wise graphs as well as matrix products. On the 2-core CPU this project
is measured on (jaxlib 0.10), keeping YNNPACK for single matrix products only
made jitted programs faster across the board (minimum of interleaved runs,
batch 128, MNIST networks of ``benchmarks.nets``):

  =======================================  ========  =====================
  program                                  default   YNNPACK dots only
  =======================================  ========  =====================
  small CNN forward pass                   6.8 ms    3.3 ms
  PGD-40, small CNN                        556 ms    365 ms
  PGD-40, MLP                              79 ms     56 ms
  IBP, small CNN                           12.5 ms   7.9 ms
  gradient of CROWN-IBP bounds, small CNN  918 ms    413 ms
  gradient of CROWN-IBP bounds, MLP        65 ms     25 ms
  CROWN-IBP bounds, small CNN              191 ms    222 ms
  =======================================  ========  =====================

`jit` applies these options on CPU (nothing elsewhere) where the backend
policy takes them (`robustlib.backend`: ``ynnpack_dots_only``), unless
``XLA_FLAGS`` already sets the fusion types, or the installed jaxlib does not
know the option.
robustlib's own jitted entry points (attacks called outside ``jit``,
evaluation, certification, training steps) use it; jit your own programs that
call robustlib with it to get the same code.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np

from robustlib import backend
from robustlib import jax_internals as jint

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles with ``options`` (older ones do not know them)."""
  try:
    jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options() -> dict[str, str] | None:
  """The options `jit` compiles with on the default backend; None for XLA's defaults."""
  if (jax.default_backend() != "cpu" or not backend.fast_paths().ynnpack_dots_only or
      _OPTION in os.environ.get("XLA_FLAGS", "")):
    return None
  return dict(CPU_OPTIONS) if _accepted(tuple(CPU_OPTIONS.items())) else None


class _Jit:
  """`jax.jit` of ``fun``; with `compiler_options` when called at the top level.

  XLA takes compiler options only for a top-level program; called inside
  another transformation (a caller's ``jit``, ``vmap`` or ``grad``), the call is
  a plain ``jax.jit`` and the caller's compilation decides.
  """

  def __init__(self, fun: Callable, kwargs: dict[str, Any]):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs = fun, dict(kwargs)
    self._own_options = self._kwargs.pop("compiler_options", None) or {}
    self._top, self._nested = None, jax.jit(fun, **self._kwargs)

  def _jitted(self):
    if not jint.at_top_level():
      return self._nested
    if self._top is None:  # decided at the first top-level call, when the backend is known
      options = dict(compiler_options() or {}, **self._own_options)
      self._top = jax.jit(self._fun, compiler_options=options or None, **self._kwargs)
    return self._top

  def __call__(self, *args, **kwargs):
    return self._jitted()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._jitted().lower(*args, **kwargs)

  def cache_size(self) -> int:
    """Programs compiled so far (at the top level and nested)."""
    return sum(f._cache_size() for f in (self._top, self._nested) if f is not None)  # pylint: disable=protected-access


def jit(fun: Callable | None = None, **kwargs) -> Callable:
  """`jax.jit` with `compiler_options` (decided at the first call); same arguments.

  Usable as ``jit(fn, static_argnums=...)`` or as a decorator, with or without
  keywords: ``@jit`` or ``@jit(static_argnames=...)``.
  """
  if fun is None:
    return lambda f: _Jit(f, kwargs)
  if isinstance(fun, _Jit) and not kwargs:  # already compiled-once: keep its caches
    return fun
  return _Jit(fun, kwargs)

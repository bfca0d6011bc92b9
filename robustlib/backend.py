"""Backend-specific fast paths: one policy, decided per backend from measurements.

A few of robustlib's code paths are faster than plain XLA on XLA's CPU backend
and were tuned there; elsewhere they would replace what XLA does well (cuDNN's
convolutions and their gradients on a GPU) with code tuned for a 2-core CPU.
`fast_paths` says which are on. Every place that takes one asks it, and nothing
else decides.

  ====================  =====================================================  ===========  =====
  field                 what it does, where                                    CPU          other
  ====================  =====================================================  ===========  =====
  fast_gradients        attacks (PGD, FGSM, APGD, MultiTargeted, training's    on           off
                        attacks) rewrite the model with `robustlib.fastgrad`:
                        custom VJPs with pre-flipped kernels, first layers as
                        patch products
  fast_conv_transpose   CROWN transposes a convolution as a channels-last      on           off
                        convolution with a pre-flipped kernel
  ynnpack_dots_only     `robustlib.jit` keeps YNNPACK library fusions for      on           off
                        matrix products only (`robustlib.compilation`)
  chunk_budget          elements of one CROWN coefficient array before its     2**23        2**26
                        rows are split into chunks
  parallel_chunks       chunks bounded together (``vmap``) instead of one      off          off
                        after another (``lax.map``)
  bab_batch_size        subdomains per step of ReLU branch and bound; 0: the   32           0
                        largest that fits the memory budget
  ====================  =====================================================  ===========  =====

The CPU column comes from the measurements in ``PERFORMANCE.md``,
`robustlib.compilation`, `verify.crown` and `verify.relu_bab` (a 2-core CPU).
The other column is plain XLA: no program rewrite and no compiler option, and
chunks and batches sized by memory (2**26 float32 elements are 256 MB), until a
table measured on that backend says otherwise (``benchmarks/accelerator.py``).

The environment variable ``ROBUSTLIB_FAST_PATHS`` overrides the policy, read at
trace time (set it before the first call of a jitted function): ``cpu`` or
``plain`` (the two columns above, on any backend), then optionally
comma-separated ``field=value`` pairs, e.g. ``plain``,
``fast_gradients=off`` or ``cpu,chunk_budget=4194304``. Results agree between
settings to float rounding (the tests compare them).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from robustlib.checks import InputError

ENV = "ROBUSTLIB_FAST_PATHS"


@dataclasses.dataclass(frozen=True)
class FastPaths:
  """Which fast paths are taken (see the module's table)."""
  fast_gradients: bool
  fast_conv_transpose: bool
  ynnpack_dots_only: bool
  chunk_budget: int
  parallel_chunks: bool
  bab_batch_size: int


CPU = FastPaths(fast_gradients=True,
                fast_conv_transpose=True,
                ynnpack_dots_only=True,
                chunk_budget=1 << 23,
                parallel_chunks=False,
                bab_batch_size=32)
PLAIN = FastPaths(fast_gradients=False,
                  fast_conv_transpose=False,
                  ynnpack_dots_only=False,
                  chunk_budget=1 << 26,
                  parallel_chunks=False,
                  bab_batch_size=0)
_BASES = {"cpu": CPU, "plain": PLAIN}
_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def fast_paths(platform: str | None = None) -> FastPaths:
  """The policy for ``platform`` (default: JAX's default backend), after ``$ROBUSTLIB_FAST_PATHS``.

  Raises:
    InputError: naming the part of ``$ROBUSTLIB_FAST_PATHS`` that is not a base,
      a field or a value of the field's type.
  """
  platform = platform or jax.default_backend()
  return _parse(os.environ.get(ENV, ""), CPU if platform == "cpu" else PLAIN)


@functools.cache
def _parse(setting: str, default: FastPaths) -> FastPaths:
  parts = [p.strip() for p in setting.split(",") if p.strip()]
  policy = default
  if parts and parts[0].lower() in _BASES:
    policy = _BASES[parts.pop(0).lower()]
  fields = {f.name: f.type for f in dataclasses.fields(FastPaths)}
  changes = {}
  for part in parts:
    name, _, value = (s.strip() for s in part.partition("="))
    if name not in fields or not value:
      raise InputError(f"{ENV}: {part!r} is not one of {sorted(_BASES)} or field=value with a "
                       f"field of {sorted(fields)}")
    if fields[name] == "bool":
      if value.lower() not in _TRUE + _FALSE:
        raise InputError(f"{ENV}: {name} takes on or off, got {value!r}")
      changes[name] = value.lower() in _TRUE
    else:
      try:
        changes[name] = int(value)
      except ValueError:
        raise InputError(f"{ENV}: {name} takes a whole number, got {value!r}") from None
      if changes[name] < 0 or (name == "chunk_budget" and changes[name] == 0):
        raise InputError(f"{ENV}: {name} must be positive, got {value!r}")
  return dataclasses.replace(policy, **changes)

"""The one module that imports JAX's jaxpr-level API.

Bound propagation (``verify``) and program rewrites (``robustlib.fastgrad``)
interpret jaxprs equation by equation, and ``robustlib.compilation`` asks whether
a call is traced. Everything they need from JAX below the
``jax.numpy`` level is imported here, so a change in JAX's internals is fixed in
one place.
"""

from __future__ import annotations

from jax.extend.core import ClosedJaxpr
from jax.extend.core import Jaxpr
from jax.extend.core import JaxprEqn
from jax.extend.core import Literal
from jax.extend.core import Primitive
from jax.extend.core import Var
from jax.extend.core import primitives
from jax.extend import source_info_util

try:
  from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # a JAX without it: treat every call as nested (the safe answer)
  _trace_state_clean = None


def at_top_level() -> bool:
  """Whether no transformation is tracing (so a ``jax.jit`` call here is a top-level one)."""
  return _trace_state_clean is not None and _trace_state_clean()


__all__ = [
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Primitive",
    "Var",
    "at_top_level",
    "primitives",
    "source_info_util",
]

"""The one module that imports JAX's jaxpr-level API.

Bound propagation (``verify``) and program rewrites (``robustlib.fastgrad``)
interpret jaxprs equation by equation. Everything they need from JAX below the
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

__all__ = [
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Primitive",
    "Var",
    "primitives",
    "source_info_util",
]

"""Modules that are also the function of their name.

A package that re-exports ``verify.crown.crown`` as ``verify.crown`` would hide the
module ``verify.crown`` (and an ``import verify.crown`` would hide the function). A
`FactoryModule` is both: ``verify.crown(fn, box)`` calls the function and
``verify.crown.crown_ibp`` is still the module's.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Iterable


class FactoryModule(types.ModuleType):
  """A module called like the function of its own name (``pgd(...)`` is ``pgd.pgd(...)``)."""

  def _function(self):
    return getattr(self, self.__name__.rsplit(".", 1)[-1])

  def __call__(self, *args, **kwargs):
    return self._function()(*args, **kwargs)

  @property
  def __signature__(self) -> inspect.Signature:
    return inspect.signature(self._function())


def callable_modules(package: str, names: Iterable[str]) -> dict[str, types.ModuleType]:
  """Makes the already imported modules ``package.NAME`` `FactoryModule`\\ s; returns them
  by name, for the package to bind in place of the functions it re-exported."""
  found = {}
  for name in names:
    module = sys.modules[f"{package}.{name}"]
    module.__class__ = FactoryModule
    found[name] = module
  return found


def make_callable(module_name: str) -> None:
  """The same for one module, from within it (a script whose name is also a function of
  its package: ``attacks.evaluate``); nothing when it runs as ``__main__``."""
  if module_name != "__main__":
    sys.modules[module_name].__class__ = FactoryModule

"""The workspace's dependency direction: robustlib <- attacks, verify <- training."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("robustlib", "attacks", "verify", "training")
ALLOWED = {
    "robustlib": set(),
    "attacks": {"robustlib"},
    "verify": {"robustlib"},
    "training": {"robustlib", "attacks", "verify"},
}


def _imported_packages(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module.split(".")[0])
  return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
  files = sorted((ROOT / package).rglob("*.py"))
  assert files, f"{package} has no modules"
  for path in files:
    bad = _imported_packages(path) - ALLOWED[package] - {package}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_imports_and_lists_its_api(package):
  module = __import__(package)
  assert isinstance(module.__all__, list)
  for name in module.__all__:
    assert hasattr(module, name), f"{package}.__all__ names missing {name!r}"

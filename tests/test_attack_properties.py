"""Properties every attack in the package must have, checked on each factory.

For every attack exported by ``attacks`` (with small settings: few steps or
queries), on random shapes, radii and boxes (one case per seed):

* the result lies inside the epsilon-ball around ``x`` and inside the box;
* it is never less adversarial than ``x`` itself (where ``x`` already fools the
  model, so does the result);
* the same key gives identical results;
* it compiles once: three batches of one shape, with different radii passed as
  a traced ``eps``, trace the model's function no more than the first did.
"""

import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
from attacks import core

NUM_CLASSES = 10

# id -> (factory name, keyword arguments besides eps/norm/bounds, norm, targeted).
VARIANTS = {
    "fgsm": ("fgsm", {}, "linf", False),
    "fgsm-l2": ("fgsm", {}, "l2", False),
    "pgd": ("pgd", {
        "steps": 4
    }, "linf", False),
    "pgd-l2": ("pgd", {
        "steps": 4
    }, "l2", False),
    "pgd-margin": ("pgd", {
        "steps": 4,
        "loss": "margin"
    }, "linf", False),
    "pgd-dlr": ("pgd", {
        "steps": 4,
        "loss": "dlr"
    }, "linf", False),
    "pgd-targeted": ("pgd", {
        "steps": 4,
        "targeted": True
    }, "linf", True),
    "multitargeted": ("multitargeted", {
        "steps": 3,
        "num_targets": 3
    }, "linf", False),
    "apgd-ce": ("apgd", {
        "steps": 5,
        "loss": "ce"
    }, "linf", False),
    "apgd-dlr-l2": ("apgd", {
        "steps": 5,
        "loss": "dlr"
    }, "l2", False),
    "apgd-l1": ("apgd", {
        "steps": 6,
        "large_eps": True
    }, "l1", False),
    "apgd-t-l1": ("apgd_t", {
        "steps": 5,
        "num_targets": 2
    }, "l1", False),
    "apgd_t": ("apgd_t", {
        "steps": 5,
        "num_targets": 3
    }, "linf", False),
    "fab-t": ("fab", {
        "steps": 4,
        "num_targets": 3
    }, "linf", False),
    "fab-l2": ("fab", {
        "steps": 4,
        "num_targets": None
    }, "l2", False),
    "fab-l1": ("fab", {
        "steps": 4,
        "num_targets": 2
    }, "l1", False),
    "fmn-t": ("fmn", {
        "steps": 5,
        "num_targets": 2
    }, "linf", False),
    "fmn-l2": ("fmn", {
        "steps": 5,
        "num_targets": None
    }, "l2", False),
    "fmn-l1": ("fmn", {
        "steps": 5,
        "num_targets": 2
    }, "l1", False),
    "fmn-l0": ("fmn", {
        "steps": 5,
        "num_targets": 2
    }, "l0", False),
    "fmn-targeted": ("fmn", {
        "steps": 5,
        "targeted": True
    }, "l2", True),
    "square": ("square", {
        "queries": 25
    }, "linf", False),
    "square-l2": ("square", {
        "queries": 25
    }, "l2", False),
    "spsa": ("spsa", {
        "steps": 3
    }, "linf", False),
    "autoattack": ("autoattack", {
        "steps": 3,
        "num_targets": 3,
        "queries": 20
    }, "linf", False),
}
SEEDS = (0, 1, 2)
# Names in attacks.__all__ that are not attack factories.
NOT_FACTORIES = {"AttackWarning", "Cascade", "Report", "cascade", "diagnose", "evaluate"}


def build(variant: str, eps: float, bounds):
  factory_name, kwargs, norm, _ = VARIANTS[variant]
  factory = getattr(attacks, factory_name)
  return factory(eps=eps, norm=norm, bounds=bounds, **kwargs)


class Counted:
  """A random two-layer tanh network; ``traces`` counts how often JAX traces it."""

  def __init__(self, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    self.w1 = jnp.asarray(rng.normal(size=(dim, 16)) / np.sqrt(dim) * 3, jnp.float32)
    self.w2 = jnp.asarray(rng.normal(size=(16, NUM_CLASSES)), jnp.float32)
    self.traces = 0

  def __call__(self, x):
    if isinstance(x, jax.core.Tracer):  # count traces, not eager calls
      self.traces += 1
    return jnp.tanh(x.reshape(x.shape[0], -1) @ self.w1) @ self.w2


def case(seed: int):
  """A random problem: size, shape and box (the radius is a scalar for even seeds, per example
  for odd ones)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 6))
  shape = [(4, 4, 1), (3, 3, 2), (5, 5, 1)][seed % 3]
  lo = float(rng.choice([0.0, -0.5]))
  bounds = (lo, lo + float(rng.choice([1.0, 2.5])))
  return rng, n, shape, bounds


def batch(rng, n, shape, bounds, model, targeted):
  x = rng.uniform(bounds[0], bounds[1], size=(n,) + shape).astype(np.float32)
  x[0].flat[0] = bounds[0]  # values on the box's faces
  x[-1].flat[-1] = bounds[1]
  pred = np.asarray(jnp.argmax(model(jnp.asarray(x)), -1))
  y = pred.copy()
  y[::2] = (pred[::2] + rng.integers(1, NUM_CLASSES, size=y[::2].shape)) % NUM_CLASSES
  target = None
  if targeted:  # targets differ from y; where x is misclassified, the target is its class
    target = (y + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
    target = np.where(pred != y, pred, target)
  return x, y.astype(np.int32), None if target is None else target.astype(np.int32)


def is_adversarial(model, x, y, target):
  pred = np.asarray(jnp.argmax(model(jnp.asarray(x)), -1))
  return pred != y if target is None else pred == target


def _cases():
  """One seed per attack by default (seeds rotate over attacks, so every shape, box and kind
  of eps is covered); the other seeds of each attack run with ``-m slow``."""
  for i, variant in enumerate(sorted(VARIANTS)):
    for seed in SEEDS:
      marks = () if seed == SEEDS[i % len(SEEDS)] else (pytest.mark.slow,)
      yield pytest.param(variant, seed, marks=marks, id=f"{variant}-seed{seed}")


@pytest.mark.parametrize("variant, seed", list(_cases()))
def test_attack_properties(variant, seed, request):
  if request.node.get_closest_marker("slow") and "slow" not in request.config.getoption("-m"):
    pytest.skip("another seed of this attack: run with -m slow")
  rng, n, shape, bounds = case(seed)
  norm, targeted = VARIANTS[variant][2], VARIANTS[variant][3]
  base_eps = float(rng.uniform(0.05, 0.3)) * {"linf": 1.0, "l2": 3.0, "l1": 10.0, "l0": 30.0}[norm]
  attack = build(variant, base_eps, bounds)
  assert attack.norm == norm and attack.bounds == bounds and attack.targeted == targeted
  model = Counted(int(np.prod(shape)), seed)

  @jax.jit
  def run(x, y, key, eps, target):
    return attack(model, x, y, key, eps=eps, target=target)

  def eps_for(rng):
    if seed % 2 == 0:
      return jnp.float32(rng.uniform(0.5, 1.5) * base_eps)
    return jnp.asarray(rng.uniform(0.0, 1.5, size=n) * base_eps, jnp.float32)

  traces = None
  for b in range(3):
    x, y, target = batch(rng, n, shape, bounds, model, targeted)
    eps = eps_for(rng)
    key = jax.random.key(seed * 10 + b)
    x_adv = np.asarray(run(x, y, key, eps, target))
    if traces is None:
      traces = model.traces
    assert model.traces == traces, "a new batch or a new eps recompiled the attack"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    # Inside the box and the ball.
    assert x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1]
    delta = (x_adv - x).reshape(n, -1)
    size = {
        "linf": np.abs(delta).max(1),
        "l2": np.linalg.norm(delta, axis=1),
        "l1": np.abs(delta).sum(1),
        "l0": (delta != 0).sum(1)
    }[norm]
    np.testing.assert_array_less(size, np.broadcast_to(np.asarray(eps), (n,)) * (1 + 1e-5) + 1e-6)
    # Never less adversarial than x.
    before = is_adversarial(model, x, y, target)
    after = is_adversarial(model, x_adv, y, target)
    assert before.any()
    assert not (before & ~after).any(), f"lost adversarial points {np.flatnonzero(before & ~after)}"
    # Same key, same result.
    np.testing.assert_array_equal(np.asarray(run(x, y, key, eps, target)), x_adv)
  assert model.traces == traces


@pytest.mark.parametrize("variant", ["fgsm", "pgd-l2", "square"])
def test_direct_calls_compile_once_per_shape(variant):
  """The attack's own jit (a call outside any jit) is reused across batches and radii."""
  rng, n, shape, bounds = case(0)
  attack = build(variant, 0.1, bounds)
  model = Counted(int(np.prod(shape)), 0)
  x, y, _ = batch(rng, n, shape, bounds, model, False)
  attack(model, x, y, jax.random.key(0))
  traces = model.traces
  for eps in (0.05, 0.2):
    x, y, _ = batch(rng, n, shape, bounds, model, False)
    attack(model, x, y, jax.random.key(1), eps=eps)
  assert model.traces == traces


def test_every_attack_factory_in_the_package_is_covered():
  covered = {v[0] for v in VARIANTS.values()}
  for name in attacks.__all__:
    obj = getattr(attacks, name)
    if isinstance(obj, types.ModuleType):  # a module that is its factory: attacks.square(...)
      obj = getattr(obj, name)
    if name in NOT_FACTORIES or not inspect.isfunction(obj):
      continue
    params = list(inspect.signature(obj).parameters)
    if params and params[0] == "eps":
      assert name in covered, f"attacks.{name} looks like an attack factory with no property test"


def test_an_attacks_module_is_reachable_and_is_its_factory():
  square = attacks.square
  assert isinstance(square, types.ModuleType)
  assert float(square.p_selection(60, 5000, 0.8, rescale_schedule=False)) == pytest.approx(0.2)
  assert isinstance(square(eps=0.1), core.AttackFn) and square(eps=0.1).name == "square-linf"
  assert attacks.apgd.checkpoints(100)[:3] == [22, 41, 57]
  assert attacks.autoattack(eps=0.1).name == "autoattack"
  from attacks import pgd  # pylint: disable=import-outside-toplevel
  assert pgd(eps=0.1).eps == 0.1 and pgd.pgd is attacks.pgd.pgd

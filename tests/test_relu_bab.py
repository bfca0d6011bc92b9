"""ReLU-split branch and bound: the same answers as the exact MILP, counterexamples confirmed."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bound_testing
from robustlib import backend
from robustlib.checks import InputError
from verify import relu_bab
from verify.bab import branch_and_bound
from verify.milp import milp_verify
from verify.unsafe import UnsafeSet


@pytest.mark.parametrize("branching", ["babsr", "fsb"])
def test_relu_branch_and_bound_agrees_with_the_milp(branching):
  fn, _ = bound_testing.relu_mlp(seed=4, sizes=(5, 16, 16, 3))
  rng = np.random.default_rng(0)
  answers, branched = [], 0
  for _ in range(5):
    x0 = rng.uniform(size=5).astype(np.float32)
    y = int(np.argmax(fn(jnp.asarray(x0)[None])))
    unsafe = UnsafeSet.misclassified(y, 3)
    confirm = lambda z, y=y: bool(np.argmax(fn(jnp.asarray(z)[None])) != y)
    for eps in (0.05, 0.1, 0.2):
      lo, hi = x0 - eps, x0 + eps
      exact = milp_verify(fn, lo, hi, unsafe, time_limit=30).status
      result = branch_and_bound(fn,
                                lo,
                                hi,
                                unsafe,
                                deadline=time.monotonic() + 30,
                                confirm=confirm,
                                batch_size=16,
                                max_boxes=512,
                                split="relu",
                                branching=branching)
      assert result.status == exact, (eps, result, exact)
      if result.status == "falsified":
        x = result.counterexample
        assert np.all(x >= lo) and np.all(x <= hi) and confirm(x)
      answers.append(result.status)
      branched += result.status == "verified" and result.boxes > 1
  assert {"verified", "falsified"} <= set(answers)
  assert branched >= 1  # some proofs needed splits


def test_relu_branch_and_bound_in_float64_keeps_its_answers():
  fn, _ = bound_testing.relu_mlp(seed=4, sizes=(5, 16, 16, 3))
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for eps in (0.1, 0.2):  # falsified; verified after splits
      x0 = rng.uniform(size=5)
      y = int(np.argmax(fn(jnp.asarray(x0, jnp.float32)[None])))
      unsafe = UnsafeSet.of(
          [(np.eye(3)[y] - np.eye(3)[t], np.zeros(1)) for t in range(3) if t != y], 3, np.float64)
      lo, hi = x0 - eps, x0 + eps
      exact = milp_verify(fn, lo, hi, unsafe, time_limit=120, precision="float64").status
      result = branch_and_bound(
          fn,
          lo,
          hi,
          unsafe,
          deadline=time.monotonic() + 30,
          confirm=lambda z, y=y: bool(np.argmax(fn(jnp.asarray(z)[None])) != y),
          batch_size=16,
          split="relu",
          precision="float64")
      assert result.status == exact and (exact == "falsified" or result.boxes > 1), result
      setup = relu_bab.prepare(fn, lo, hi, unsafe, root_steps=5, lr=0.1, dtype=np.float64)
      assert setup.root.lower.dtype == jnp.float64
      assert float(jnp.max(setup.root.allowance)) < 1e-9  # float32's is some 2e-5 here


def test_relu_branch_and_bound_refuses_bad_settings():
  fn, _ = bound_testing.relu_mlp(seed=0, sizes=(3, 4, 2))
  unsafe = UnsafeSet.misclassified(0, 2)
  kwargs = dict(deadline=time.monotonic() + 5, confirm=lambda x: False)
  lo, hi = np.zeros(3, np.float32), np.ones(3, np.float32)
  with pytest.raises(InputError, match="branching"):
    relu_bab.search(fn, lo, hi, unsafe, branching="random", **kwargs)
  with pytest.raises(InputError, match="capacity"):
    relu_bab.search(fn, lo, hi, unsafe, batch_size=8, capacity=8, **kwargs)
  with pytest.raises(InputError, match="batch_size"):
    relu_bab.search(fn, lo, hi, unsafe, batch_size=0, **kwargs)
  with pytest.raises(InputError, match="split"):
    branch_and_bound(fn, lo, hi, unsafe, split="neurons", **kwargs)
  with pytest.raises(InputError, match="no ReLU|none"):
    relu_bab.search(lambda x: x @ jnp.ones((3, 2)), lo, hi, unsafe, **kwargs)


def test_near_the_boundary_subdomains_with_no_split_left_are_decided_exactly():
  """Radii on either side of the MILP's boundary: fully split subdomains, where no
  bound nor corner decides, are decided by the linear program of their splits."""
  fn, _ = bound_testing.relu_mlp(seed=5, sizes=(5, 20, 20, 3))
  x0 = np.random.default_rng(2).uniform(size=5).astype(np.float32)
  y = int(np.argmax(fn(jnp.asarray(x0)[None])))
  unsafe = UnsafeSet.misclassified(y, 3)
  confirm = lambda z: bool(np.argmax(fn(jnp.asarray(z)[None])) != y)
  seen = set()
  for eps in (0.19531, 0.20312):
    exact = milp_verify(fn, x0 - eps, x0 + eps, unsafe, time_limit=30).status
    status, x, count = relu_bab.search(fn,
                                       x0 - eps,
                                       x0 + eps,
                                       unsafe,
                                       deadline=time.monotonic() + 60,
                                       confirm=confirm,
                                       batch_size=8,
                                       capacity=32,
                                       max_depth=32,
                                       steps=5,
                                       root_steps=10)
    assert status == exact and count > 1, (eps, status, exact)
    if status == "falsified":
      assert confirm(x) and np.all(np.abs(x - x0) <= eps + 1e-6)
    seen.add(status)
  assert seen == {"verified", "falsified"}


def test_the_batch_size_is_the_backend_policys_or_fits_the_accelerator_budget(monkeypatch):
  fn, _ = bound_testing.relu_mlp(seed=4, sizes=(5, 16, 16, 3))
  lo, hi = np.zeros(5, np.float32), np.full(5, 0.3, np.float32)
  setup = relu_bab.prepare(fn, lo, hi, UnsafeSet.misclassified(0, 3), root_steps=2, lr=0.1)
  monkeypatch.setenv(backend.ENV, "cpu")
  assert relu_bab.default_batch_size(setup) == backend.CPU.bab_batch_size
  monkeypatch.setenv(backend.ENV, "plain")  # the accelerators' policy
  assert relu_bab.default_batch_size(setup) == relu_bab.MAX_BATCH_SIZE  # a tiny network
  per_child = 8 * 2 * 32  # 2 specification rows, 32 ReLU neurons
  monkeypatch.setattr(relu_bab, "ACCELERATOR_BUDGET", 2 * 100 * per_child)
  assert relu_bab.default_batch_size(setup) == 64  # the largest power of two <= 100

"""Robust training methods: schedules, config checks, one step of each, and that each helps."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
import bound_testing
import verify
from robustlib import data, models
from training import methods, optim, robustness, schedules, state as state_lib, steps, trainer
from training.configs import default, digits_mlp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROBUST = ("pgd", "trades", "ibp", "crown_ibp", "fast_ibp")

# ----------------------------------------------------------------------------------------------
# Schedules.


def test_linear_ramp_holds_then_moves_then_holds():
  f = schedules.ramp(1.0, 0.5, begin=10, finish=20)
  values = [float(f(s)) for s in (0, 10, 15, 20, 100)]
  np.testing.assert_allclose(values, [1.0, 1.0, 0.75, 0.5, 0.5])


def test_smooth_ramp_is_monotone_reaches_its_end_and_has_a_continuous_slope():
  f = schedules.ramp(0.0, 0.4, begin=100, finish=1100, kind="smooth")
  v = np.array([float(f(s)) for s in range(0, 1300)])
  assert v[100] == 0.0 and abs(v[1100] - 0.4) < 1e-6 and abs(v[-1] - 0.4) < 1e-6
  assert np.all(np.diff(v) >= 0)
  slope = np.diff(v)
  mid = 100 + 250  # mid_point 0.25 of the ramp
  assert abs(slope[mid - 1] - slope[mid + 1]) < 0.02 * slope[mid + 1]
  # Polynomial start: slower than the straight line over the first quarter.
  assert v[mid] < 0.25 * 0.4


def test_a_ramp_that_ends_before_it_begins_is_an_error():
  with pytest.raises(ValueError, match="ramp"):
    schedules.ramp(0.0, 1.0, begin=10, finish=5)
  with pytest.raises(ValueError, match="kind"):
    schedules.ramp(0.0, 1.0, begin=0, finish=5, kind="cubic")


# ----------------------------------------------------------------------------------------------
# Config checks at start-up.


def _config(method, **robust):
  config = digits_mlp.get_config("tiny")
  config.method = method
  config.robust.eps = 0.1
  config.robust.update(robust)
  return config


@pytest.mark.parametrize("method, robust, message", [
    ("ibp", {
        "eps": -0.1
    }, r"eps must lie in \[0, 1\)"),
    ("ibp", {
        "eps": 0.0
    }, "needs robust.eps > 0"),
    ("ibp", {
        "kappa_end": 1.5
    }, "kappa_end must lie in"),
    ("crown_ibp", {
        "beta_start": -1.0
    }, "beta_start must lie in"),
    ("ibp", {
        "warmup_steps": 15,
        "ramp_steps": 10
    }, "after training ends"),
    ("ibp", {
        "ramp_steps": -1
    }, "ramp_steps must be >= 0"),
    ("pgd", {
        "attack_steps": 0
    }, "attack_steps must be >= 1"),
    ("trades", {
        "trades_beta": -1.0
    }, "trades_beta"),
    ("pgd", {
        "ema_decay": 1.0
    }, "ema_decay"),
    ("ibp", {
        "schedule": "cubic"
    }, "schedule"),
    ("madry", {}, "unknown method"),
])
def test_bad_robust_values_are_errors_at_start_up(method, robust, message):
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.validate_config(_config(method, **robust))


# ----------------------------------------------------------------------------------------------
# One step of each method, and what each method is for.


@pytest.fixture(scope="module")
def digits():
  train = data.load("digits", "train")
  test = data.load("digits", "test")
  return train, test


def _setup(train, method, robust, num_steps, hidden=(64,), ema=False, lr=3e-3):
  model = models.create("mlp",
                        num_classes=10,
                        input_shape=train.info.input_shape,
                        mean=train.info.mean,
                        std=train.info.std,
                        hidden=hidden)
  config = default.get_config()
  config.optimizer.learning_rate = lr
  tx = optim.make_optimizer(config.optimizer, num_steps)
  rc = config.robust
  rc.update(robust)
  loss = methods.make_loss(method, rc)
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape, ema=ema)
  step = jax.jit(steps.make_train_step(model.apply, tx, loss, rc.ema_decay))
  return model, state, step


@pytest.mark.parametrize("method", ("standard",) + ROBUST)
def test_one_step_of_each_method(digits, method):
  train, _ = digits
  _, state, step = _setup(train, method, {"eps": 0.1}, 10)
  batch = next(data.batches(train, 32, seed=0))
  new, metrics = step(state, batch)
  assert int(new.step) == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  if method in ("ibp", "crown_ibp", "fast_ibp"):
    assert {"robust_loss", "verified", "kappa", "eps"} <= set(metrics)
  if method in ("pgd", "trades"):
    assert "adv_accuracy" in metrics


def test_auxiliary_terms_are_scheduled_where_their_weight_is_nonzero():
  rc = default.get_config().robust
  rc.update({"eps": 0.1, "warmup_steps": 2, "ramp_steps": 3, "reg_lambda": 0.5})
  # CROWN-IBP's bounds: not while eps = 0 (steps 0-2), then along the ramp while beta > 0.
  np.testing.assert_array_equal(methods.auxiliary_steps("crown_ibp", rc, 7),
                                [False, False, False, True, True, False, False])
  # The warm-up regularizer: weight reg_lambda (1 - eps(t) / eps) > 0 until eps is reached.
  np.testing.assert_array_equal(methods.auxiliary_steps("fast_ibp", rc, 7),
                                [True, True, True, True, True, False, False])
  rc.beta_end = 0.5  # CROWN-IBP bounds keep a weight to the end
  assert methods.auxiliary_steps("crown_ibp", rc, 7)[3:].all()
  assert methods.auxiliary_steps("ibp", rc, 7) is None


@pytest.mark.parametrize("method", ("crown_ibp", "fast_ibp"))
def test_a_loss_without_its_auxiliary_term_is_exact_where_the_term_has_no_weight(digits, method):
  train, _ = digits
  model, state, _ = _setup(train, method, {"eps": 0.1}, 10)
  rc = default.get_config().robust
  rc.update({"eps": 0.1, "warmup_steps": 2, "ramp_steps": 3, "reg_lambda": 0.5})
  x, y = next(data.batches(train, 32, seed=0))
  key = jax.random.PRNGKey(0)
  full = methods.make_loss(method, rc, auxiliary=True)
  cheap = methods.make_loss(method, rc, auxiliary=False)
  active = methods.auxiliary_steps(method, rc, 8)
  for step in range(8):
    a = float(full(model.apply, state.variables(), x, y, key, jnp.int32(step))[0])
    b = float(cheap(model.apply, state.variables(), x, y, key, jnp.int32(step))[0])
    if active[step]:
      assert a != b, step  # the term matters where it is scheduled...
    else:
      assert a == pytest.approx(b, rel=1e-6), step  # ...and only there


def test_worst_case_cross_entropy_is_the_cross_entropy_of_the_worst_logits():
  margins = jnp.asarray([[1.0, -0.5, 2.0]])  # bounds on z_y - z_j for three j != y
  worst = jnp.asarray([[0.0, -1.0, 0.5, -2.0]])  # z_hat_y = 0 first, then -margin
  expected = -jax.nn.log_softmax(worst)[0, 0]
  np.testing.assert_allclose(methods.worst_case_cross_entropy(margins)[0], expected, rtol=1e-6)


def test_warm_up_regularizer_is_zero_for_tight_balanced_bounds_and_positive_otherwise():
  box = verify.Interval(jnp.zeros((4, 3)), jnp.full((4, 3), 0.2))  # input radius 0.1
  # Centres +-1 in equal numbers and spreads, radius 0.1: as tight as the input, balanced.
  centre = jnp.asarray([[1.0, -1.0], [1.0, -1.0], [2.0, -2.0], [2.0, -2.0]])
  balanced = verify.Interval(centre - 0.1, centre + 0.1)
  assert float(methods.warmup_regularizer([balanced], box, 0.5)) == 0.0
  # Bounds 100x looser than the input: the tightness term is close to 1.
  loose = verify.Interval(centre - 10.0, centre + 10.0)
  assert 0.9 < float(methods.warmup_regularizer([loose], box, 0.5)) <= 1.0 + 1e-6
  # Every neuron inactive: the balance terms are maximal (2) and finite.
  dead = verify.Interval(-centre.__abs__() - 0.2, -centre.__abs__() - 0.1)
  assert 1.9 < float(methods.warmup_regularizer([dead], box, 0.5)) <= 2.0 + 1e-6


def test_warm_up_regularizer_has_finite_gradients_without_inactive_neurons():
  box = verify.Interval(jnp.zeros((2, 3)), jnp.full((2, 3), 0.2))

  def reg(shift):
    centre = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]) + shift  # every neuron active
    return methods.warmup_regularizer([verify.Interval(centre - 0.5, centre + 0.5)], box, 0.5)

  value, grad = jax.value_and_grad(reg)(0.0)
  assert np.isfinite(float(value)) and np.isfinite(float(grad))


def test_ibp_initialization_redraws_hidden_kernels_only():
  model = models.create("mlp", num_classes=10, input_shape=(8, 8, 1), hidden=(300, 200))
  params = models.init(model, jax.random.PRNGKey(0), (8, 8, 1))["params"]
  new = methods.ibp_init(params, jax.random.PRNGKey(1))
  kernels = [(k, v["kernel"]) for k, v in params.items() if "kernel" in v]
  assert len(kernels) == 3
  for name, kernel in kernels[:-1]:
    fan_in = kernel.shape[0]
    np.testing.assert_allclose(float(jnp.std(new[name]["kernel"])),
                               np.sqrt(2 * np.pi) / fan_in,
                               rtol=0.05)
    np.testing.assert_array_equal(new[name]["bias"], params[name]["bias"])
  last = kernels[-1][0]
  np.testing.assert_array_equal(new[last]["kernel"], params[last]["kernel"])


def _train(train, method, robust, num_steps, **kwargs):
  model, state, step = _setup(train, method, robust, num_steps, **kwargs)
  batches = data.batches(train, 64, seed=0)
  for _ in range(num_steps):
    state, metrics = step(state, next(batches))
  return model, state, metrics


def _logits_fn(model, state):
  variables = state.eval_variables()
  return lambda z: model.apply(variables, z, train=False)


@pytest.fixture(scope="module")
def standard_fn(digits):
  """The digits MLP after 400 steps of standard training, as a logits function."""
  model, state, _ = _train(digits[0], "standard", {}, 400)
  return _logits_fn(model, state)


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_raises_accuracy_under_pgd(digits, standard_fn, method):
  train, test = digits
  x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
  eps = 0.1
  attack = attacks.pgd(eps=eps, steps=20)
  model, state, _ = _train(train, method, {"eps": eps, "attack_steps": 7}, 400)
  robust = {}
  for name, fn in (("standard", standard_fn), (method, _logits_fn(model, state))):
    robust[name] = float(jnp.mean(jnp.argmax(fn(attack(fn, x, y, jax.random.key(1))), -1) == y))
  assert robust[method] > robust["standard"] + 0.15, robust


@pytest.mark.parametrize("method", ["ibp", "crown_ibp", "fast_ibp"])
def test_certified_training_raises_verified_accuracy(digits, standard_fn, method):
  train, test = digits
  x, y = jnp.asarray(test.images), jnp.asarray(test.labels)
  eps = 0.05
  robust = {"eps": 1.1 * eps, "warmup_steps": 50, "ramp_steps": 250}
  model, state, _ = _train(train, method, robust, 400)
  verified = {}
  for name, fn in (("standard", standard_fn), (method, _logits_fn(model, state))):
    verified[name] = float(jnp.mean(verify.certify(fn, x, y, eps, "ibp")))
  assert verified[method] > verified["standard"] + 0.3, verified


def test_weight_averaging_tracks_the_parameters(digits):
  train, _ = digits
  _, state, step = _setup(train, "standard", {"ema_decay": 0.9}, 20, ema=True)
  start = state.ema_params
  batches = data.batches(train, 32, seed=0)
  for _ in range(20):
    previous = state
    state, _ = step(state, next(batches))
  keep = min(0.9, (1 + 19) / (10 + 19))  # the warm-up of the decay at step 19
  expected = jax.tree.map(lambda e, p: keep * e + (1 - keep) * p, previous.ema_params, state.params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  moved = max(
      jax.tree.leaves(
          jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), start, state.ema_params)))
  assert moved > 0
  assert state.eval_variables()["params"] is state.ema_params


MULTI_DEVICE_SCRIPT = r"""
import json, sys
import jax
from training import trainer
from training.configs import digits_mlp
out = {}
for method in ("pgd", "trades", "ibp", "crown_ibp", "fast_ibp"):
  for n in (1, 8):
    config = digits_mlp.get_config("tiny")
    config.method, config.num_devices, config.num_steps = method, n, 3
    config.log_every = config.eval_every = config.checkpoint_every = 1
    config.batch_size, config.eval_batch_size = 32, 120
    config.robust.eps = 0.1
    config.robust.attack_steps = 3
    config.robust.warmup_steps, config.robust.ramp_steps = 0, 2
    config.report.enabled = False
    workdir = f"{sys.argv[1]}/{method}{n}"
    report = trainer.train_and_evaluate(config, workdir)
    assert report["num_devices"] == n
    out[f"{method}{n}"] = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")
                           if '"train"' in l]
print("LOSSES=" + json.dumps(out))
"""


def test_every_method_gives_the_same_losses_on_eight_devices_as_on_one(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT,
                         str(tmp_path)],
                        cwd=REPO_ROOT,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  losses = json.loads(proc.stdout.split("LOSSES=")[-1])
  for method in ROBUST:
    one, eight = np.array(losses[f"{method}1"]), np.array(losses[f"{method}8"])
    assert one.shape == (3,)
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5, err_msg=method)


def test_a_robust_run_ends_with_the_robustness_report(tmp_path):
  config = digits_mlp.get_config("tiny")
  config.num_steps = 60
  config.report.autoattack = True
  config.report.verify_methods = ("ibp", "crown")
  config.report.num_examples = 32
  config.report.sweep = (0.0, 1.0, 2.0)
  report = trainer.train_and_evaluate(config, str(tmp_path))
  saved = json.loads((tmp_path / "report.json").read_text())
  for r in (report, saved):
    assert r["eps"] == pytest.approx(0.1)
    assert set(r["verified_accuracy"]) == {"ibp", "crown"}
    assert {"clean_accuracy", "pgd_accuracy", "autoattack_accuracy"} <= set(r)
  assert (tmp_path / "robustness.png").stat().st_size > 0
  sweep = report["sweep"]
  assert sweep["eps"] == pytest.approx([0.0, 0.1, 0.2])
  for i in range(3):
    assert sweep["ibp"][i] <= sweep["pgd"][i] <= report["clean_accuracy"]
    assert sweep["crown"][i] <= sweep["pgd"][i]
  assert report["autoattack_accuracy"] <= report["pgd_accuracy"] + 1 / 32
  assert sweep["pgd"][0] == pytest.approx(report["clean_accuracy"])


def test_the_report_runs_bab_attack_on_what_the_attacks_and_bounds_leave_open():
  fn, _ = bound_testing.relu_mlp(1, (8, 24, 24, 4))
  x = np.random.default_rng(0).uniform(size=(6, 8)).astype(np.float32)
  y = np.asarray(jnp.argmax(fn(jnp.asarray(x)), axis=1))
  # A one-step PGD leaves points 3 and 5 robust, which the exact MILP breaks; so does
  # the branch-and-bound attack.
  report = robustness.robustness_report(fn,
                                        x,
                                        y,
                                        0.35,
                                        key=jax.random.key(0),
                                        verify_methods=("crown",),
                                        pgd_steps=1,
                                        autoattack=False,
                                        bab_attack_time=1.0)
  stage = report["bab_attack"]
  open_count = round(6 * report["pgd_accuracy"]) - round(6 * report["verified_accuracy"]["crown"])
  assert stage["examples"] == open_count > 0
  assert stage["broken"] == 2
  assert stage["broken"] + stage["verified"] <= stage["examples"]
  assert report["bab_attack_accuracy"] == pytest.approx(report["pgd_accuracy"] -
                                                        stage["broken"] / 6)
  assert report["bab_attack_accuracy"] >= report["verified_accuracy"]["crown"]
  assert "bab_attack" in robustness.format_table(report)

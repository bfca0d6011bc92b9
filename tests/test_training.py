"""The training loop: configs, smoke runs, resume after a kill, data parallelism."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import robustlib
from robustlib import checkpoints, data
from robustlib import models
from training import optim, state as state_lib, steps, trainer
from training.configs import default, digits_mlp, mnist_pgd_cnn_small

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO_ROOT, "training", "configs", "*.py"))
    if not p.endswith(("__init__.py", "default.py")))


def _tiny_digits(**overrides):
  config = digits_mlp.get_config("tiny")
  config.method, config.robust.eps, config.robust.eval_eps = "standard", 0.0, 0.0
  config.model_kwargs.hidden = (32,)
  config.eval_batch_size = 120
  for key, value in overrides.items():
    config[key] = value
  return config


def _run(args, env=None, **kwargs):
  env = dict(os.environ, **(env or {}))
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, *args],
                          cwd=REPO_ROOT,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True,
                          **kwargs)


def _assert_loaded_run_scores_as_reported(workdir, config, report):
  """The checkpoint restores the evaluated model (BatchNorm statistics, averaged weights)."""
  _, model, variables = checkpoints.load_run(str(workdir))
  test = data.load(config.dataset, "test")
  n = report["num_test_examples"]
  acc = robustlib.accuracy(robustlib.as_logits_fn(model, variables),
                           test.images[:n],
                           test.labels[:n],
                           progress=False)
  assert acc == pytest.approx(report["test_accuracy"])


def _final_params(workdir):
  _, _, variables = checkpoints.load_run(workdir)
  return variables


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_one_tiny_training(name, tmp_path):
  module = __import__(f"training.configs.{name}", fromlist=["get_config"])
  config = module.get_config("tiny")
  config.num_steps = 2
  config.eval_every = config.checkpoint_every = config.log_every = 1
  report = trainer.train_and_evaluate(config, str(tmp_path))
  assert report["steps"] == 2
  assert 0.0 <= report["test_accuracy"] <= 1.0
  saved = json.loads((tmp_path / "report.json").read_text())
  for field in ("test_accuracy", "dataset", "model", "steps", "seconds"):
    assert field in saved
  # "seconds" is the training's wall time, whatever else the report measures (both numbers
  # are rounded: images/s to 0.1, seconds to 0.01).
  ips, seconds = saved["images_per_second"], saved["seconds"]
  assert ips * seconds == pytest.approx(2 * config.batch_size, abs=0.06 * seconds + 0.006 * ips)
  if config.report.enabled and config.robust.eps > 0:
    assert saved["report_seconds"] > 0
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines if '"train"' in l] == [1, 2]
  assert (tmp_path / "curves.png").stat().st_size > 1000
  _assert_loaded_run_scores_as_reported(tmp_path, config, report)


def test_ibp_initialization_with_weight_averaging_trains(tmp_path):
  # The re-drawn weights and their average are separate buffers: the step donates both.
  config = _tiny_digits(num_steps=3, eval_every=3, checkpoint_every=3, log_every=1)
  config.method, config.robust.eps, config.robust.eval_eps = "ibp", 0.1, 0.1
  config.robust.ibp_init, config.robust.ema_decay = True, 0.5
  config.robust.warmup_steps, config.robust.ramp_steps = 0, 1
  config.report.enabled = False
  report = trainer.train_and_evaluate(config, str(tmp_path))
  assert report["steps"] == 3
  _, _, variables = checkpoints.load_run(str(tmp_path))
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))
  # A finished run is loaded with its averaged weights, the ones its report evaluated.
  saved = checkpoints.manager(str(tmp_path), read_only=True).restore(3)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], saved["ema_params"])
  assert not np.array_equal(saved["ema_params"]["Dense_0"]["kernel"],
                            saved["params"]["Dense_0"]["kernel"])
  _assert_loaded_run_scores_as_reported(tmp_path, config, report)


def test_training_learns_the_digits(tmp_path):
  config = _tiny_digits(num_steps=300, log_every=50, eval_every=300, checkpoint_every=300)
  config.optimizer.learning_rate = 3e-3
  report = trainer.train_and_evaluate(config, str(tmp_path))
  assert report["test_accuracy"] > 0.85
  losses = [
      json.loads(l)["loss"]
      for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
      if '"train"' in l
  ]
  assert losses[-1] < losses[0] / 2
  # The run directory gives back the trained model as a pure logits function.
  _, model, variables = checkpoints.load_run(str(tmp_path))
  test = data.load("digits", "test")
  logits_fn = robustlib.as_logits_fn(model, variables, test.info.input_shape)
  assert robustlib.accuracy(logits_fn, test.images, test.labels,
                            progress=False) == pytest.approx(report["test_accuracy"])
  # Re-running a finished run trains no further and reports the same result.
  again = trainer.train_and_evaluate(config, str(tmp_path))
  assert again["resumed_from_step"] == again["steps"] == 300
  assert again["test_accuracy"] == report["test_accuracy"]


def test_unknown_config_variant_is_an_error():
  with pytest.raises(ValueError, match="tny"):
    digits_mlp.get_config("tny")


def test_unknown_config_field_is_an_error(tmp_path):
  config = default.get_config()
  config.optimizer.lrr = 0.1
  with pytest.raises(trainer.ConfigError, match="optimizer.lrr"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.lrr=0.1", "unknown config field 'lrr'"),
    ("--config.optimizer.name=rmsprop", "unknown optimizer 'rmsprop'"),
])
def test_bad_command_line_config_is_a_clear_error(flag, message, tmp_path):
  proc = _run([
      "-m", "training.train", "--config=training/configs/digits_mlp.py", f"--workdir={tmp_path}",
      flag
  ])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert message in out and "Traceback" not in out


@pytest.mark.parametrize("field, value, message", [
    ("method", "magic", "unknown method"),
    ("batch_size", 0, "batch_size must be positive"),
    ("keep_checkpoints", 0, "keep_checkpoints must be positive"),
    ("model", "resnet9000", "resnet9000"),
    ("dataset", "imagenet", "imagenet"),
])
def test_bad_config_values_are_named(field, value, message, tmp_path):
  config = _tiny_digits(**{field: value})
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_bad_augmentation_is_named_before_training(tmp_path):
  config = _tiny_digits()
  config.augment.crop_padding = -2
  with pytest.raises(trainer.ConfigError, match="config.augment: crop_padding must be"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_train_step_augments_each_batch_with_a_key_of_its_own():
  train = data.load("digits", "train")
  model = models.create("mlp", num_classes=10, input_shape=train.info.input_shape, hidden=(8,))
  tx = optim.make_optimizer(default.get_config().optimizer, num_steps=10)
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape)
  x, y = next(data.batches(train, 32, seed=0))
  augment = data.make_augment(crop_padding=2, flip=True)
  augmented_step = jax.jit(steps.make_train_step(model.apply, tx, augment=augment))
  plain_step = jax.jit(steps.make_train_step(model.apply, tx))
  _, augment_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  x_augmented = augment(augment_key, x)
  assert not np.array_equal(x_augmented, x)
  copy = lambda s: jax.tree.map(jax.numpy.copy, s)
  by_step, _ = augmented_step(copy(state), (x, y))
  by_hand, _ = plain_step(copy(state), (x_augmented, y))
  unaugmented, _ = plain_step(copy(state), (x, y))
  jax.tree.map(np.testing.assert_array_equal, by_step.params, by_hand.params)
  assert not np.array_equal(by_step.params["Dense_0"]["kernel"],
                            unaugmented.params["Dense_0"]["kernel"])


def test_a_model_that_cannot_take_the_images_is_a_clear_error(tmp_path):
  config = _tiny_digits(model="cnn_small")
  config.model_kwargs = type(config.model_kwargs)()
  with pytest.raises(ValueError, match="cnn_small"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):

  def offline(*args, **kwargs):
    raise OSError("network unreachable")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  monkeypatch.setenv("ROBUSTLIB_CACHE_DIR", str(tmp_path / "cache"))
  config = _tiny_digits(dataset="mnist", data_dir=str(tmp_path / "nowhere"))
  config.model_kwargs = type(config.model_kwargs)()
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  overrides = [
      "--config.num_steps=400", "--config.checkpoint_every=40", "--config.log_every=40",
      "--config.eval_every=400", "--config.model_kwargs.hidden=(64,)",
      "--config.robust.warmup_steps=40", "--config.robust.ramp_steps=200",
      "--config.report.enabled=False"
  ]
  killed = tmp_path / "killed"
  proc = _run([
      "-m", "training.train", "--config=training/configs/digits_mlp.py", f"--workdir={killed}",
      *overrides
  ],
              start_new_session=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    steps = [int(name) for name in os.listdir(killed / "checkpoints") if name.isdigit()
            ] if (killed / "checkpoints").is_dir() else []
    if any(40 <= s < 400 for s in steps):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "training finished before it could be killed:\n" + proc.stdout.read()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  interrupted_at = checkpoints.manager(str(killed), read_only=True).latest_step()
  assert interrupted_at is not None and interrupted_at < 400

  for workdir in (killed, tmp_path / "straight"):
    proc = _run([
        "-m", "training.train", "--config=training/configs/digits_mlp.py", f"--workdir={workdir}",
        *overrides
    ])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
  report = json.loads((killed / "report.json").read_text())
  assert report["resumed_from_step"] == interrupted_at
  resumed, straight = _final_params(killed), _final_params(tmp_path / "straight")
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  steps = [
      json.loads(l)["step"]
      for l in (killed / "metrics.jsonl").read_text().splitlines()
      if '"train"' in l
  ]
  assert steps == sorted(set(steps)) and steps[-1] == 400


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax
from robustlib import models
from training import optim, state as state_lib, steps, trainer
from training.configs import digits_mlp
assert len(jax.devices()) == 8, jax.devices()
curves = {}
for n in (1, 8):
  config = digits_mlp.get_config("tiny")
  config.model_kwargs.hidden = (32,)
  config.num_steps, config.log_every, config.eval_every = 30, 1, 30
  config.batch_size, config.eval_batch_size, config.num_devices = 64, 120, n
  config.method, config.robust.eps, config.robust.eval_eps = "standard", 0.0, 0.0
  config.augment.crop_padding = 1
  workdir = f"{sys.argv[1]}/devices{n}"
  report = trainer.train_and_evaluate(config, workdir)
  assert report["num_devices"] == n
  curves[n] = [json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")
               if '"train"' in l]
print("CURVES=" + json.dumps(curves))
"""


def test_eight_devices_give_the_same_loss_curve_as_one(tmp_path):
  proc = _run(["-c", MULTI_DEVICE_SCRIPT, str(tmp_path)],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  curves = json.loads(out.split("CURVES=")[-1])
  one, eight = np.array(curves["1"]), np.array(curves["8"])
  assert one.shape == eight.shape == (30,)
  assert one[-1] < one[0]
  np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5)


def test_train_step_compiles_once_across_batches():
  train = data.load("synthetic:digits", "train")
  model = models.create("mlp", num_classes=10, input_shape=train.info.input_shape, hidden=(8,))
  tx = optim.make_optimizer(default.get_config().optimizer, num_steps=10)
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape)
  step = jax.jit(steps.make_train_step(model.apply, tx), donate_argnums=0)
  batches = data.batches(train, 32, seed=0)
  for _ in range(4):
    state, metrics = step(state, next(batches))
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_parameters_and_gradients():
  model = models.create("cnn_small", num_classes=10, input_shape=(28, 28, 1))
  variables = models.init(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  apply = steps.mixed_precision(model.apply, "bfloat16")
  seen = []

  def spy(v, z):
    seen.append((jax.tree.leaves(v)[0].dtype, z.dtype))
    return model.apply(v, z)

  logits = steps.mixed_precision(spy, "bfloat16")(variables, x)
  assert seen == [(jnp.bfloat16, jnp.bfloat16)] and logits.dtype == jnp.float32
  grads = jax.grad(lambda p: apply({"params": p}, x).sum())(variables["params"])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(logits, model.apply(variables, x), rtol=0.05, atol=0.05)
  assert steps.mixed_precision(spy, "float32") is spy
  assert apply.full_precision == model.apply  # what certified losses bound
  with pytest.raises(ValueError, match="dtype must be one of"):
    steps.mixed_precision(model.apply, "float16")


def test_a_bfloat16_run_trains_ibp_end_to_end(tmp_path):
  config = _tiny_digits(dtype="bfloat16")
  config.method, config.robust.eps, config.robust.eval_eps = "ibp", 0.1, 0.1
  report = trainer.train_and_evaluate(config, str(tmp_path))
  assert report["steps"] == config.num_steps and np.isfinite(report["test_accuracy"])
  _, _, variables = checkpoints.load_run(str(tmp_path))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  with pytest.raises(trainer.ConfigError, match="config.dtype must be one of"):
    trainer.train_and_evaluate(_tiny_digits(dtype="float16"), str(tmp_path / "bad"))


def test_a_bfloat16_run_trains_a_small_cnn_with_pgd_end_to_end(tmp_path):
  config = mnist_pgd_cnn_small.get_config("tiny")  # synthetic MNIST-shaped images
  config.dtype = "bfloat16"
  report = trainer.train_and_evaluate(config, str(tmp_path))
  assert report["steps"] == config.num_steps and np.isfinite(report["test_accuracy"])
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(r["nonfinite"] == 0 for r in records if r["split"] == "train")

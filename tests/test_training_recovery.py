"""No run loses good work: non-finite steps are skipped and a diverging run stops before it
checkpoints them, resume falls back past unusable checkpoints and torn metrics lines, and a
changed config is refused on resume unless allowed (then recorded)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robustlib import checkpoints, checks, data, models
from training import methods, optim, state as state_lib, steps, trainer
from training.configs import default, digits_mlp


def _tiny(**overrides):
  config = digits_mlp.get_config("tiny")  # 20 steps, checkpoints at 10 and 20
  config.method, config.robust.eps, config.robust.eval_eps = "standard", 0.0, 0.0
  config.model_kwargs.hidden = (16,)
  config.eval_batch_size = 120
  config.report.enabled = False
  for key, value in overrides.items():
    config[key] = value
  return config


def _params(workdir) -> dict:
  return checkpoints.load_run(str(workdir))[2]["params"]


# ----------------------------------------------------------------------------------------------
# The train step skips what is not finite.


def _nan_at_step(bad_step):

  def loss_fn(apply_fn, variables, x, y, key, step):
    loss, aux = steps.standard_loss(apply_fn, variables, x, y, key, step)
    return jnp.where(step == bad_step, jnp.nan, loss), aux

  return loss_fn


def test_a_non_finite_step_changes_nothing_but_the_step_count():
  train = data.load("digits", "train")
  model = models.create("mlp", num_classes=10, input_shape=train.info.input_shape, hidden=(8,))
  tx = optim.make_optimizer(default.get_config().optimizer, num_steps=10)
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape, ema=True)
  step = jax.jit(steps.make_train_step(model.apply, tx, _nan_at_step(1), ema_decay=0.9))
  batch = next(data.batches(train, 32, seed=0))
  after_one, m0 = step(state, batch)
  after_two, m1 = step(after_one, batch)
  after_three, m2 = step(after_two, batch)
  assert (float(m0["nonfinite"]), float(m1["nonfinite"]), float(m2["nonfinite"])) == (0, 1, 0)
  assert int(after_two.step) == 2
  for field in ("params", "opt_state", "ema_params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after_two, field),
                 getattr(after_one, field))
  assert checks.all_finite(after_three.params)
  assert not np.array_equal(after_three.params["Dense_0"]["kernel"],
                            after_two.params["Dense_0"]["kernel"])


def test_the_step_refuses_parameters_that_overflow():
  """A finite gradient whose update overflows float32 leaves the parameters as they were."""
  train = data.load("digits", "train")
  model = models.create("mlp", num_classes=10, input_shape=train.info.input_shape, hidden=(8,))
  tx = optax.chain(optax.scale(-1e30), optax.scale(1e30))  # 1e60 * g: inf
  state = state_lib.create(model, tx, jax.random.PRNGKey(0), train.info.input_shape)
  new, metrics = jax.jit(steps.make_train_step(model.apply,
                                               tx))(state, next(data.batches(train, 32, seed=0)))
  assert float(metrics["nonfinite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


# ----------------------------------------------------------------------------------------------
# A diverging run stops before it checkpoints anything non-finite.


def test_a_diverging_run_stops_with_its_good_checkpoints_kept(tmp_path):
  trainer.train_and_evaluate(_tiny(), str(tmp_path))
  good = _params(tmp_path)
  diverging = _tiny(num_steps=60, max_nonfinite_steps=3, allow_config_change=True)
  diverging.optimizer.learning_rate = 1e30
  with pytest.raises(trainer.TrainingDiverged, match=r"in a row.*last checkpoint is step 20"):
    trainer.train_and_evaluate(diverging, str(tmp_path))
  assert checkpoints.saved_steps(str(tmp_path)) == [10, 20]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path), good)
  history = json.loads((tmp_path / "config.json").read_text())["history"]
  assert history[-1]["after_step"] == 20
  assert history[-1]["changes"]["optimizer.learning_rate"] == [1e-3, 1e30]
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("nonfinite", 0) > 0 for r in records)  # the skipped steps are counted
  # The run resumes from step 20 once the learning rate is sane again.
  report = trainer.train_and_evaluate(_tiny(num_steps=30, allow_config_change=True), str(tmp_path))
  assert report["resumed_from_step"] == 20 and report["steps"] == 30


def test_the_script_reports_divergence_in_one_line(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([
      sys.executable, "-m", "training.train", "--config=training/configs/digits_mlp.py:tiny",
      f"--workdir={tmp_path}", "--config.optimizer.learning_rate=1e30",
      "--config.max_nonfinite_steps=2"
  ],
                        cwd=repo,
                        env=dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu"),
                        capture_output=True,
                        text=True,
                        timeout=180)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "FATAL TrainingDiverged: steps" in proc.stderr and "Traceback" not in proc.stderr
  assert checkpoints.saved_steps(str(tmp_path)) == []  # nothing of the diverged run was saved


# ----------------------------------------------------------------------------------------------
# Resume falls back past what is broken.


def _truncate_largest_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 3)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_run_redone_from_the_one_before(
    tmp_path):
  straight = trainer.train_and_evaluate(_tiny(), str(tmp_path / "straight"))
  broken = tmp_path / "broken"
  trainer.train_and_evaluate(_tiny(), str(broken))
  _truncate_largest_file(broken / "checkpoints" / "20")
  # Loading the run (read-only) skips it with a warning and takes step 10.
  config, model, variables = checkpoints.load_run(str(broken))
  del config, model
  ten = checkpoints.load_run(str(tmp_path / "straight"), step=10)[2]
  jax.tree.map(np.testing.assert_array_equal, variables, ten)
  # Resuming moves it aside (nothing is deleted) and trains steps 11-20 again.
  again = trainer.train_and_evaluate(_tiny(), str(broken))
  assert again["resumed_from_step"] == 10
  assert (broken / checkpoints.UNUSABLE_DIR / "20").is_dir()
  assert checkpoints.saved_steps(str(broken)) == [10, 20]
  assert again["test_accuracy"] == straight["test_accuracy"]
  jax.tree.map(np.testing.assert_array_equal, _params(broken), _params(tmp_path / "straight"))


def test_a_checkpoint_of_non_finite_values_is_skipped(tmp_path):
  trainer.train_and_evaluate(_tiny(), str(tmp_path))
  mngr = checkpoints.manager(str(tmp_path))
  on_one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = checkpoints.restore_on(mngr, 20, on_one)
  tree["params"] = jax.tree.map(lambda v: v * np.nan, tree["params"])
  shutil.rmtree(tmp_path / "checkpoints" / "20")
  mngr.reload()
  checkpoints.save(mngr, 20, tree)
  step, _ = checkpoints.newest_usable(mngr, lambda s: checkpoints.restore_on(mngr, s, on_one))
  assert step == 10
  shutil.rmtree(tmp_path / "checkpoints" / "10")
  with pytest.raises(checkpoints.CheckpointError, match="no usable checkpoint"):
    checkpoints.load_run(str(tmp_path))


def test_checkpoints_of_another_model_are_an_error_and_are_left_in_place(tmp_path):
  trainer.train_and_evaluate(_tiny(), str(tmp_path))
  other = _tiny(allow_config_change=True)
  other.model_kwargs.hidden = (24,)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"no usable checkpoint.*step 20: it does not restore.*step 10"):
    trainer.train_and_evaluate(other, str(tmp_path))
  assert checkpoints.saved_steps(str(tmp_path)) == [10, 20]
  assert not (tmp_path / checkpoints.UNUSABLE_DIR).exists()


def test_a_metrics_file_torn_mid_line_is_repaired_on_resume(tmp_path):
  trainer.train_and_evaluate(_tiny(num_steps=10), str(tmp_path))
  path = tmp_path / "metrics.jsonl"
  whole = path.read_text()
  path.write_text(whole + '{"step": 12, "split": "train", "lo')  # killed while writing
  report = trainer.train_and_evaluate(_tiny(num_steps=20, allow_config_change=True), str(tmp_path))
  assert report["resumed_from_step"] == 10
  lines = path.read_text().splitlines()
  records = [json.loads(l) for l in lines]  # every line is whole again
  assert [r["step"] for r in records if r["split"] == "test"] == [10, 20]


# ----------------------------------------------------------------------------------------------
# A changed config on resume.


def test_resuming_with_another_config_is_refused_with_the_differences(tmp_path):
  trainer.train_and_evaluate(_tiny(), str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  changed = _tiny(num_steps=40, batch_size=32)
  with pytest.raises(trainer.ConfigError, match=r"batch_size: 128 -> 32; num_steps: 20 -> 40"):
    trainer.train_and_evaluate(changed, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before
  # What does not change the parameters may change, and is recorded.
  report = trainer.train_and_evaluate(_tiny(eval_every=5, log_every=5), str(tmp_path))
  assert report["resumed_from_step"] == 20
  history = json.loads((tmp_path / "config.json").read_text())["history"]
  assert history == [{"after_step": 20, "changes": {"eval_every": [10, 5], "log_every": [10, 5]}}]


def test_config_changes_compare_plain_values():
  old = _tiny().to_dict()
  new = _tiny().to_dict()
  new["report"] = dict(new["report"], sweep=list(new["report"]["sweep"]))  # as JSON reads it
  assert trainer.config_changes(old, new) == {}
  new["optimizer"] = dict(new["optimizer"], learning_rate=0.5)
  assert trainer.config_changes(old, new) == {"optimizer.learning_rate": (1e-3, 0.5)}


# ----------------------------------------------------------------------------------------------
# Bad values at start-up.


@pytest.mark.parametrize("section, field, value, message", [
    ("optimizer", "learning_rate", -0.1, "learning_rate must be a positive number"),
    ("optimizer", "learning_rate", float("nan"), "learning_rate must be a positive number"),
    ("optimizer", "momentum", 1.5, "momentum must lie in"),
    ("optimizer", "weight_decay", -1.0, "weight_decay must be >= 0"),
    ("robust", "eps", 2.0, r"robust.eps must lie in \[0, 1\)"),
    ("robust", "eval_eps", 1.0, r"robust.eval_eps must lie in \[0, 1\)"),
    (None, "max_nonfinite_steps", 0, "max_nonfinite_steps must be positive"),
])
def test_bad_values_are_named_at_start_up(section, field, value, message, tmp_path):
  config = _tiny()
  (config[section] if section else config)[field] = value
  if section == "robust":
    config.method = "pgd"
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_methods_check_names_the_radius():
  robust = default.get_config().robust
  robust.eps = 8.0
  with pytest.raises(ValueError, match="8/255"):
    methods.check(robust, "pgd")

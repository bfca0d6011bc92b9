"""Robust accuracy on a held-out validation slice during training, the best checkpoint kept
beside the latest (Rice et al. 2020), and evaluation compiled once per run."""

import io
import json
import logging

import jax
import numpy as np
import pytest

from attacks import evaluation
from robustlib import checkpoints, data
from training import trainer, validation
from verify import runs
from training.configs import digits_mlp


def _pgd_run(num_validation=200, **overrides):
  config = digits_mlp.get_config("tiny")  # 20 steps
  config.method, config.robust.eps, config.robust.eval_eps = "pgd", 0.1, 0.1
  config.robust.attack_steps = 3
  config.model_kwargs.hidden = (32,)
  config.eval_every = 2
  config.eval_batch_size = 100
  config.report.enabled = False
  config.validation.num_examples = num_validation
  config.validation.pgd_steps = 5
  for key, value in overrides.items():
    config[key] = value
  return config


def _records(workdir, split):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["split"] == split]


def test_split_holds_out_the_last_examples():
  train = data.load("digits", "train")
  rest, held_out = validation.split(train, 100)
  assert len(rest) + len(held_out) == len(train) and len(held_out) == 100
  np.testing.assert_array_equal(held_out.images, train.images[-100:])
  assert validation.split(train, 0) == (train, None)
  with pytest.raises(ValueError, match="leaves nothing to train on"):
    validation.split(train, len(train))


def test_selection_metric_follows_the_method():
  assert validation.selection_metric("ibp", 0.1) == "ibp_accuracy"
  assert validation.selection_metric("trades", 0.1) == "pgd_accuracy"
  assert validation.selection_metric("standard", 0.0) == "accuracy"


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("validated")
  report = trainer.train_and_evaluate(_pgd_run(), str(workdir))
  return workdir, report


def test_the_checkpoint_of_best_robust_validation_accuracy_is_kept(validated_run):
  workdir, report = validated_run
  records = _records(workdir, "validation")
  assert [r["step"] for r in records] == list(range(2, 21, 2))
  assert all({"accuracy", "pgd_accuracy"} <= r.keys() for r in records)
  scores = [r["pgd_accuracy"] for r in records]
  best_step = records[int(np.argmax(scores))]["step"]  # the first of the best
  assert report["best_validation_step"] == best_step
  assert report["best_validation"] == {"pgd_accuracy": max(scores)}
  best_dir = workdir / checkpoints.BEST_DIR
  assert sorted(int(p.name) for p in best_dir.iterdir() if p.name.isdigit()) == [best_step]
  # load_run(best=True) gives the weights that scored it.
  config, model, variables = checkpoints.load_run(str(workdir), best=True)
  train = data.load(config["dataset"], "train")
  _, held_out = validation.split(train, 200)
  validate = validation.make_validate(lambda v, x: model.apply(v, x, train=False),
                                      held_out,
                                      method="pgd",
                                      eps=0.1,
                                      pgd_steps=5,
                                      batch_size=100,
                                      key=jax.random.PRNGKey(config["seed"] + 3))
  assert validate(variables)["pgd_accuracy"] == pytest.approx(max(scores), abs=1e-6)
  latest = checkpoints.load_run(str(workdir))[2]
  assert best_step == 20 or not np.array_equal(latest["params"]["Dense_0"]["kernel"],
                                               variables["params"]["Dense_0"]["kernel"])


def test_evaluations_read_the_best_checkpoint_when_asked(validated_run, tmp_path):
  workdir, _ = validated_run
  _, model, best = checkpoints.load_run(str(workdir), best=True)
  test = data.load("digits", "test")
  expected = float(
      np.mean(
          np.asarray(model.apply(best, test.images[:60], train=False)).argmax(1) ==
          test.labels[:60]))
  reports = {}
  for which in ("latest", "best"):
    out = tmp_path / which
    evaluation.evaluate_run(str(workdir),
                            suite="fgsm",
                            eps=[0.1],
                            num_examples=60,
                            output_dir=str(out),
                            progress=False,
                            checkpoint=which)
    reports[which] = json.loads((out / "attacks.json").read_text())
  assert reports["best"]["checkpoint"] == "best" and reports["latest"]["checkpoint"] == "latest"
  assert reports["best"]["clean_accuracy"] == pytest.approx(expected, abs=1e-9)
  # verify's PGD column is taken only from an attacks.json of the same checkpoint.
  column = runs.read_pgd(str(tmp_path / "best" / "attacks.json"), [0.1], 60, "digits", "latest")
  assert column.accuracy is None and "best checkpoint, not its latest" in column.note


def test_a_resumed_run_keeps_the_same_best_checkpoint(validated_run, tmp_path):
  _, straight = validated_run
  trainer.train_and_evaluate(_pgd_run(num_steps=10), str(tmp_path))
  resumed = trainer.train_and_evaluate(_pgd_run(allow_config_change=True), str(tmp_path))
  assert resumed["resumed_from_step"] == 10
  assert resumed["best_validation_step"] == straight["best_validation_step"]
  assert resumed["best_validation"] == straight["best_validation"]


def test_a_run_without_validation_has_no_best_checkpoint(tmp_path):
  trainer.train_and_evaluate(_pgd_run(num_validation=0), str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match="kept no best checkpoint"):
    checkpoints.load_run(str(tmp_path), best=True)


def test_too_large_a_validation_slice_is_a_config_error(tmp_path):
  with pytest.raises(trainer.ConfigError, match="leaves nothing to train on"):
    trainer.train_and_evaluate(_pgd_run(num_validation=10**6), str(tmp_path))


def test_test_accuracy_compiles_once_per_run(tmp_path):
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles():
      trainer.train_and_evaluate(_pgd_run(num_validation=0), str(tmp_path))
  finally:
    logging.getLogger("jax").removeHandler(handler)
  compiles = [l for l in stream.getvalue().splitlines() if l.startswith("Compiling jit(predict)")]
  assert len(_records(tmp_path, "test")) == 10 and len(compiles) == 1, compiles

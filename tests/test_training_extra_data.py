"""Unlabeled and extra data in every batch (UAT-FT, Uesato et al. 2019; Gowal et al. 2020):
the batches' composition and order, pseudo-labels from a teacher run, and the errors."""

import numpy as np
import pytest

from robustlib import checkpoints, data
from training import extra_data, trainer
from training.configs import default, digits_mlp, mnist_uat_cnn_small


def test_mixed_batches_take_their_shares_in_a_resumable_order():
  train = data.load("digits", "train")
  first = data.Dataset(train.images[:200], train.labels[:200], train.info)
  second = data.Dataset(train.images[200:], np.full(len(train) - 200, 7, np.int32), train.info)
  stream = data.mixed_batches(first, second, 32, 8, seed=3)
  batches = [next(stream) for _ in range(12)]  # past the first source's epoch of 8 batches
  for images, labels in batches:
    assert images.shape[0] == 32 and np.all(labels[24:] == 7)
    assert np.all(np.isin(images[:24].reshape(24, -1).sum(1), first.images.reshape(200, -1).sum(1)))
  resumed = data.mixed_batches(first, second, 32, 8, seed=3, start_step=10)
  for (a, b), (c, d) in zip(batches[10:], [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
  with pytest.raises(data.DataError, match="share of a batch"):
    data.mixed_batches(first, second, 32, 32, seed=0)


def _teacher(workdir):
  config = digits_mlp.get_config("tiny")
  config.method, config.robust.eps, config.robust.eval_eps = "standard", 0.0, 0.0
  config.num_steps, config.report.enabled = 40, False
  trainer.train_and_evaluate(config, str(workdir))
  return str(workdir)


def _uat(teacher, **extra):
  config = digits_mlp.get_config("tiny")
  config.method, config.robust.eps = "pgd", 0.1
  config.robust.attack_steps = 2
  config.report.enabled = False
  config.extra.update(
      dict(source="rest", labeled_examples=300, ratio=0.25, teacher_workdir=teacher) | extra)
  return config


def test_pseudo_labels_are_the_teachers_predictions_and_the_run_trains(tmp_path):
  teacher = _teacher(tmp_path / "teacher")
  config = _uat(teacher)
  train = data.load("digits", "train")
  labeled, extra = extra_data.prepare(config.extra, train, data_dir=None, batch_size=100)
  np.testing.assert_array_equal(labeled.images, train.images[:300])
  np.testing.assert_array_equal(extra.images, train.images[300:])
  _, model, variables = checkpoints.load_run(teacher)
  predicted = np.argmax(model.apply(variables, train.images[300:], train=False), axis=-1)
  np.testing.assert_array_equal(extra.labels, predicted)
  assert 0.5 < np.mean(extra.labels == train.labels[300:]) < 1.0  # a teacher, not the truth
  assert extra_data.extra_per_batch(config.extra, 128) == 32
  report = trainer.train_and_evaluate(config, str(tmp_path / "uat"))
  assert (report["num_labeled_examples"], report["num_extra_examples"]) == (300, len(train) - 300)


def test_a_labeled_data_set_keeps_its_labels_without_a_teacher():
  config = default.get_config()
  config.extra.update(source="digits", ratio=0.5)
  train = data.load("digits", "train")
  labeled, extra = extra_data.prepare(config.extra, train, data_dir=None, batch_size=100)
  assert labeled is train
  np.testing.assert_array_equal(extra.labels, train.labels)


@pytest.mark.parametrize("extra, message", [
    (dict(teacher_workdir=""), "needs extra.labeled_examples > 0 and extra.teacher_workdir"),
    (dict(teacher_workdir="/nonexistent/run"), "extra.teacher_workdir: .*not a training run"),
    (dict(ratio=1.0), r"extra.ratio must lie in \(0, 1\)"),
    (dict(labeled_examples=10**6), r"extra.labeled_examples must lie in \[0, "),
])
def test_bad_extra_data_configs_are_named_at_start_up(extra, message, tmp_path):
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(_uat("/nonexistent/run", **extra), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_teacher_of_other_images_is_refused(tmp_path):
  teacher = tmp_path / "teacher"
  config = mnist_uat_cnn_small.get_config("tiny")  # synthetic MNIST-shaped images
  config.method, config.robust.eps = "standard", 0.0
  trainer.train_and_evaluate(config, str(teacher))
  with pytest.raises(trainer.ConfigError, match="holds a synthetic:mnist model"):
    trainer.train_and_evaluate(_uat(str(teacher)), str(tmp_path / "uat"))


def test_the_uat_config_runs_its_three_variants(tmp_path):
  teacher = mnist_uat_cnn_small.get_config("teacher")
  assert (teacher.method, teacher.extra.source, teacher.extra.labeled_examples) == ("standard", "",
                                                                                    1000)
  assert mnist_uat_cnn_small.get_config("labeled_only").extra.source == ""
  tiny = mnist_uat_cnn_small.get_config("tiny")
  assert tiny.extra.source == ""  # runs alone, as every config's tiny variant
  trainer.train_and_evaluate(tiny, str(tmp_path / "t"))
  uat = mnist_uat_cnn_small.get_config("tiny")
  uat.extra.source, uat.extra.teacher_workdir = "rest", str(tmp_path / "t")
  report = trainer.train_and_evaluate(uat, str(tmp_path / "uat"))
  assert report["num_labeled_examples"] == 100

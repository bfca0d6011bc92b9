"""Unlabeled or extra data mixed into every training batch.

Uesato et al. 2019 ("Are Labels Required for Improving Adversarial Robustness?", UAT-FT)
and Gowal et al. 2020 label unlabeled images with a standard-trained teacher and train on
them as on labeled ones, each batch drawing a fixed share from them. `prepare` builds the
two sources from a config's ``extra`` section:

* ``labeled_examples``: train on the first this many training examples only (with or
  without a source: a teacher or a labeled-only baseline trains so);
* ``source``: ``"rest"`` (the training split beyond them, labels dropped) or a data set's
  name (its training split: extra data with the same image shape);
* ``teacher_workdir``: a training run whose predictions are the extra data's labels
  (required for ``"rest"``; without it a named data set keeps its own labels);
* ``ratio``: the fraction of each batch drawn from the extra data.

The loss treats labeled and pseudo-labeled examples alike, as UAT-FT does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from robustlib import batching, checkpoints, data


def check(c, train_size: int) -> None:
  """Raises ValueError for an ``extra`` section that cannot work (before any loading)."""
  n = int(c.labeled_examples)
  if n < 0 or n >= train_size:
    raise ValueError(f"extra.labeled_examples must lie in [0, {train_size}) (0: every "
                     f"training example), got {n}")
  if not c.source:
    if c.teacher_workdir:
      raise ValueError("extra.teacher_workdir needs extra.source ('rest' or a data set)")
    return
  if not 0 < float(c.ratio) < 1:
    raise ValueError(f"extra.ratio must lie in (0, 1), got {c.ratio}")
  if c.source == "rest" and not (n and c.teacher_workdir):
    raise ValueError("extra.source='rest' (the training split beyond extra.labeled_examples, "
                     "unlabeled) needs extra.labeled_examples > 0 and extra.teacher_workdir "
                     "(the run whose predictions label it)")


def pseudo_labels(teacher_workdir: str, images: np.ndarray, info: data.DatasetInfo,
                  batch_size: int) -> np.ndarray:
  """The teacher run's predicted classes of ``images`` ``[N]`` (int32)."""
  try:
    config, model, variables = checkpoints.load_run(teacher_workdir)
  except checkpoints.CheckpointError as e:
    raise ValueError(f"extra.teacher_workdir: {e}") from None
  teacher = data.info(config["dataset"])
  if (teacher.input_shape, teacher.num_classes) != (info.input_shape, info.num_classes):
    raise ValueError(f"extra.teacher_workdir {teacher_workdir!r} holds a {config['dataset']} "
                     f"model ({teacher.input_shape}, {teacher.num_classes} classes), not one of "
                     f"{info.name}'s images ({info.input_shape}, {info.num_classes} classes)")

  def predict(v, x):
    return jnp.argmax(model.apply(v, x, train=False), axis=-1).astype(jnp.int32)

  return batching.batched_apply(predict,
                                images,
                                batch_size=batch_size,
                                params=variables,
                                desc="pseudo-labels",
                                progress=False)


def prepare(c, train: data.Dataset, *, data_dir: str | None,
            batch_size: int) -> tuple[data.Dataset, data.Dataset | None]:
  """``(labeled, extra)``: the labeled training examples and the extra source with its
  labels (pseudo-labels from the teacher where given); ``extra`` is None without a source.
  """
  check(c, len(train))
  n = int(c.labeled_examples) or len(train)
  labeled = data.Dataset(train.images[:n], train.labels[:n],
                         train.info) if n < len(train) else train
  if not c.source:
    return labeled, None
  if c.source == "rest":
    images, labels = train.images[n:], None
  else:
    other = data.load(c.source, "train", data_dir=data_dir)
    if other.info.input_shape != train.info.input_shape:
      raise ValueError(f"extra.source {c.source!r} has images of shape {other.info.input_shape}, "
                       f"the training data {train.info.input_shape}")
    images = other.images
    labels = other.labels if other.info.num_classes == train.info.num_classes else None
  if c.teacher_workdir:
    labels = pseudo_labels(c.teacher_workdir, images, train.info, batch_size)
  if labels is None:
    raise ValueError(f"extra.source {c.source!r} has no labels for {train.info.name}'s classes: "
                     "give extra.teacher_workdir")
  return labeled, data.Dataset(images, labels, train.info)


def extra_per_batch(c, batch_size: int) -> int:
  """Rows of each batch drawn from the extra source: ``round(ratio * batch_size)``, at least 1
  and leaving at least 1 labeled row."""
  return min(max(int(round(float(c.ratio) * batch_size)), 1), batch_size - 1)

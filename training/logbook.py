"""Metrics of a run: a JSONL file, a PNG of the curves and progress lines."""

from __future__ import annotations

import collections
import datetime
import json
import os
import time

from absl import logging

from robustlib import plotting

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class Logbook:
  """Appends ``{"step", "split", metric: value}`` records to ``workdir/metrics.jsonl``.

  Only an enabled logbook (the main process's) writes files. On resume from
  step ``s`` the records after ``s`` (written by the killed run
  after its last checkpoint) are dropped, so the file never holds a step twice; so is,
  with a warning, a line that is not a whole record (a run killed mid-write).
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.workdir, self.enabled = workdir, enabled
    records = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        records = [r for r in (_record(self.path, i, line) for i, line in enumerate(f, 1)) if r]
    self.records = [r for r in records if r["step"] <= resume_step]
    if not enabled:
      return
    with open(self.path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in self.records)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, split: str, metrics: dict) -> None:
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    self.records.append(record)
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def plot(self, title: str) -> str:
    """Saves loss and accuracy curves of every split to ``workdir/curves.png``, and the
    validation split's robust accuracies (PGD, IBP) where it has them."""
    panels = collections.defaultdict(dict)
    for panel, metric, splits in (("loss", "loss", ("train", "test")),
                                  ("accuracy", "accuracy", ("train", "test", "validation")),
                                  ("robust accuracy", "pgd_accuracy", ("validation",)),
                                  ("robust accuracy", "ibp_accuracy", ("validation",))):
      for split in splits:
        pts = [(r["step"], r[metric]) for r in self.records if r["split"] == split and metric in r]
        if pts:
          label = split if panel != "robust accuracy" else f"{split} {metric.split('_')[0]}"
          panels[panel][label] = tuple(zip(*pts))
    return plotting.save_line_plots(os.path.join(self.workdir, CURVES_FILE),
                                    dict(panels),
                                    title=title)


def _record(path: str, number: int, line: str) -> dict | None:
  """Line ``number`` of the metrics file as a record; None, with a warning, where it is not
  one."""
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    record = None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    logging.warning(
        "%s: line %d is not a whole record (a run killed while writing it?) and is "
        "dropped: %.80r", path, number, line)
    return None
  return record


class Progress:
  """Log lines with step rate, image rate and ETA."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self.start_step, self.start_time = start_step, time.perf_counter()

  def line(self, step: int, metrics: dict) -> str:
    elapsed = time.perf_counter() - self.start_time
    rate = (step - self.start_step) / max(elapsed, 1e-9)
    eta = datetime.timedelta(seconds=round((self.num_steps - step) / max(rate, 1e-9)))
    values = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    text = (f"step {step}/{self.num_steps} {values} | {rate:.1f} steps/s "
            f"{rate * self.batch_size:.0f} img/s | ETA {eta}")
    logging.info(text)
    return text

"""Many hosts and any device count: a 2-process run (``jax.distributed`` on 127.0.0.1, 2 CPU
devices each) trains and reports as a 1-process 4-device run does, and a run trained on 8
devices resumes on 2 and loads, is attacked and is certified in a 1-device process."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from robustlib import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["-m", "training.train", "--config=training/configs/digits_mlp.py:tiny"]
# Fields of report.json that are timings, not results.
TIMINGS = ("seconds", "images_per_second", "report_seconds")


def _start(args, log: pathlib.Path, devices: int):
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  return subprocess.Popen([sys.executable, *args],
                          cwd=REPO,
                          env=env,
                          stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def _finish(proc, log: pathlib.Path, timeout=300):
  proc.wait(timeout=timeout)
  assert proc.returncode == 0, log.read_text()[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes_beside_one(two_args, one_args, tmp_path: pathlib.Path, one_devices: int):
  """Runs ``two_args`` as 2 processes x 2 CPU devices (``--distributed`` on 127.0.0.1,
  logs ``process{i}.log``) and ``one_args`` as 1 process with ``one_devices``, at once."""
  port = _free_port()
  procs = [
      _start([
          *two_args, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={i}"
      ],
             tmp_path / f"process{i}.log",
             devices=2) for i in range(2)
  ]
  one = _start(one_args, tmp_path / "one.log", devices=one_devices)
  for i, proc in enumerate(procs):
    _finish(proc, tmp_path / f"process{i}.log")
  _finish(one, tmp_path / "one.log")


def _results(workdir: pathlib.Path) -> dict:
  report = json.loads((workdir / "report.json").read_text())
  return {k: v for k, v in report.items() if k not in TIMINGS}


def _params(workdir: pathlib.Path):
  return checkpoints.load_run(str(workdir))[2]


def test_two_processes_train_and_report_as_one_process_with_as_many_devices(tmp_path):
  _two_processes_beside_one([*TINY, f"--workdir={tmp_path / 'two'}"],
                            [*TINY, f"--workdir={tmp_path / 'one'}"],
                            tmp_path,
                            one_devices=4)
  two_processes, one_process = _results(tmp_path / "two"), _results(tmp_path / "one")
  assert two_processes["num_devices"] == 4 and "pgd_accuracy" in two_processes
  assert two_processes == one_process
  # The all-reduce across processes (gloo) sums in another order, and Adam divides by small
  # second moments: parameters agree to 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _params(tmp_path / "two"), _params(tmp_path / "one"))
  assert "robustness at eps" not in (tmp_path / "process1.log").read_text()  # printed once


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eight") / "run"
  log = workdir.parent / "train.log"
  _finish(_start([*TINY, f"--workdir={workdir}", "--config.eval_batch_size=64"], log, 8), log)
  return workdir


def test_a_run_resumes_on_another_device_count(eight_device_run, tmp_path):
  resumed = tmp_path / "resumed"
  shutil.copytree(eight_device_run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "20")  # as if killed after step 10
  log = tmp_path / "resume.log"
  _finish(_start([*TINY, f"--workdir={resumed}", "--config.eval_batch_size=64"], log, devices=2),
          log)
  assert "saved on 8 devices and resumes on 2" in log.read_text()
  report = json.loads((resumed / "report.json").read_text())
  assert report["resumed_from_step"] == 10 and report["num_devices"] == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _params(resumed), _params(eight_device_run))


def test_a_run_trained_on_eight_devices_is_attacked_and_certified_on_one(
    eight_device_run, tmp_path):
  assert len(jax.devices()) == 1 or os.environ.get("XLA_FLAGS")
  variables = _params(eight_device_run)  # this process's devices
  assert all(len(v.devices()) == 1 for v in jax.tree.leaves(variables))
  for module, args in (("attacks.evaluate", ["--suite=pgd"]), ("verify.certify", ["--method=ibp"])):
    log = tmp_path / f"{module}.log"
    _finish(
        _start([
            "-m", module, f"--workdir={eight_device_run}", f"--output_dir={tmp_path}",
            "--eps=0,0.05", "--num_examples=32", "--batch_size=32", *args
        ],
               log,
               devices=1), log)
  attacked = json.loads((tmp_path / "attacks.json").read_text())
  certified = json.loads((tmp_path / "verify.json").read_text())
  assert attacked["num_examples"] == certified["num_examples"] == 32
  assert attacked["clean_accuracy"] == pytest.approx(certified["clean_accuracy"])
  assert attacked["robust_accuracy"][0] == attacked["clean_accuracy"]


def test_attacks_evaluate_over_two_processes_equals_one_device(eight_device_run, tmp_path):
  """Each batch split over 2 processes x 2 devices (outputs span devices of the other
  process) gives the 1-device run's per-example results, and only process 0 writes."""
  args = [
      "-m", "attacks.evaluate", f"--workdir={eight_device_run}", "--suite=fgsm,pgd",
      "--eps=0.05,0.1", "--num_examples=40", "--batch_size=16"
  ]
  _two_processes_beside_one([*args, f"--output_dir={tmp_path / 'two'}"],
                            [*args, f"--output_dir={tmp_path / 'one'}"],
                            tmp_path,
                            one_devices=1)
  two_processes, one_device = (
      json.loads((tmp_path / d / "attacks.json").read_text()) for d in ("two", "one"))
  assert (two_processes["num_devices"], one_device["num_devices"]) == (4, 1)
  for field in ("clean_flags", "stage_flags", "robust_accuracy"):
    assert two_processes[field] == one_device[field], field
  assert 0 < two_processes["robust_accuracy"][1] < two_processes["clean_accuracy"]
  assert "after fgsm" in (tmp_path / "process0.log").read_text()  # the table
  assert "after fgsm" not in (tmp_path / "process1.log").read_text()
  states = sorted(p.name for p in (tmp_path / "two" / "attacks_state").iterdir())
  assert len(states) == 2 and states[0].endswith("-process0.npz"), states


@pytest.mark.parametrize("args", [TINY[1:], ["attacks.evaluate"]])
def test_coordinator_flags_without_distributed_are_a_usage_error(args, tmp_path):
  proc = subprocess.run([sys.executable, "-m", *args, f"--workdir={tmp_path}", "--num_processes=2"],
                        cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
                        capture_output=True,
                        text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "need --distributed" in proc.stderr

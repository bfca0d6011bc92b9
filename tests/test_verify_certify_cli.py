"""`python -m verify.certify --workdir=DIR`: certified accuracy of a training run, end to end.

A small digits MLP is trained with IBP by the training loop (a few seconds);
the script runs in a subprocess, as a user runs it.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import digits_runs
from attacks import evaluation
from robustlib import as_logits_fn, checkpoints, data
from verify import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A training run's directory: an IBP-trained digits MLP."""
  return pathlib.Path(digits_runs.train(tmp_path_factory.mktemp("digits_run"), "ibp"))


def _script(*args):
  return subprocess.run([sys.executable, "-m", "verify.certify", *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True)


def _clean_flags(workdir, n):
  _, model, variables = checkpoints.load_run(str(workdir))
  test = data.load("digits", "test")
  logits_fn = as_logits_fn(model, variables, test.info.input_shape)
  return np.asarray(jnp.argmax(logits_fn(test.images[:n]), axis=1) == test.labels[:n])


def test_script_prints_and_writes_verified_accuracy(run, tmp_path):
  out = _script(f"--workdir={run}", f"--output_dir={tmp_path}", "--method=ibp,crown",
                "--eps=0,0.02,0.05", "--num_examples=80", "--batch_size=32")
  assert out.returncode == 0, out.stderr[-3000:]
  content = json.loads((tmp_path / "verify.json").read_text())
  assert content["eps"] == [0.0, 0.02, 0.05] and content["methods"] == ["ibp", "crown"]
  assert content["num_examples"] == 80 and content["dataset"] == "digits"
  clean = _clean_flags(run, 80)
  np.testing.assert_array_equal(content["clean_flags"], clean)
  assert content["clean_accuracy"] == pytest.approx(clean.mean())
  for method in ("ibp", "crown"):
    flags = np.asarray(content["verified_flags"][method], bool)  # [E, N]
    assert flags.shape == (3, 80)
    np.testing.assert_allclose(content["verified_accuracy"][method], flags.mean(axis=1))
    np.testing.assert_array_equal(flags[0], clean)  # radius 0: the correct points
    assert not np.any(flags & ~clean)
  ibp = np.asarray(content["verified_flags"]["ibp"], bool)
  assert not np.any(ibp[2] & ~ibp[1])  # IBP is monotone in the box
  assert 0 < content["verified_accuracy"]["ibp"][1] < content["clean_accuracy"]
  # No attacks.json in the run: the PGD column is left out, and the output says so.
  assert content["pgd_accuracy"] is None
  header = out.stdout.splitlines()[1]
  assert "clean" in header and "verified ibp" in header and "PGD" not in header
  assert "no PGD column" in out.stdout and "attacks.evaluate" in out.stdout
  for value in content["verified_accuracy"]["crown"]:
    assert f"{value:.2%}" in out.stdout
  assert (tmp_path / "verify.png").read_bytes()[:4] == b"\x89PNG"
  assert not (run / "verify.json").exists()  # --output_dir was honoured


def test_script_reads_pgd_accuracy_from_attacks_json(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  evaluation.evaluate_run(str(workdir),
                          suite="pgd",
                          eps=[0.02, 0.05],
                          num_examples=60,
                          batch_size=30,
                          progress=False)
  attacked = json.loads((workdir / "attacks.json").read_text())
  out = _script(f"--workdir={workdir}", "--method=crown", "--eps=0,0.02,0.05,0.08",
                "--num_examples=40")
  assert out.returncode == 0, out.stderr[-3000:]
  content = json.loads((workdir / "verify.json").read_text())
  # Restricted to the 40 examples verified here (attacks.json holds 60).
  robust = np.asarray(attacked["robust_flags"], bool)[:, :40]
  clean = content["clean_accuracy"]
  assert content["pgd_accuracy"] == pytest.approx([clean, *robust.mean(axis=1), None])
  assert "PGD" in out.stdout.splitlines()[1]
  assert "no result there for eps 0.08" in out.stdout
  verified = content["verified_accuracy"]["crown"]
  for v, p in zip(verified[:3], content["pgd_accuracy"][:3]):
    assert v <= p <= clean
  # Per example, the attack breaks no verified example (and 0.08 has no attack flags).
  assert content["verified_but_attacked"] == {"crown": [0, 0, 0, None]}
  assert "the attack breaks none of the examples verified by crown" in out.stdout
  assert (workdir / "verify.png").exists()


def test_a_verified_example_that_the_attack_broke_is_reported(run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  content = runs.certify_run(str(workdir), methods="ibp", eps=[0.02], num_examples=30)
  verified = np.asarray(content["verified_flags"]["ibp"], bool)[0]
  assert verified.sum() >= 2
  # An attacks.json claiming to have broken two of the verified examples.
  robust = verified.copy()
  robust[np.nonzero(verified)[0][:2]] = False
  (workdir / "attacks.json").write_text(
      json.dumps({
          "suite": "pgd",
          "norm": "linf",
          "dataset": "digits",
          "eps": [0.02],
          "num_examples": 30,
          "robust_accuracy": [float(robust.mean())],
          "robust_flags": [robust.astype(int).tolist()],
      }))
  content = runs.certify_run(str(workdir), methods="ibp", eps=[0.02], num_examples=30)
  assert content["verified_but_attacked"] == {"ibp": [2]}
  assert "UNSOUND: verified examples broken by the attack (per method): ibp 2" in runs.table(
      content)


def test_milp_decides_every_example_crown_leaves_open(run, tmp_path):
  content = runs.certify_run(str(run),
                             methods="crown,milp",
                             eps=[0.05, 0.09],
                             num_examples=40,
                             output_dir=str(tmp_path),
                             milp_time_limit=120)
  clean = np.asarray(content["clean_flags"], bool)
  crown = np.asarray(content["verified_flags"]["crown"], bool)
  exact = np.asarray(content["verified_flags"]["milp"], bool)
  assert not np.any(crown & ~exact) and not np.any(exact & ~clean)
  # Exact: every correct example is either proven robust or broken by a counterexample.
  assert content["milp"]["unknown"] == [0, 0]
  n = clean.sum()
  np.testing.assert_array_equal(exact.sum(axis=1) + np.asarray(content["milp"]["falsified"]), n)
  assert np.any(exact & ~crown) and sum(content["milp"]["falsified"]) > 0
  # A strong attack never breaks an example proven robust.
  report = evaluation.evaluate_run(str(run),
                                   suite="pgd",
                                   eps=[0.05, 0.09],
                                   num_examples=40,
                                   batch_size=40,
                                   progress=False,
                                   output_dir=str(tmp_path))
  robust = np.asarray(report.robust_flags, bool)
  assert not np.any(exact & ~robust)
  assert "counterexamples found" in runs.table(content)


def test_script_reports_user_errors_in_one_line(run, tmp_path):
  out = _script(f"--workdir={run}", "--method=ibp,lp", "--eps=0.1")
  assert out.returncode == 2 and "unknown method 'lp'" in out.stderr
  assert "Traceback" not in out.stderr
  out = _script(f"--workdir={run}", "--method=milp", "--milp_time_limit=0")
  assert out.returncode == 2 and "milp_time_limit must be > 0" in out.stderr
  assert "Traceback" not in out.stderr
  out = _script(f"--workdir={tmp_path}")
  assert out.returncode == 2 and "config.json" in out.stderr
  assert "Traceback" not in out.stderr


def test_an_onnx_export_of_the_run_gives_the_same_answers(run, tmp_path):
  """`--onnx` with `--dataset`: the same network read from a file (NCHW) is attacked and certified."""
  digits_runs.export_mlp(run, tmp_path / "digits_mlp.onnx")
  args = ["--eps=0.02,0.05", "--num_examples=60"]
  by_run = _script(f"--workdir={run}", f"--output_dir={tmp_path / 'run'}", "--method=ibp,crown",
                   *args)
  by_onnx = _script(f"--onnx={tmp_path / 'digits_mlp.onnx'}", "--dataset=digits",
                    "--method=ibp,crown", *args)
  assert by_run.returncode == 0 and by_onnx.returncode == 0, by_onnx.stderr[-3000:]
  ours = json.loads((tmp_path / "run" / "verify.json").read_text())
  theirs = json.loads((tmp_path / "verify.json").read_text())  # beside the ONNX file
  assert theirs["model"] == "digits_mlp.onnx" and theirs["dataset"] == "digits"
  assert theirs["clean_flags"] == ours["clean_flags"]
  for method in ("ibp", "crown"):
    np.testing.assert_allclose(theirs["verified_accuracy"][method],
                               ours["verified_accuracy"][method],
                               atol=1.5 / 60)  # a borderline point may flip with rounding
  attacked = subprocess.run([
      sys.executable, "-m", "attacks.evaluate", f"--onnx={tmp_path / 'digits_mlp.onnx'}",
      "--dataset=digits", "--suite=pgd", "--eps=0.05", "--num_examples=60"
  ],
                            cwd=REPO,
                            capture_output=True,
                            text=True)
  assert attacked.returncode == 0, attacked.stderr[-3000:]
  report = json.loads((tmp_path / "attacks.json").read_text())
  assert report["model"] == "digits_mlp.onnx"
  assert report["clean_accuracy"] == pytest.approx(ours["clean_accuracy"])
  assert theirs["verified_accuracy"]["crown"][1] <= report["robust_accuracy"][0]


def test_onnx_needs_a_dataset_and_excludes_workdir(run, tmp_path):
  out = _script(f"--onnx={tmp_path / 'missing.onnx'}")
  assert out.returncode == 2 and "--dataset" in out.stderr and "Traceback" not in out.stderr
  out = _script(f"--onnx={tmp_path / 'missing.onnx'}", f"--workdir={run}", "--dataset=digits")
  assert out.returncode == 2 and "either --workdir" in out.stderr


def test_bab_attack_breaks_open_examples_and_the_table_counts_them(run, tmp_path):
  content = runs.certify_run(str(run),
                             methods="ibp",
                             eps=[0.0, 0.08],
                             num_examples=16,
                             output_dir=str(tmp_path),
                             bab_attack_time=1.0)
  clean = np.asarray(content["clean_flags"], bool)
  verified = np.asarray(content["verified_flags"]["ibp"], bool)
  bab = content["bab_attack"]
  broken = np.asarray(bab["broken_flags"], bool)
  assert bab["examples"] == [0, int(np.sum(clean & ~verified[1]))]  # radius 0: none open
  assert not np.any(broken & ~(clean & ~verified))  # only open examples, never a verified one
  assert bab["broken"] == broken.sum(axis=1).tolist() and bab["broken"][1] >= 1
  assert "bab_attack (1 s per example): broke 0, " in runs.table(content)
  with pytest.raises(runs.checks.InputError, match="bab_attack_time"):
    runs.certify_run(str(run), methods="ibp", eps=[0.08], bab_attack_time=-1.0)

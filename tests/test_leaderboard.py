"""`python -m benchmarks.leaderboard`: two training runs and an ONNX export, end to end.

Two digits MLPs are trained by the training loop (a standard one and an IBP one,
a few seconds each) and the first is exported to ONNX; the leaderboard must give
the export the same numbers as its run, the IBP model a higher verified accuracy,
write its three files, and resume from its results.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import attacks
import digits_runs
from benchmarks import leaderboard
from robustlib.checks import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("leaderboard_models")
  standard = digits_runs.train(root / "standard", "standard")
  ibp = digits_runs.train(root / "ibp", "ibp")
  onnx_file = root / "standard.onnx"
  digits_runs.export_mlp(standard, onnx_file)
  return standard, ibp, str(onnx_file)


def test_leaderboard_of_two_runs_and_an_onnx_export(models, tmp_path, monkeypatch):
  standard, ibp, onnx_file = models
  threats = [leaderboard.parse_threat("linf:0.05,0.1"), leaderboard.parse_threat("l2:0.5")]
  kwargs = dict(output_dir=str(tmp_path),
                dataset="digits",
                num_examples=NUM_EXAMPLES,
                batch_size=40,
                progress=False)
  content = leaderboard.leaderboard([standard, ibp, onnx_file], threats, **kwargs)
  rows = content["models"]
  assert list(rows) == ["standard", "ibp", "standard.onnx"]
  for label, entry in rows.items():
    results = entry["results"]
    linf, l2 = results["linf:0.05,0.1"], results["l2:0.5"]
    assert 0.5 < results["clean_accuracy"] <= 1.0
    # Robust accuracy falls with the radius and never exceeds clean accuracy.
    assert results["clean_accuracy"] >= linf["autoattack"][0] >= linf["autoattack"][1]
    for method in ("ibp", "crown"):
      verified = linf["verified"][method]["accuracy"]
      assert all(v <= a for v, a in zip(verified, linf["autoattack"])), (label, method)
    assert "verified" not in l2  # the bounds are L-inf bounds
    for norm in ("linf", "l2"):
      curve = results["curves"][norm]
      assert np.all(np.diff(curve["robust_accuracy"]) <= 0)
      assert curve["robust_accuracy"][0] == pytest.approx(results["clean_accuracy"])
  # The export is the same network: the same answers (a borderline point may flip).
  run, export = rows["standard"]["results"], rows["standard.onnx"]["results"]
  assert export["clean_accuracy"] == run["clean_accuracy"]
  np.testing.assert_allclose(export["linf:0.05,0.1"]["autoattack"],
                             run["linf:0.05,0.1"]["autoattack"],
                             atol=1.5 / NUM_EXAMPLES)
  # IBP training is what makes IBP bounds verify.
  ibp_verified = rows["ibp"]["results"]["linf:0.05,0.1"]["verified"]["ibp"]["accuracy"]
  std_verified = run["linf:0.05,0.1"]["verified"]["ibp"]["accuracy"]
  assert ibp_verified[0] > std_verified[0]

  table = (tmp_path / "leaderboard.md").read_text()
  assert table.splitlines()[0].startswith("| model | clean | linf 0.05 AA | linf 0.05 IBP")
  assert "| ibp |" in table and "| standard.onnx |" in table
  assert json.loads((tmp_path / "leaderboard.json").read_text()) == content
  assert (tmp_path / "leaderboard.png").stat().st_size > 1000

  # A rerun (as after a kill) reuses every saved result: nothing is evaluated again.
  def refuse(*args, **kw):
    raise AssertionError("a saved result was computed again")

  monkeypatch.setattr(attacks, "evaluate", refuse)
  again = leaderboard.leaderboard([standard, ibp, onnx_file], threats, **kwargs)
  assert again == content


def test_a_killed_leaderboard_resumes_where_it_stopped(models, tmp_path, monkeypatch):
  standard, ibp, _ = models
  threats = [leaderboard.parse_threat("linf:0.1")]
  kwargs = dict(output_dir=str(tmp_path),
                num_examples=NUM_EXAMPLES,
                batch_size=40,
                verify_methods=("ibp",),
                progress=False)
  calls = []
  evaluate = attacks.evaluate

  def dies_on_the_second_model(logits_fn, *args, **kw):
    calls.append(args[2].name)
    if len(calls) == 3:  # the first model's AutoAttack and curve are saved
      raise KeyboardInterrupt
    return evaluate(logits_fn, *args, **kw)

  monkeypatch.setattr(attacks, "evaluate", dies_on_the_second_model)
  with pytest.raises(KeyboardInterrupt):
    leaderboard.leaderboard([standard, ibp], threats, **kwargs)
  saved = json.loads((tmp_path / "leaderboard.json").read_text())
  assert "autoattack" in saved["models"]["standard"]["results"]["linf:0.1"]
  calls.clear()
  monkeypatch.setattr(attacks, "evaluate", lambda *a, **kw:
                      (calls.append(a[3].name), evaluate(*a, **kw))[1])
  content = leaderboard.leaderboard([standard, ibp], threats, **kwargs)
  assert calls == ["autoattack", "fmn-t-linf"]  # the second model's only
  assert set(content["models"]) == {"standard", "ibp"}
  # A threat added later is the only one computed (the curve's grid is unchanged).
  calls.clear()
  more = threats + [leaderboard.parse_threat("linf:0.05")]
  content = leaderboard.leaderboard([standard, ibp], more, **kwargs)
  assert calls == ["autoattack", "autoattack"]
  assert set(
      content["models"]["ibp"]["results"]) == {"clean_accuracy", "curves", "linf:0.1", "linf:0.05"}
  content = leaderboard.leaderboard([standard], threats[:1], **kwargs)
  assert "linf:0.05" not in content["models"]["standard"]["results"]  # this call's threats


@pytest.mark.parametrize("spec, match", [("linf", "NORM:EPS"), ("l3:0.1", "NORM:EPS"),
                                         ("linf:a", "numbers"), ("l2:", "no radius"),
                                         ("linf:-0.1", ">= 0")])
def test_bad_threats_are_clear_errors(spec, match):
  with pytest.raises(InputError, match=match):
    leaderboard.parse_threat(spec)


def test_script_usage(models, tmp_path):
  run = lambda *args: subprocess.run([sys.executable, "-m", "benchmarks.leaderboard", *args],
                                     cwd=REPO,
                                     capture_output=True,
                                     text=True)
  assert run("--help").returncode == 0
  for args, message in (([f"--models={models[0]}", "--threats=linf"], "NORM:EPS"),
                        ([f"--models={models[2]}"], "needs --dataset"), (["--models=/no/such/run"],
                                                                         "no such model"),
                        ([f"--models={models[0]}", "--verify=milp"], "verification method")):
    out = run(*args, f"--output_dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr

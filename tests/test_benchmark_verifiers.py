"""`python -m benchmarks.verifiers`: the verifiers' table on an IBP-trained digits MLP."""

import pathlib
import subprocess
import sys

import digits_runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_table_gives_every_method_and_no_verified_example_is_broken(tmp_path):
  run = digits_runs.train(tmp_path / "ibp", "ibp")
  out = subprocess.run([
      sys.executable, "-m", "benchmarks.verifiers", f"--workdirs={run}", "--eps=0.05",
      "--num_examples=6", "--batch_size=3", "--methods=ibp,crown,sdp_fo"
  ],
                       cwd=REPO,
                       capture_output=True,
                       text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()[-4:]}
  assert set(rows) == {"clean", "ibp", "crown", "sdp_fo"}, out.stdout
  verified = {m: float(rows[m][2]) for m in ("ibp", "crown", "sdp_fo")}
  pgd = float(rows["ibp"][3])
  assert verified["sdp_fo"] >= verified["crown"]  # at least CROWN's bound on every margin
  for m in verified:
    assert verified[m] <= pgd and rows[m][-1] == "0", out.stdout  # never beats the attack


def test_usage_errors_exit_with_status_2():
  run = lambda *a: subprocess.run(
      [sys.executable, "-m", "benchmarks.verifiers", *a], cwd=REPO, capture_output=True, text=True)
  assert run("--help").returncode == 0
  assert run().returncode == 2
  bad = run("--workdirs=/x", "--methods=milp")
  assert bad.returncode == 2 and "milp" in bad.stderr

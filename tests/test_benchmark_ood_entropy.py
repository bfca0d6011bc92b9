"""`python -m benchmarks.ood_entropy`: certified predictive entropy on OOD inputs (digits)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "benchmarks.ood_entropy", *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=900)


def test_no_attacked_expectation_exceeds_its_bound():
  out = _run("--dataset=digits", "--ood=noise", "--num_examples=3", "--train_steps=300",
             "--hidden=16", "--steps=60", "--eps=0.005", "--mc_samples=5000")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "test accuracy" in lines[0] and float(lines[0].split("accuracy ")[1].split()[0]) > 80
  rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
  assert len(rows) == 3
  for _, centre, attacked, bound, entropy, _ in rows:
    assert float(centre) <= float(attacked) + 0.02  # the ascent does not lose ground
    assert float(attacked) <= float(bound) + 0.01 and 0 <= float(entropy)
  assert lines[-1].endswith("violations 0"), lines[-1]


def test_usage_errors_exit_with_status_2():
  assert _run("--help").returncode == 0
  bad = _run("--dataset=digits", "--ood=mnist", "--data_dir=/nonexistent")
  assert bad.returncode == 2 and bad.stderr.strip(), bad.stderr[-500:]

"""`python -m benchmarks.accelerator --small` runs on CPU and prints every program's row."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = ("forward+backward", "PGD-2 fast on", "PGD-2 fast off", "PGD-4 fast on",
            "PGD-4 fast off", "IBP", "CROWN-IBP", "IBP train step", "PGD-2 AT step")


def _script(*args):
  return subprocess.run([sys.executable, "-m", "benchmarks.accelerator", *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=600)


def test_the_small_benchmark_prints_a_row_per_model_and_program():
  out = _script("--small")
  assert out.returncode == 0, out.stderr[-3000:]
  table = out.stdout.split("of peak")[-1].strip().splitlines()
  assert len(table) >= 2 * len(PROGRAMS)
  for model in ("mlp", "cnn_small"):
    rows = {line[17:57].strip(): line.split()[-3:] for line in table if line.startswith(model)}
    assert set(PROGRAMS) <= set(rows), rows
    for row in PROGRAMS:
      images_per_second, gflops, of_peak = rows[row]
      assert float(images_per_second) > 0 and float(gflops) > 0 and of_peak.endswith("%")
  assert "matrix-product peak" in out.stdout and "cpu" in out.stdout


def test_an_unknown_model_is_a_usage_error():
  out = _script("--models=mlp,alexnet")
  assert out.returncode == 2 and "alexnet" in out.stderr and "Traceback" not in out.stderr

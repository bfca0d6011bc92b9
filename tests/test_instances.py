"""Deciding VNN-COMP-style instances: ONNX networks with VNNLIB properties.

The networks are built here with ``onnx.helper``; every instance has a known
answer: a bound proves it, a counterexample exists by construction, or the
unsafe region is a pocket that only a search of the input box finds.
"""

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the ONNX instances need the onnx extra")

from verify import instances  # pylint: disable=g-import-not-at-top
from verify import vnnlib  # pylint: disable=g-import-not-at-top
from vnncomp_instances import POCKETS  # pylint: disable=g-import-not-at-top
from vnncomp_instances import RELU_HALF
from vnncomp_instances import box_text
from vnncomp_instances import constructed
from vnncomp_instances import mlp_onnx
from vnncomp_instances import pocket_onnx
from vnncomp_instances import random_layers
from vnncomp_instances import ort_session
from vnncomp_instances import suite
from vnncomp_instances import write_instance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(tmp_path, name, model, text, timeout=60.0, **options):
  return instances.run_instance(*write_instance(tmp_path, name, model, text), timeout, **options)[0]


def check_counterexample(decision, model, text):
  """The reported point is inside a box and onnxruntime maps it into that box's unsafe set."""
  y = ort_session(model)(decision.x)
  spec = vnnlib.parse(text)
  assert any(p.contains(decision.x) and p.violated(y) for p in spec.properties)
  np.testing.assert_allclose(decision.y, y, rtol=1e-5, atol=1e-6)


def test_relu_of_half_x_never_reaches_minus_one(tmp_path):
  text = box_text([-1.0], [1.0], 1) + "(assert (<= Y_0 -1))\n"
  decision = run(tmp_path, "relu_half", RELU_HALF, text)
  assert (decision.result, decision.stage) == ("unsat", "ibp")
  assert decision.text() == "unsat\n"


def test_a_known_counterexample_is_found_and_confirmed(tmp_path):
  # y = relu(0.5 x) >= 0.4 only for x >= 0.8.
  text = box_text([-1.0], [1.0], 1) + "(assert (>= Y_0 0.4))\n"
  decision = run(tmp_path, "relu_half_sat", RELU_HALF, text)
  assert decision.result == "sat" and decision.stage == "falsify"
  assert 0.8 <= decision.x[0] <= 1.0
  check_counterexample(decision, RELU_HALF, text)
  assert decision.text().splitlines()[0] == "sat"
  assert decision.text().splitlines()[1].startswith("((X_0 ")


def test_counterexamples_at_corners_not_representable_in_float32_stay_inside(tmp_path):
  # y = relu(0.5 x) >= 0.34 for x in [0.68, 0.7]; float32(0.7) > 0.7 lies outside the box.
  text = box_text([-0.3], [0.7], 1) + "(assert (>= Y_0 0.34))\n"
  decision = run(tmp_path, "corner", RELU_HALF, text)
  assert decision.result == "sat" and 0.68 <= float(decision.x[0]) <= 0.7
  check_counterexample(decision, RELU_HALF, text)


def test_a_pocket_that_gradients_miss_is_found_by_branch_and_bound(tmp_path):
  model = pocket_onnx(POCKETS, width=0.02, height=1.5)  # min y = -0.5
  text = box_text([-1, -1], [1, 1], 1) + "(assert (<= Y_0 -0.25))\n"  # |x - c|_1 <= 0.0033
  decision = run(tmp_path, "pocket_sat", model, text, falsify_restarts=1)
  assert (decision.result, decision.stage) == ("sat", "bab")
  assert min(np.abs(decision.x - c).sum() for c in np.array(POCKETS)) <= 0.02 / 1.5 * 0.25 + 1e-6
  check_counterexample(decision, model, text)


def test_pockets_too_shallow_are_proven_safe_by_branch_and_bound(tmp_path):
  model = pocket_onnx(POCKETS, width=0.02, height=0.75)  # min y = 0.25; IBP sees -0.5
  text = box_text([-1, -1], [1, 1], 1) + "(assert (<= Y_0 0))\n"
  decision = run(tmp_path, "pocket_unsat", model, text)
  assert (decision.result, decision.stage) == ("unsat", "bab")


@pytest.mark.parametrize("height, threshold, result", [(1.5, -0.25, "sat"), (0.75, 0.0, "unsat")])
def test_pockets_are_decided_exactly_by_mixed_integer_programs(tmp_path, height, threshold, result):
  model = pocket_onnx(POCKETS, width=0.02, height=height)  # min y = 1 - height
  text = box_text([-1, -1], [1, 1], 1) + f"(assert (<= Y_0 {threshold}))\n"
  decision = run(tmp_path, "pocket", model, text, falsify_restarts=1, complete="milp")
  assert (decision.result, decision.stage) == (result, "milp")
  if result == "sat":
    check_counterexample(decision, model, text)


def test_an_unknown_complete_stage_is_named(tmp_path):
  text = box_text([-1.0], [1.0], 1) + "(assert (<= Y_0 -1))\n"
  with pytest.raises(instances.InputError, match="complete must be one of"):
    run(tmp_path, "relu_half", RELU_HALF, text, complete="lp")


def test_a_property_whose_input_box_is_empty_is_an_error_not_unsat(tmp_path):
  # An inverted box is a mistake in the property, never a proof of safety.
  text = box_text([-1.0], [1.0], 1) + "(assert (>= X_0 2))\n(assert (<= Y_0 -1))\n"
  with pytest.raises(vnnlib.VnnlibError, match="input box is empty: X_0"):
    vnnlib.parse(text)
  with pytest.raises(vnnlib.VnnlibError, match="input box is empty"):
    run(tmp_path, "empty", RELU_HALF, text)


def test_a_timeout_of_no_time_is_refused_and_a_tiny_one_times_out(tmp_path):
  text = box_text([-1.0], [1.0], 1) + "(assert (<= Y_0 -1))\n"
  for timeout in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(instances.InputError, match="timeout must be a number of seconds > 0"):
      run(tmp_path, "relu_half", RELU_HALF, text, timeout=timeout)
  assert run(tmp_path, "relu_half", RELU_HALF, text, timeout=1e-9).result == "timeout"


@pytest.mark.parametrize("seed", range(6))
def test_never_unsat_when_a_counterexample_exists(tmp_path, seed):
  """Random networks with an unsafe threshold met at a random point of the box, by construction."""
  model, text = constructed(seed)
  decision = run(tmp_path, f"constructed{seed}", model, text, timeout=30.0)
  assert decision.result in ("sat", "timeout", "unknown"), decision
  if decision.result == "sat":
    check_counterexample(decision, model, text)


ROBUSTNESS = [entry for entry in suite() if entry[0].startswith("robust")]


@pytest.mark.parametrize("name, model, text", [e[:3] for e in ROBUSTNESS],
                         ids=[e[0] for e in ROBUSTNESS])
def test_robustness_answers_agree_with_sampling(tmp_path, name, model, text):
  """Counterexamples are confirmed; unsat instances see none among many random inputs."""
  decision = run(tmp_path, name, model, text, timeout=30.0)
  assert decision.result in ("sat", "unsat"), decision
  if decision.result == "sat":
    check_counterexample(decision, model, text)
  else:
    (prop,) = vnnlib.parse(text).properties
    samples = np.random.default_rng(0).uniform(prop.lower, prop.upper, (2000, prop.lower.size))
    ort = ort_session(model)
    outputs = [ort(x) for x in samples]
    assert not any(prop.violated(y) for y in outputs)


@pytest.mark.parametrize("name, model, text", [e[:3] for e in ROBUSTNESS if "cnn" in e[0]],
                         ids=[e[0] for e in ROBUSTNESS if "cnn" in e[0]])
def test_relu_splits_decide_convolutional_instances(tmp_path, name, model, text):
  decision = run(tmp_path, name, model, text, timeout=30.0, complete="relu")
  assert decision.result in ("sat", "unsat"), decision
  if decision.result == "sat":
    check_counterexample(decision, model, text)
  auto = run(tmp_path, name, model, text, timeout=30.0)
  assert auto.result == decision.result
  if auto.stage in ("bab", "relu_bab", "milp"):
    assert auto.complete in ("milp", "relu") and auto.reason  # 64 inputs: never input splits


def _cancelling_net(delta):
  """``y_0 - y_1 = delta`` exactly, both outputs sums of four ReLUs of order 1e4: float32's
  rounding allowance (some 1e-2) hides the margin, float64's (some 1e-11) does not."""
  w1, b1 = 1e4 * np.ones((4, 2)), np.zeros(4)
  return mlp_onnx([(w1, b1), (np.ones((2, 4)), np.array([delta, 0.0]))])


def test_float64_bounds_prove_what_float32_rounding_hides(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  model = _cancelling_net(1e-2)
  text = box_text([0.5, 0.5], [1.0, 1.0], 2) + "(assert (<= Y_0 Y_1))\n"
  # The float32 evaluation never reaches the unsafe set either, but no float32 proof exists:
  # the margin is below the allowance.
  assert run(tmp_path, "cancel", model, text, timeout=5.0).result != "unsat"
  with pytest.raises(instances.InputError, match="JAX_ENABLE_X64"):
    run(tmp_path, "cancel", model, text, precision="float64")
  with jax.enable_x64(True):
    decision = run(tmp_path, "cancel", model, text, precision="float64")
    assert decision.result == "unsat" and decision.stage in instances.BOUND_METHODS, decision
    sat_text = box_text([0.5, 0.5], [1.0, 1.0], 2) + "(assert (>= Y_0 Y_1))\n"
    decision = run(tmp_path, "cancel_sat", model, sat_text, precision="float64")
    assert decision.result == "sat" and decision.y.dtype == np.float64
    check_counterexample(decision, model, sat_text)


def test_input_splits_in_float64_decide_pockets(tmp_path):
  # ReLU splits and the MILP in float64: tests/test_relu_bab.py.
  import jax  # pylint: disable=g-import-not-at-top
  model = pocket_onnx(POCKETS, width=0.02, height=0.75)  # min y = 0.25; IBP sees -0.5
  text = box_text([-1, -1], [1, 1], 1) + "(assert (<= Y_0 0))\n"
  with jax.enable_x64(True):
    decision = run(tmp_path, "pocket_unsat", model, text, complete="input", precision="float64")
  assert decision.result == "unsat" and decision.complete == "input", decision


def test_the_complete_search_follows_inputs_and_unstable_relus():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def mlp(sizes):
    layers = [(jnp.asarray(w.T, jnp.float32), jnp.asarray(b, jnp.float32))
              for w, b in random_layers(rng, sizes)]

    def fn(x):
      for i, (w, b) in enumerate(layers):
        x = x @ w + b
        x = jnp.maximum(x, 0.0) if i + 1 < len(layers) else x
      return x

    return fn

  box = lambda d, r: (np.full(d, 0.5 - r, np.float32), np.full(d, 0.5 + r, np.float32))
  assert instances.choose_complete(mlp((2, 64, 64, 1)), 2, *box(2, 0.5))[0] == "input"
  choice, reason = instances.choose_complete(mlp((40, 8, 3)), 40, *box(40, 0.5))
  assert choice == "milp" and "unstable ReLUs" in reason
  choice, reason = instances.choose_complete(mlp((40, 64, 64, 3)), 40, *box(40, 0.5))
  assert choice == "relu" and "40 input dimensions" in reason
  assert instances.choose_complete(lambda x: x @ jnp.ones((40, 3)), 40, *box(40, 0.5))[0] == "input"


def _script(*args):
  return subprocess.run([sys.executable, "-m", "verify.vnncomp", *args],
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False)


def test_benchmark_runner_writes_the_results_csv(tmp_path):
  names = []
  for name, text in [("unsat", "(assert (<= Y_0 -1))"), ("sat", "(assert (>= Y_0 0.4))")]:
    onnx_path, vnnlib_path = write_instance(tmp_path, name, RELU_HALF,
                                            box_text([-1.0], [1.0], 1) + text)
    names.append(f"{pathlib.Path(onnx_path).name},{pathlib.Path(vnnlib_path).name},30\n")
  names.append("missing.onnx,missing.vnnlib,30\n")  # a broken instance does not stop the rest
  (tmp_path / "instances.csv").write_text("".join(names))
  out = tmp_path / "results.csv"
  proc = _script(f"--instances={tmp_path / 'instances.csv'}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  rows = list(csv.reader(out.open()))
  assert [r[4] for r in rows] == ["unsat", "sat", "error"]
  assert all(len(r) == 8 and r[6] == "" for r in rows)  # decided before any complete search
  assert all(r[0] == tmp_path.name and float(r[3]) >= 0 and float(r[5]) >= 0 for r in rows)
  assert "sat 1" in proc.stdout and "unsat 1" in proc.stdout and "error 1" in proc.stdout
  assert "no such file" in proc.stderr


def test_single_instance_cli_writes_the_result_file(tmp_path):
  onnx_path, vnnlib_path = write_instance(tmp_path, "sat", RELU_HALF,
                                          box_text([-1.0], [1.0], 1) + "(assert (>= Y_0 0.4))")
  out = tmp_path / "result.txt"
  proc = _script(f"--onnx={onnx_path}", f"--vnnlib={vnnlib_path}", "--timeout=30", f"--out={out}",
                 "--precision=float64")  # the flag turns on JAX's 64-bit mode
  assert proc.returncode == 0, proc.stderr
  lines = out.read_text().splitlines()
  assert lines[0] == "sat" and lines[-1].startswith(" (Y_0 ") and lines[-1].endswith("))")


def test_mismatched_property_and_network_are_reported(tmp_path):
  text = box_text([-1.0, -1.0], [1.0, 1.0], 1) + "(assert (<= Y_0 -1))\n"
  with pytest.raises(vnnlib.VnnlibError, match="2|1"):
    run(tmp_path, "mismatch", RELU_HALF, text)


def test_instances_csv_errors_name_the_line(tmp_path):
  (tmp_path / "instances.csv").write_text("a.onnx,b.vnnlib,60\nc.onnx,d.vnnlib\n")
  with pytest.raises(instances.InputError, match=r"instances.csv:2"):
    instances.read_instances(tmp_path / "instances.csv")

"""Specification of `verify.fuzz`: bounded fuzzing runs find nothing, and the fuzzer can fail.

The runs check 2,000 (program, method) pairs in all, split by block family so
that workers share them; programs come in groups of 32 sharing a structure (one
compilation per group and method). Ordinary boxes in each family's run;
degenerate and near-tie boxes in a run of their own, and 1-ulp boxes in another.
A point's float32 value counts as outside its bounds when it is farther than the
rounding allowance (`verify.rounding_allowance`) that "verified" subtracts.
"""

import collections
import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bound_testing
import verify
from robustlib.checks import InputError
from verify import fuzz

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = 32
ORDINARY = ("ordinary",)


def _findings_message(report: fuzz.Report) -> str:
  """The run's summary, then the worst finding of each (method, kind, box kind)."""
  worst: dict = {}
  counts = collections.Counter()
  for f in report.findings:
    key = (f.method, f.kind, f.box_kind)
    counts[key] += 1
    if key not in worst or not f.violation <= worst[key].violation:
      worst[key] = f
  outside = sum(f.real_violation > 0 for f in report.findings)
  inside = sum(f.real_violation <= 0 for f in report.findings)
  lines = [
      report.summary(), f"value outside the bound in float64 too: {outside}; inside in float64 "
      f"(the float32 evaluation's rounding): {inside}"
  ]
  lines += [f"{counts[k]} x {k}: {worst[k]}" for k in sorted(worst)]
  return "\n".join(lines)


# name: (families, seed, program structures, box kinds, minimum pairs). The pairs make 2,000.
RUNS = {
    "dense": (("dense",), 0, 4, ORDINARY, 450),
    "smooth": (("smooth",), 1, 3, ORDINARY, 300),
    "conv": (("conv",), 2, 3, ORDINARY, 300),
    "dag": (("dag",), 3, 3, ORDINARY, 300),
    "loop": (("loop",), 4, 2, ORDINARY, 100),
    "cast": (("cast",), 5, 2, ORDINARY, 200),
    "mixed": (fuzz.FAMILIES, 6, 2, ORDINARY, 100),
    # Boxes of width 0 and of a hair's width around points on a grid (ties).
    "tiny_boxes": (("dense", "conv"), 8, 2, ("degenerate", "near_tie"), 250),
}


def test_the_runs_check_two_thousand_pairs():
  assert sum(r[-1] for r in RUNS.values()) >= 2000


@pytest.mark.parametrize("name", list(RUNS))
def test_random_programs_are_bounded_soundly(name):
  families, seed, structures, box_kinds, min_pairs = RUNS[name]
  programs = structures * VARIANTS
  report = fuzz.run(programs=programs,
                    seed=seed,
                    families=families,
                    variants=VARIANTS,
                    boxes=4,
                    box_kinds=box_kinds)
  assert report.programs == programs
  assert not report.findings, _findings_message(report)
  assert report.pairs >= min_pairs, report.summary()


def test_one_ulp_boxes_are_bounded_soundly():
  # Seed 9 draws a structure whose rounding exceeds a fixed tolerance of 1e-6 (1 + |value|)
  # (one of seeds 7 to 12 does); within the rounding allowance it holds.
  report = fuzz.run(programs=VARIANTS,
                    seed=9,
                    families=("dense", "conv"),
                    variants=VARIANTS,
                    box_kinds=("ulp",))
  assert not report.findings, _findings_message(report)
  assert report.pairs >= 100


def test_a_degenerate_box_through_tanh_keeps_ibp_in_order():
  # Pad -> tanh -> flatten -> dense on a box of width 0: compiled at optimisation level 0, XLA
  # computed tanh of the same value twice, once per fusion, one ulp apart, and the dense
  # layer's centre-radius rule returned a lower bound 3.7e-9 above the upper one.
  families = ("dense", "smooth", "conv", "dag", "loop", "cast")
  assert fuzz.replay((47, 37, 2, 3), "degenerate", methods=("ibp",), families=families) == []


def test_nan_bounds_where_the_function_overflows_are_no_finding():
  # reduce_precision overflows to inf at the point of a degenerate box; the dense layer after
  # it has NaN IBP bounds there (inf - inf), which certify reads as "not verified". The values
  # the box gives are infinite too, so the fuzzer sees nothing to compare and reports nothing.
  families = ("dense", "smooth", "conv", "dag", "loop", "cast")
  assert fuzz.replay((48, 63, 2, 3), "degenerate", methods=("ibp",), families=families) == []


# ---------------------------------------------------------------------------- the fuzzer can fail


def _shrunk_ibp(fn, box, spec):
  """IBP bounds moved 10% of their width inwards: unsound wherever they are tight."""
  b = verify.ibp(bound_testing.spec_outputs(fn, spec), box)
  w = 0.1 * (b.upper - b.lower)
  return verify.Interval(b.lower + w, b.upper - w)


def _dense_program(seed=0):
  for i in range(100):
    p = fuzz.random_program(np.random.default_rng([seed, i]), families=("dense",))
    if p.relu_network:
      return p
  raise AssertionError("no ReLU network drawn")


def _centre_value(fn, box, spec):
  """The value at the box's centre as both bounds: above the minimum wherever the box is wide."""
  v = bound_testing.spec_outputs(fn, spec)(box.center)
  return verify.Interval(v, v)


def test_an_unsound_bound_is_found():
  program = _dense_program()
  centre = np.random.default_rng(0).normal(size=program.input_shape).astype(np.float32)
  box = fuzz.Box("ordinary", centre - 0.5, centre + 0.5)
  tally = fuzz.Tally()
  findings = fuzz.check(program,
                        box, [("shrunk_ibp", _shrunk_ibp), "ibp", ("centre", _centre_value)],
                        np.random.default_rng(1),
                        tally=tally)
  assert tally.checks == 3 and tally.point_checks > 0 and tally.milp == 3 * box.lower.shape[0]
  assert {f.method for f in findings} == {"shrunk_ibp", "centre"}, [str(f) for f in findings]
  shrunk = {f.kind for f in findings if f.method == "shrunk_ibp"}
  assert shrunk & {"lower", "upper"}
  assert all(f.violation > 0 and f.box_kind == "ordinary" for f in findings)
  # A lower bound above the exact minimum (MILP) is a finding of its own.
  assert "milp" in {f.kind for f in findings if f.method == "centre"}, [str(f) for f in findings]


def test_a_bound_that_ignores_tolerance_swaps_is_found():
  program = _dense_program(1)
  box = fuzz.random_box(program, np.random.default_rng(2), "ordinary")
  sound = fuzz.check(program, box, ["ibp"], np.random.default_rng(3), milp=False)
  assert not sound
  # With a negative allowance every tight bound fails: the tolerance is the one swapped in.
  strict = fuzz.check(program,
                      box, ["ibp"],
                      np.random.default_rng(3),
                      milp=False,
                      tolerance_fn=lambda bounds, values, allowance: -np.ones(values.shape[1:]))
  assert strict and all(f.method == "ibp" for f in strict)


def test_nan_bounds_and_crossed_bounds_are_found():
  program = _dense_program(2)
  box = fuzz.random_box(program, np.random.default_rng(0), "ordinary")

  def nan_bound(fn, interval, spec):
    b = verify.ibp(bound_testing.spec_outputs(fn, spec), interval)
    return verify.Interval(b.lower * jnp.nan, b.upper)

  def crossed(fn, interval, spec):
    b = verify.ibp(bound_testing.spec_outputs(fn, spec), interval)
    return verify.Interval(b.upper + 1.0, b.lower - 1.0)

  findings = fuzz.check(program,
                        box, [("nan", nan_bound), ("crossed", crossed)],
                        np.random.default_rng(0),
                        milp=False)
  kinds = collections.defaultdict(set)
  for f in findings:
    kinds[f.method].add(f.kind)
  assert kinds["nan"] == {"nan"}
  assert {"order", "lower", "upper"} <= kinds["crossed"]


def test_exceptions_are_findings_and_refusals_are_counted():

  def broken(fn, interval, spec):
    raise ZeroDivisionError("boom")

  def refusing(fn, interval, spec):
    raise verify.UnsupportedPrimitiveError("no rule")

  program = _dense_program()
  box = fuzz.random_box(program, np.random.default_rng(0), "degenerate")
  tally = fuzz.Tally()
  findings = fuzz.check(program,
                        box, [("broken", broken), ("refusing", refusing)],
                        np.random.default_rng(0),
                        tally=tally)
  by_method = {f.method: f for f in findings}
  assert by_method["broken"].kind == "exception"
  assert "ZeroDivisionError: boom" in by_method["broken"].detail
  assert by_method["refusing"].kind == "unsupported"  # a custom bound is expected to work
  assert tally.unsupported == {"refusing": 1} and tally.checks == 0


def test_blocks_marked_unsupported_are_skips():
  # A while loop: marked as supported by no method. A refusal is counted, not a finding.
  for i in range(500):
    skeleton = fuzz.random_skeleton(np.random.default_rng([5, i]), families=("loop",))
    if any(op.kind == "loop" and op.attr("loop") == "While" for op in skeleton.ops):
      program = fuzz.instantiate(skeleton, np.random.default_rng(0))
      break
  else:
    raise AssertionError("no while loop drawn")
  assert program.supports == frozenset()
  box = fuzz.random_box(program, np.random.default_rng(0), "ordinary")
  tally = fuzz.Tally()
  findings = fuzz.check(program, box, ["ibp", "crown"], np.random.default_rng(0), tally=tally)
  assert not [f for f in findings if f.kind in ("unsupported", "exception")]
  assert tally.unsupported["ibp"] + tally.unsupported["crown"] >= 1
  for method in ("ibp", "crown"):  # refused, or bounded and checked
    assert (method in tally.checked) != (tally.unsupported[method] == 1)


# ---------------------------------------------------------------------------- generator and boxes


def test_the_generator_is_deterministic():
  a = fuzz.random_program(np.random.default_rng(11))
  b = fuzz.random_program(np.random.default_rng(11))
  assert a.description == b.description and a.skeleton == b.skeleton
  for pa, pb in zip(a.params, b.params):
    assert pa.keys() == pb.keys()
    for k in pa:
      np.testing.assert_array_equal(pa[k], pb[k])
  x = np.random.default_rng(0).normal(size=a.input_shape).astype(np.float32)
  np.testing.assert_array_equal(a.fn(x), b.fn(x))
  assert fuzz.program_at((3, 4, 5)).description == fuzz.program_at((3, 4, 5)).description
  descriptions = {fuzz.random_program(np.random.default_rng(s)).description for s in range(8)}
  assert len(descriptions) == 8


def test_programs_have_the_documented_shapes():
  for s in range(30):
    p = fuzz.random_program(np.random.default_rng(s))
    n = p.input_shape[0]
    assert 1 <= n <= 3 and 1 <= np.prod(p.input_shape[1:]) <= 256
    out = jax.eval_shape(p.fn, jax.ShapeDtypeStruct(p.input_shape, jnp.float32))
    assert out.shape == (n, p.outputs) and 2 <= p.outputs <= 5
    assert p.supports <= set(fuzz.METHODS)
    if p.relu_network:
      assert p.input_shape[1:][0] <= 8
    # Any batch size: the points are evaluated P * N at a time.
    seven = jax.ShapeDtypeStruct((7,) + p.input_shape[1:], jnp.float32)
    assert jax.eval_shape(p.fn, seven).shape == (7, p.outputs)


def test_boxes_of_every_kind():
  program = fuzz.random_program(np.random.default_rng(3))
  rng = np.random.default_rng(0)
  for kind in fuzz.BOX_KINDS:
    box = fuzz.random_box(program, rng, kind)
    assert box.kind == kind and box.lower.dtype == box.upper.dtype == np.float32
    assert box.lower.shape == program.input_shape and np.all(box.lower <= box.upper)
    width = box.upper - box.lower
    if kind == "degenerate":
      assert np.all(width == 0)
    elif kind == "ulp":
      np.testing.assert_array_equal(box.upper, np.nextafter(box.lower, np.float32(np.inf)))
    elif kind == "near_tie":
      assert np.all(width < 3e-4) and np.all(width > 0)
  with pytest.raises(InputError):
    fuzz.random_box(program, rng, "round")


def test_run_counts_and_reproduces_its_findings():
  report = fuzz.run(programs=2, seed=9, families=("dense",), methods=("ibp",), variants=2, boxes=2)
  assert (report.programs, report.skeletons, report.checks) == (2, 1, 4)
  assert report.pairs == 2 and report.point_checks > 0
  assert "2 programs (1 structures), 2 (program, method) pairs" in report.summary()
  finding = fuzz.Finding("p", "crown", "ulp", "lower", 1.0, "d", (9, 0, 1, 1), ("dense",))
  assert "fuzz.replay((9, 0, 1, 1), 'ulp', methods=('crown',), families=('dense',))" in str(finding)
  # replay rebuilds the same program and box as the run.
  assert fuzz.replay((9, 0, 1, 1), "ordinary", methods=("ibp",), families=("dense",)) == []


# ---------------------------------------------------------------------------- the script


def _script(*args, code=None):
  command = [sys.executable, "-m", "verify.fuzz", *args
            ] if code is None else [sys.executable, "-c", code, *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def test_script_help_and_usage_errors():
  out = _script("--help")
  assert out.returncode == 0 and "--minutes" in out.stdout
  out = _script("--no_such_flag")
  assert out.returncode == 2 and "no_such_flag" in out.stderr
  # What the script reports as usage errors (status 2).
  with pytest.raises(InputError, match="families"):
    fuzz.run(programs=1, families=("nope",))
  with pytest.raises(InputError, match="methods"):
    fuzz.run(programs=1, methods=("milp",))
  with pytest.raises(InputError, match="seconds or programs"):
    fuzz.run()


def test_script_clean_run_and_status_of_findings():
  out = _script("--programs=2", "--variants=2", "--boxes=1", "--box_kinds=ordinary",
                "--families=dense", "--methods=ibp", "--seed=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fuzz: 2 programs" in out.stdout and "0 findings" in out.stdout
  # A run with a finding exits with status 1 and prints it.
  code = ("from verify import fuzz\n"
          "f = fuzz.Finding('prog', 'crown', 'ulp', 'lower', 0.5, 'detail', (0, 1, 2, 3))\n"
          "fuzz.run = lambda **kw: fuzz.Report(programs=1, findings=[f])\n"
          "fuzz.cli()\n")
  out = _script("--programs=1", code=code)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "FINDING crown lower on a ulp box: detail" in out.stdout
  assert "1 findings" in out.stdout


def test_finding_is_a_frozen_record():
  f = fuzz.Finding("p", "ibp", "ordinary", "upper", 0.1, "d")
  with pytest.raises(dataclasses.FrozenInstanceError):
    f.method = "crown"
  assert "no seed" in f.reproduction

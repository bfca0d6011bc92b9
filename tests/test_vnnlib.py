"""Specification of `verify.vnnlib`: VNNLIB files as input boxes and unsafe output polytopes.

A file states the unsafe condition; `parse` returns one `Property` per distinct
input box, each with the union of polytopes ``C @ y <= d`` that make an output
unsafe over that box.
"""

import gzip
import textwrap
import time

import numpy as np
import pytest

from robustlib.checks import InputError
from verify import vnnlib


def _decls(num_inputs, num_outputs):
  return "".join(f"(declare-const X_{i} Real)\n" for i in range(num_inputs)) + "".join(
      f"(declare-const Y_{j} Real)\n" for j in range(num_outputs))


def _box(lower, upper):
  return "".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n"
                 for i, (lo, hi) in enumerate(zip(lower, upper)))


def _only_polytope(spec):
  (prop,) = spec.properties
  (poly,) = prop.unsafe
  return poly


def _row(entries, n):
  row = np.zeros(n)
  for j, c in entries.items():
    row[j] = c
  return row


# The trivial property: X_0 in [-1, 1], unsafe when Y_0 <= -1.
TRIVIAL = """
(declare-const X_0 Real)
(declare-const Y_0 Real)
(assert (>= X_0 -1))
(assert (<= X_0 1))
(assert (<= Y_0 -1))
"""


def test_trivial_property_is_one_box_with_one_row():
  spec = vnnlib.parse(TRIVIAL)
  assert (spec.num_inputs, spec.num_outputs) == (1, 1)
  (prop,) = spec.properties
  np.testing.assert_array_equal(prop.lower, [-1.0])
  np.testing.assert_array_equal(prop.upper, [1.0])
  (poly,) = prop.unsafe
  np.testing.assert_array_equal(poly.C, [[1.0]])
  np.testing.assert_array_equal(poly.d, [-1.0])
  assert poly.C.dtype == poly.d.dtype == prop.lower.dtype == np.float64
  with pytest.raises(ValueError, match="read-only"):
    prop.lower[0] = 0.0


def test_acas_xu_style_conjoined_asserts_form_one_polytope():
  # Property 3 style: unsafe when Y_0 is the minimal score.
  lower = [-0.3035, -0.0095, 0.4934, 0.3, 0.3]
  upper = [-0.2986, 0.0095, 0.5, 0.5, 0.5]
  text = _decls(5, 5) + _box(lower, upper) + "".join(
      f"(assert (<= Y_0 Y_{j}))\n" for j in range(1, 5))
  spec = vnnlib.parse(text, num_inputs=5, num_outputs=5)
  (prop,) = spec.properties
  np.testing.assert_array_equal(prop.lower, lower)
  np.testing.assert_array_equal(prop.upper, upper)
  (poly,) = prop.unsafe
  expected = np.array([_row({0: 1.0, j: -1.0}, 5) for j in range(1, 5)])
  np.testing.assert_array_equal(poly.C, expected)
  np.testing.assert_array_equal(poly.d, np.zeros(4))
  assert prop.violated(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))  # Y_0 minimal
  assert not prop.violated(np.array([1.0, 0.0, 2.0, 3.0, 4.0]))


def test_robustness_file_gives_one_row_polytope_per_other_class():
  label, num_classes = 3, 10
  x0 = np.linspace(0.1, 0.9, 4)
  eps = 0.05
  disjuncts = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label)
  text = _decls(4, num_classes) + _box(x0 - eps, x0 + eps) + f"(assert (or {disjuncts}))\n"
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_allclose(prop.lower, x0 - eps)
  np.testing.assert_allclose(prop.upper, x0 + eps)
  others = [j for j in range(num_classes) if j != label]
  assert len(prop.unsafe) == len(others)
  for j, poly in zip(others, prop.unsafe):
    # Y_j >= Y_label  <=>  Y_label - Y_j <= 0.
    np.testing.assert_array_equal(poly.C, [_row({label: 1.0, j: -1.0}, num_classes)])
    np.testing.assert_array_equal(poly.d, [0.0])
  logits = np.zeros(num_classes)
  logits[label] = 1.0
  assert not prop.violated(logits)  # classified as the label: safe
  logits[7] = 2.0
  assert prop.violated(logits)  # another class wins
  logits[7] = 1.0
  assert prop.violated(logits)  # a tie is unsafe: `>=` is not strict


MULTI_BOX = """
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (or
  (and (>= X_0 0) (<= X_0 0.5) (>= X_1 -1) (<= X_1 1) (<= Y_0 Y_1))
  (and (>= X_0 0.5) (<= X_0 1) (>= X_1 -1) (<= X_1 1) (>= Y_0 3))
  (and (<= X_1 1) (>= X_1 -1) (<= X_0 0.5) (>= X_0 0) (>= Y_1 2))
))
"""


def test_multi_box_file_groups_disjuncts_by_box_in_order_of_appearance():
  spec = vnnlib.parse(MULTI_BOX)
  assert len(spec.properties) == 2
  first, second = spec.properties
  np.testing.assert_array_equal(first.lower, [0.0, -1.0])
  np.testing.assert_array_equal(first.upper, [0.5, 1.0])
  np.testing.assert_array_equal(second.lower, [0.5, -1.0])
  np.testing.assert_array_equal(second.upper, [1.0, 1.0])
  # The first and third disjuncts share a box (written in another order).
  assert len(first.unsafe) == 2
  np.testing.assert_array_equal(first.unsafe[0].C, [[1.0, -1.0]])
  np.testing.assert_array_equal(first.unsafe[0].d, [0.0])
  np.testing.assert_array_equal(first.unsafe[1].C, [[0.0, -1.0]])
  np.testing.assert_array_equal(first.unsafe[1].d, [-2.0])
  (poly,) = second.unsafe
  np.testing.assert_array_equal(poly.C, [[-1.0, 0.0]])
  np.testing.assert_array_equal(poly.d, [-3.0])


def test_box_asserts_outside_an_or_apply_to_every_disjunct():
  text = _decls(1, 2) + _box([0], [1]) + "(assert (or (<= Y_0 0) (and (<= Y_1 0) (<= Y_0 5))))"
  (prop,) = vnnlib.parse(text).properties
  assert [p.C.shape for p in prop.unsafe] == [(1, 2), (2, 2)]
  np.testing.assert_array_equal(prop.unsafe[1].C, [[0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_array_equal(prop.unsafe[1].d, [0.0, 5.0])


def test_conjoined_ors_multiply_out():
  text = _decls(1, 2) + _box([0], [1]) + ("(assert (or (<= Y_0 1) (<= Y_0 2)))\n"
                                          "(assert (or (<= Y_1 3) (<= Y_1 4)))\n")
  (prop,) = vnnlib.parse(text).properties
  assert [tuple(p.d) for p in prop.unsafe] == [(1.0, 3.0), (1.0, 4.0), (2.0, 3.0), (2.0, 4.0)]


def test_linear_expressions_with_coefficients_and_constants_on_both_sides():
  text = _decls(2, 3) + textwrap.dedent("""
      (assert (<= (* 2 X_0) 1))             ; X_0 <= 0.5
      (assert (<= (* -4 X_0) 2))            ; X_0 >= -0.5
      (assert (>= 1 X_1))                   ; X_1 <= 1
      (assert (<= (- X_1) (+ 3 (- 1))))     ; X_1 >= -2
      (assert (<= (+ (* 2 Y_0) (- Y_1) 3) (- (* Y_2 0.5) 1)))
      (assert (>= (- Y_0 Y_1 Y_2 4) (* 3 (- Y_2))))
      (assert (<= (+ Y_0 Y_1 (- Y_1)) (/ 3 2)))
      """)
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_array_equal(prop.lower, [-0.5, -2.0])
  np.testing.assert_array_equal(prop.upper, [0.5, 1.0])
  poly = prop.unsafe[0]
  # 2 Y_0 - Y_1 + 3 <= 0.5 Y_2 - 1      ->   2 Y_0 - Y_1 - 0.5 Y_2 <= -4
  # Y_0 - Y_1 - Y_2 - 4 >= -3 Y_2        ->  -Y_0 + Y_1 - 2 Y_2 <= -4
  # Y_0 + Y_1 - Y_1 <= 3/2                ->   Y_0 <= 1.5
  np.testing.assert_allclose(poly.C, [[2.0, -1.0, -0.5], [-1.0, 1.0, -2.0], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(poly.d, [-4.0, -4.0, 1.5])


def test_equality_is_two_inequalities():
  text = _decls(1, 2) + "(assert (= X_0 0.25))\n(assert (= Y_0 (+ Y_1 1)))"
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_array_equal(prop.lower, [0.25])
  np.testing.assert_array_equal(prop.upper, [0.25])
  poly = prop.unsafe[0]
  np.testing.assert_array_equal(poly.C, [[1.0, -1.0], [-1.0, 1.0]])
  np.testing.assert_array_equal(poly.d, [1.0, -1.0])
  assert prop.violated(np.array([3.0, 2.0]))
  assert not prop.violated(np.array([3.0, 2.5]))


def test_strict_inequalities_read_as_non_strict():
  strict = _decls(1, 2) + "(assert (> X_0 0)) (assert (< X_0 1)) (assert (< Y_0 Y_1))"
  loose = _decls(1, 2) + "(assert (>= X_0 0)) (assert (<= X_0 1)) (assert (<= Y_0 Y_1))"
  a, b = _only_polytope(vnnlib.parse(strict)), _only_polytope(vnnlib.parse(loose))
  np.testing.assert_array_equal(a.C, b.C)
  np.testing.assert_array_equal(a.d, b.d)
  (prop,) = vnnlib.parse(strict).properties
  assert prop.contains(np.array([0.0])) and prop.contains(np.array([1.0]))
  assert prop.violated(np.array([1.0, 1.0]))  # the boundary is counted as unsafe


def test_comments_whitespace_and_number_formats():
  text = textwrap.dedent("""\
      ; a header comment (with parentheses) that are ignored
      (declare-const X_0 Real) ; trailing comment
      (declare-const X_1 Real)(declare-const X_2 Real)
      (declare-const
          Y_0
        Real)
      (assert (>= X_0 1e-3))  (assert (<= X_0 1.5E+2))
      (assert (>= X_1 -2.5e-1)) (assert (<= X_1 .5))
      (assert (>= X_2 -3.)) (assert (<= X_2 +7))
      (assert
        ; a comment inside an assert
        (<= Y_0 -0.5))
      """)
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_array_equal(prop.lower, [1e-3, -0.25, -3.0])
  np.testing.assert_array_equal(prop.upper, [150.0, 0.5, 7.0])
  np.testing.assert_array_equal(prop.unsafe[0].d, [-0.5])


def test_standard_smtlib_commands_are_ignored():
  text = "(set-logic QF_LRA)\n" + TRIVIAL + "(check-sat)\n(get-model)\n(exit)\n"
  assert len(vnnlib.parse(text).properties) == 1


def test_constant_atoms_are_evaluated():
  text = _decls(1, 1) + _box([0], [1]) + ("(assert (<= 1 2))\n"
                                          "(assert (or (and (<= 2 1) (<= Y_0 0)) (>= Y_0 5)))")
  poly = _only_polytope(vnnlib.parse(text))
  np.testing.assert_array_equal(poly.C, [[-1.0]])
  np.testing.assert_array_equal(poly.d, [-5.0])


def test_disjunct_without_output_atoms_makes_every_output_unsafe():
  text = _decls(2, 3) + _box([0, 0], [1, 1])
  (prop,) = vnnlib.parse(text).properties
  (poly,) = prop.unsafe
  assert poly.C.shape == (0, 3) and poly.d.shape == (0,)
  assert prop.violated(np.array([1e9, -1e9, 0.0]))


def test_empty_boxes_and_false_asserts_drop_disjuncts():
  text = _decls(1, 1) + ("(assert (or (and (>= X_0 1) (<= X_0 0) (<= Y_0 0))"
                         "            (and (>= X_0 0) (<= X_0 1) (<= Y_0 1))))")
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_array_equal(prop.unsafe[0].d, [1.0])
  unsat = _decls(1, 1) + _box([0], [1]) + "(assert (< 1 0))"
  spec = vnnlib.parse(unsat)
  assert spec.properties == () and (spec.num_inputs, spec.num_outputs) == (1, 1)


def test_violated_and_contains_semantics():
  text = _decls(2, 2) + _box([0, -1], [1, 1]) + "(assert (or (<= Y_0 0) (>= Y_1 Y_0)))"
  (prop,) = vnnlib.parse(text).properties
  assert prop.contains(np.array([0.0, 1.0]))
  assert not prop.contains(np.array([1.001, 0.0]))
  assert prop.contains(np.array([1.001, 0.0]), tol=0.01)
  assert prop.contains(np.array([[0.5], [0.5]]))  # any shape of the right size
  assert prop.violated(np.array([-1.0, -5.0]))  # first polytope
  assert prop.violated(np.array([2.0, 3.0]))  # second polytope
  assert not prop.violated(np.array([2.0, 1.0]))
  assert not prop.violated(np.array([0.1, 0.0]))
  assert prop.violated(np.array([0.1, 0.0]), tol=0.2)
  with pytest.raises(InputError, match="y must have 2 entries"):
    prop.violated(np.zeros(3))
  with pytest.raises(InputError, match="x must have 2 entries"):
    prop.contains(np.zeros(5))


def test_declared_counts_must_match_the_network():
  assert vnnlib.parse(TRIVIAL, num_inputs=1, num_outputs=1).num_inputs == 1
  with pytest.raises(vnnlib.VnnlibError, match=r"declares 1 inputs but num_inputs=784"):
    vnnlib.parse(TRIVIAL, num_inputs=784)
  with pytest.raises(vnnlib.VnnlibError, match=r"declares 1 outputs but num_outputs=10"):
    vnnlib.parse(TRIVIAL, num_outputs=10)


def test_read_names_the_file_and_opens_gzip(tmp_path):
  path = tmp_path / "prop.vnnlib"
  path.write_text(TRIVIAL)
  assert len(vnnlib.read(path).properties) == 1
  gz = tmp_path / "prop.vnnlib.gz"
  gz.write_bytes(gzip.compress(TRIVIAL.encode()))
  np.testing.assert_array_equal(vnnlib.read(str(gz)).properties[0].unsafe[0].d, [-1.0])
  bad = tmp_path / "bad.vnnlib"
  bad.write_text(TRIVIAL + "(assert (<= Y_0 Y_9))\n")
  with pytest.raises(vnnlib.VnnlibError, match=rf"^{bad}:7:17: undeclared name 'Y_9'$"):
    vnnlib.read(bad)


def test_cifar_sized_file_parses_quickly():
  n, label = 3 * 32 * 32, 3
  x0 = np.random.default_rng(0).uniform(0.0, 1.0, n)
  disjuncts = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(10) if j != label)
  text = _decls(n, 10) + _box(np.round(x0 - 0.01, 6), np.round(
      x0 + 0.01, 6)) + (f"(assert (or {disjuncts}))\n")
  start = time.perf_counter()
  spec = vnnlib.parse(text, num_inputs=n, num_outputs=10)
  elapsed = time.perf_counter() - start
  (prop,) = spec.properties
  np.testing.assert_allclose(prop.upper - prop.lower, 0.02, atol=2e-6)
  assert len(prop.unsafe) == 9
  assert elapsed < 5.0, f"parsing {n} inputs took {elapsed:.2f}s"


def test_many_boxes_parse_quickly():
  n, boxes = 784, 20
  ors = " ".join("(and " + " ".join(f"(>= X_{i} {k}) (<= X_{i} {k + 1})"
                                    for i in range(n)) + " (>= Y_0 Y_1))"
                 for k in range(boxes))
  start = time.perf_counter()
  spec = vnnlib.parse(_decls(n, 2) + f"(assert (or {ors}))")
  elapsed = time.perf_counter() - start
  assert len(spec.properties) == boxes
  np.testing.assert_array_equal(spec.properties[-1].lower, np.full(n, boxes - 1.0))
  assert elapsed < 5.0, f"parsing {boxes} boxes of {n} inputs took {elapsed:.2f}s"


D = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"  # two lines, X_0 at 1:16
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"  # lines 3 and 4


@pytest.mark.parametrize(
    "text, where, what",
    [
        # Syntax.
        (D + BOX + "(assert (<= Y_0 1)))", "5:20", "unbalanced ')'"),
        (D + BOX + "(assert (<= Y_0 1)\n(assert (<= Y_0 2))", "5:1", "unbalanced '('"),
        (D + "X_0", "3:1", "expected '(' to start a command, found 'X_0'"),
        (D + BOX + "(declare-fun Y_1 () Real)", "5:2", "unknown command 'declare-fun'"),
        (D + BOX + "()", "5:1", "expected a command, found '()'"),
        (D + BOX + "(assert (implies (<= Y_0 1) (<= Y_0 2)))", "5:10",
         "unknown operator 'implies' in a formula"),
        (D + BOX + "(assert (<= (max Y_0 1) 1))", "5:14",
         "unknown operator 'max' in an arithmetic expression"),
        (D + BOX + "(assert (<= Y_0 1.2.3))", "5:17", "bad number '1.2.3'"),
        (D + BOX + "(assert (<= Y_0 1e))", "5:17", "bad number '1e'"),
        (D + BOX + "(assert (<= Y_0 1e999))", "5:17", "number '1e999' is out of the float64 range"),
        (D + BOX + "(assert (<= Y_0))", "5:9", "'<=' takes 2 arguments, got 1"),
        (D + BOX + "(assert (<= Y_0 1 2))", "5:9", "'<=' takes 2 arguments, got 3"),
        (D + BOX + "(assert (<= Y_0 1) (<= Y_0 2))", "5:1", "'assert' takes 1 arguments, got 2"),
        (D + BOX + "(assert (<= (-) 1))", "5:13", "'-' takes at least 1 arguments, got 0"),
        (D + BOX + "(assert (<= (* 2) 1))", "5:13", "'*' takes at least 2 arguments, got 1"),
        (D + "(declare-const Y_1)", "3:1", "'declare-const' takes 2 arguments, got 1"),
        (D + BOX + "(assert Y_0)", "5:9", "expected a formula (and, or or a comparison)"),
        (D + BOX + "(assert (<= (/ Y_0 Y_0) 1))", "5:20", "the divisor must be a nonzero constant"),
        # Declarations.
        (D + BOX + "(assert (<= Y_1 1))", "5:13", "undeclared name 'Y_1'"),
        ("(declare-const X_0 Real)\n(assert (<= X_0 1))\n(declare-const Y_0 Real)\n"
         "(assert (<= Y_1 Y_0))", "4:13", "undeclared name 'Y_1'"),
        (D + "(declare-const Z_0 Real)", "3:16", "expected a variable name X_i or Y_j"),
        (D + "(declare-const X_01 Real)", "3:16", "expected a variable name X_i or Y_j"),
        (D + "(declare-const X_1 Int)", "3:20", "only variables of sort Real are supported"),
        (D + "\n (declare-const X_0 Real)", "4:17", "'X_0' is declared twice"),
        (D + "(declare-const X_2 Real)\n" + BOX, "3:16",
         "X_2 is declared but X_1 is not: inputs must be X_0..X_(n-1) without gaps"),
        (D.replace("Y_0", "Y_1") + "(declare-const X_1 Real)", "2:16",
         "Y_1 is declared but Y_0 is not"),
        ("(declare-const X_0 Real)\n" + BOX, "4:1", "no outputs declared (Y_0, Y_1, ...)"),
        # Outside the supported subset.
        (D + BOX + "(assert (<= X_0 Y_0))", "5:9",
         "a comparison may involve inputs X or outputs Y, not both"),
        (D + "(declare-const X_1 Real)\n" + BOX + "(assert (<= (+ X_0 X_1) 1))", "6:9",
         "only box constraints on inputs are supported"),
        (D + BOX + "(assert (<= (* Y_0 Y_0) 1))", "5:13", "nonlinear product"),
        (D + BOX + "(assert (<= (* 2 (+ Y_0 1) (- Y_0)) 1))", "5:13", "nonlinear product"),
        (D + "(assert (<= X_0 1))\n(assert (<= Y_0 0))", "1:16", "X_0 has no finite lower bound"),
        (D + "(assert (or (and (>= X_0 0) (<= X_0 1)) (>= X_0 0)))", "1:16",
         "X_0 has no finite upper bound in disjunct 2"),
    ],
)
def test_errors_name_line_and_column(text, where, what):
  with pytest.raises(vnnlib.VnnlibError) as info:
    vnnlib.parse(text, source="p.vnnlib")
  message = str(info.value)
  assert message.startswith(f"p.vnnlib:{where}: "), message
  assert what in message


def test_normal_form_blow_up_is_refused():
  two_ways = "(assert (or (<= Y_0 0) (<= Y_0 1)))\n"
  text = _decls(1, 1) + _box([0], [1]) + two_ways * 17  # 2**17 > 100000 disjuncts
  # 16 asserts give 2**16 = 65536 disjuncts; the 17th (on line 4 + 17) is refused.
  with pytest.raises(vnnlib.VnnlibError, match=r"^<string>:21:1: .*exceeds 100000 terms"):
    vnnlib.parse(text)


def test_deep_nesting_is_refused_with_position():
  deep = "(and " * 300 + "(<= Y_0 0)" + ")" * 300
  text = _decls(1, 1) + _box([0], [1]) + f"(assert {deep})"
  with pytest.raises(vnnlib.VnnlibError, match=r"^<string>:5:\d+: parentheses nested deeper"):
    vnnlib.parse(text)
  nested = "(and " * 150 + "(<= Y_0 0)" + ")" * 150
  assert len(vnnlib.parse(_decls(1, 1) + _box([0], [1]) + f"(assert {nested})").properties) == 1


def test_errors_are_input_errors():
  assert issubclass(vnnlib.VnnlibError, InputError)
  assert issubclass(vnnlib.VnnlibError, ValueError)
  with pytest.raises(ValueError, match=r"^<string>:1:2: unknown command 'frobnicate'"):
    vnnlib.parse("(frobnicate)")

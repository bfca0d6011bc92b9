"""Bad input to verify.certify, margin_bounds, margin_spec and VNNLIB boxes is a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import verify
from robustlib.checks import InputError
from verify import vnnlib

W = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
K = W.shape[1]


def linear(x):
  return x.reshape(x.shape[0], -1) @ W


def _inputs():
  x = np.random.default_rng(1).uniform(size=(4, 3, 4)).astype(np.float32)
  return x, np.array([0, 1, 2, 3], np.int32)


def _nan_at(i):

  def change(x):
    x = x.copy()
    x[i, 1, 2] = np.nan
    return x

  return change


# (what changes in a valid call, a distinctive part of the message). Each entry is
# a dict of replacements: x / y / eps / method / bounds / fn, or a function of x.
BAD_CALLS = {
    "x_above_the_box": (dict(x=lambda x: x + 0.5), r"x must lie in \[0\.0, 1\.0\]"),
    "x_below_the_box": (dict(x=lambda x: x - 0.5), r"first offending example at index 0"),
    "x_nan": (dict(x=_nan_at(2)), r"NaN or infinite values .*first at index 2"),
    "x_inf": (dict(x=lambda x: x * np.inf), "NaN or infinite"),
    "x_integer": (dict(x=lambda x: (x * 255).astype(np.uint8)), "floating dtype"),
    "x_scalar": (dict(x=lambda x: np.float32(0.5)), "leading batch dimension"),
    "y_too_large": (dict(y=np.array([0, 1, 2, K], np.int32)), rf"y must lie in \[0, {K}\)"),
    "y_far_too_large": (dict(y=np.array([0, 1, 2, 31], np.int32)), r"found labels in \[0, 31\]"),
    "y_negative": (dict(y=np.array([0, -1, 2, 3], np.int32)), r"found labels in \[-1, 3\]"),
    "y_float": (dict(y=np.array([0.0, 1.0, 2.0, 3.0], np.float32)), "integer class labels"),
    "y_too_short": (dict(y=np.array([0, 1, 2], np.int32)), "3 labels but there are 4 examples"),
    "y_matrix": (dict(y=np.zeros((4, 1), np.int32)), r"vector of labels \[N\]"),
    "eps_negative": (dict(eps=-0.1), "eps must be >= 0"),
    "eps_nan": (dict(eps=np.nan), "eps must be >= 0 and finite, got nan"),
    "eps_inf": (dict(eps=np.inf), "finite"),
    "eps_one_negative": (dict(eps=np.array([0.1, 0.1, -0.1, 0.1])), "first -0.1 at index 2"),
    "eps_wrong_length": (dict(eps=np.full(5, 0.1)), r"scalar or a vector \[N\] with N=4"),
    "eps_matrix": (dict(eps=np.full((4, 1), 0.1)), r"scalar or a vector \[N\]"),
    "logits_integer": (dict(fn=lambda x: linear(x).astype(jnp.int32)), "floating logits"),
    "logits_vector": (dict(fn=lambda x: linear(x)[:, 0]), r"logits \[N, K\].*shape \(4,\)"),
    "logits_rank_3": (dict(fn=lambda x: linear(x)[:, :, None]), r"logits \[N, K\]"),
    "logits_wrong_batch": (dict(fn=lambda x: linear(x)[:2]), r"for N=4 it returned shape \(2, 5\)"),
    "logits_one_class": (dict(fn=lambda x: linear(x)[:, :1]), "at least 2 classes"),
    "method_unknown": (dict(method="lp"), "method must be one of"),
    "bounds_inverted": (dict(bounds=(1.0, 0.0)), "lower <= upper"),
}


def _call(entry_point, change):
  x, y = _inputs()
  if "x" in change:
    x = change["x"](x)
  kwargs = {k: change[k] for k in ("method", "bounds") if k in change}
  return entry_point(change.get("fn", linear), x, change.get("y", y), change.get("eps", 0.1),
                     **kwargs)


@pytest.mark.parametrize("change, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_certify_calls_are_errors(change, match):
  with pytest.raises(InputError, match=match):
    _call(verify.certify, change)


@pytest.mark.parametrize("change, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_concrete_margin_bounds_calls_are_errors(change, match):
  with pytest.raises(InputError, match=match):
    _call(verify.margin_bounds, change)


def test_errors_are_value_errors_on_one_line():
  with pytest.raises(ValueError) as info:
    _call(verify.certify, dict(y=np.array([0, 1, 2, 31], np.int32)))
  assert isinstance(info.value, InputError) and "\n" not in str(info.value)
  with pytest.raises(InputError) as info:
    _call(verify.certify, dict(eps=np.full(4, -1.0)))
  assert "\n" not in str(info.value) and "4 bad values" in str(info.value)


def test_the_checks_use_the_attacks_wording():
  import attacks  # pylint: disable=import-outside-toplevel
  for change in (dict(x=lambda x: x + 0.5), dict(x=_nan_at(1)),
                 dict(y=np.array([0.0, 1.0, 2.0, 3.0], np.float32))):
    messages = []
    for run in (verify.certify, lambda fn, x, y, eps: attacks.fgsm(eps=eps)
                (fn, x, y, jax.random.key(0))):
      with pytest.raises(InputError) as info:
        _call(run, change)
      messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_no_bounds_means_no_range_check():
  x, y = _inputs()
  verified = verify.certify(linear, x + 5.0, y, 0.0, bounds=None)
  assert verified.shape == (4,)
  with pytest.raises(InputError, match="NaN"):
    verify.certify(linear, x * np.nan, y, 0.0, bounds=None)


def test_a_valid_call_still_works():
  x, _ = _inputs()
  y = np.asarray(jnp.argmax(linear(x), axis=1)).astype(np.int32)
  verified = verify.certify(linear, x, y, 0.0)
  assert verified.shape == (4,) and verified.dtype == jnp.bool_
  assert bool(jnp.all(verified))  # at eps = 0 the bounds are exact: the prediction is certified
  assert not bool(jnp.any(verify.certify(linear, x, (y + 1) % K, 0.0)))
  margins = verify.margin_bounds(linear, x, y, np.full(4, 0.01, np.float32))
  assert margins.shape == (4, K - 1)


# ---------------------------------------------------------------------------- traced inputs


@pytest.mark.parametrize("change, match", [
    (dict(y=np.array([0.0, 1.0, 2.0, 3.0], np.float32)), "integer class labels"),
    (dict(y=np.zeros((4, 1), np.int32)), r"vector of labels \[N\]"),
    (dict(y=np.array([0, 1, 2], np.int32)), "3 labels but there are 4 examples"),
    (dict(x=lambda x: (x * 255).astype(np.int32)), "floating dtype"),
    (dict(eps=np.full(5, 0.1, np.float32)), r"scalar or a vector \[N\] with N=4"),
    (dict(fn=lambda x: linear(x).astype(jnp.int32)), "floating logits"),
    (dict(fn=lambda x: linear(x)[:, :1]), "at least 2 classes"),
])
def test_traced_margin_bounds_checks_shapes_and_dtypes(change, match):
  x, y = _inputs()
  x = change["x"](x) if "x" in change else x
  fn = change.get("fn", linear)
  bounds = jax.jit(lambda x, y, eps: verify.margin_bounds(fn, x, y, eps))
  with pytest.raises(InputError, match=match):
    bounds(x, change.get("y", y), change.get("eps", np.float32(0.1)))


def test_traced_values_are_not_checked():
  x, y = _inputs()
  bounds = jax.jit(lambda x, y, eps: verify.margin_bounds(linear, x, y, eps))
  assert bounds(x + 5.0, y, np.float32(0.1)).shape == (4, K - 1)  # values unknown at trace time


def test_margin_spec_under_jit_rejects_float_labels():
  with pytest.raises(InputError, match="integer class labels, got dtype float32"):
    jax.jit(lambda y: verify.margin_spec(y, 3))(jnp.array([0.0, 1.0]))


def test_margin_spec_under_jit_rejects_labels_that_are_not_a_vector():
  with pytest.raises(InputError, match=r"vector of labels \[N\]"):
    jax.jit(lambda y: verify.margin_spec(y, 3))(jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(InputError, match=r"vector of labels \[N\]"):
    jax.jit(lambda y: verify.margin_spec(y, 3))(jnp.int32(1))


def test_margin_spec_checks_labels_that_are_concrete_under_jit():
  y = np.array([0, 3], np.int32)  # a constant of the traced function, concrete at trace time
  with pytest.raises(InputError, match=r"y must lie in \[0, 3\)"):
    jax.jit(lambda: verify.margin_spec(y, 3))()
  assert jax.jit(lambda y: verify.margin_spec(y, 3))(y).shape == (2, 2, 3)  # traced: unchecked


@pytest.mark.parametrize("y, num_classes, match", [
    (np.array([0, 3]), 3, r"\[0, 3\)"),
    (np.array([-1, 0]), 3, r"found labels in \[-1, 0\]"),
    (np.array([0.0, 1.0]), 3, "integer"),
    (np.array([0, 1]), 1, "num_classes must be an integer >= 2"),
    (np.array([0, 1]), 2.5, "num_classes must be an integer >= 2"),
])
def test_margin_spec_rejects_bad_labels(y, num_classes, match):
  with pytest.raises(InputError, match=match):
    verify.margin_spec(y, num_classes)


# ---------------------------------------------------------------------------- VNNLIB boxes

DECLS = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
BOX_1 = "(assert (>= X_1 0))\n(assert (<= X_1 1))\n"


@pytest.mark.parametrize("asserts", [
    "(assert (>= X_0 0.6))\n(assert (<= X_0 0.4))\n",
    "(assert (and (<= X_0 0.4) (>= X_0 0.6)))\n",
    "(assert (<= X_0 0.4))\n(assert (or (and (>= X_0 0.6) (<= Y_0 0)) (and (>= X_0 0.6) "
    "(>= Y_0 1))))\n",
])
def test_an_inverted_vnnlib_box_is_an_error(asserts):
  text = DECLS + BOX_1 + asserts + "(assert (<= Y_0 0))\n"
  with pytest.raises(vnnlib.VnnlibError,
                     match=r"X_0 has lower bound 0\.6 above its upper bound "
                     r"0\.4"):
    vnnlib.parse(text, source="prop.vnnlib")
  assert issubclass(vnnlib.VnnlibError, InputError)


def test_the_error_names_the_source_and_the_variable_declaration():
  text = DECLS + BOX_1 + "(assert (>= X_0 0.6))\n(assert (<= X_0 0.4))\n(assert (<= Y_0 0))\n"
  with pytest.raises(vnnlib.VnnlibError, match=r"^prop\.vnnlib:1:16: the input box is empty"):
    vnnlib.parse(text, source="prop.vnnlib")


def test_an_empty_disjunct_beside_a_nonempty_one_is_still_dropped():
  text = DECLS + BOX_1 + ("(assert (or (and (>= X_0 0.6) (<= X_0 0.4) (<= Y_0 0))"
                          "            (and (>= X_0 0) (<= X_0 1) (<= Y_0 1))))\n")
  (prop,) = vnnlib.parse(text).properties
  np.testing.assert_array_equal(prop.lower, [0, 0])
  np.testing.assert_array_equal(prop.unsafe[0].d, [1.0])


def test_a_property_with_an_inverted_box_is_an_error():
  with pytest.raises(InputError, match=r"X_1 has lower bound 0\.6 and upper bound 0\.4"):
    vnnlib.Property(np.array([0.0, 0.6]), np.array([1.0, 0.4]), ())

"""Agreement with auto_LiRPA 0.7.1 on its four reference networks (``../shared/reference``).

IBP, CROWN and CROWN-IBP bounds on the logits, and lower bounds on the margins
(the file's specification ``C``), equal auto_LiRPA's for ``mlp``, ``cnn_small``
and ``resblock_bn_avgpool`` to float32 accuracy: ``rtol=1e-5, atol=1e-6``
(``|ours - theirs| <= atol + rtol |theirs|``). Measured over all 8 examples and
both radii, the worst error is 1/6 of that tolerance: 8.8e-6 relative on bounds
of magnitude above 0.01 (full CROWN on ``resblock_bn_avgpool``), 1.1e-7
absolute on smaller ones; under 1e-6 relative for IBP.

``cnn_maxpool`` uses auto_LiRPA's max-pool relaxation (lower line: the window's
element with the largest lower bound; upper line: that element where its lower
bound dominates the others' upper bounds, else the largest upper bound), but a
window often holds elements with exactly equal lower bounds (constant image
background), and which one PyTorch picks depends on its float rounding. The
bounds then differ in both directions by up to ~1e-3 (measured: CROWN-IBP
7.8e-4, CROWN 1.2e-3); here they are checked to be sound, never looser than
IBP, and within 5e-3 relative of the reference.

Full CROWN on all sixteen (example, radius) pairs of a convolutional network
takes 10-20 s on 2 cores, so the default run checks one example at both radii
per network and ``-m slow`` checks all sixteen. Each call bounds a batch of
pairs at once (one radius per example), jitted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bound_testing
import lirpa_reference as lr
import verify

REF = lr.load()
pytestmark = pytest.mark.skipif(
    REF is None,
    reason=f"auto_LiRPA reference bounds not found at {lr.reference_path()} (set "
    "ROBUSTLIB_REFERENCE_DIR to the folder holding lirpa_bounds.npz)")

EXACT = ("mlp", "cnn_small", "resblock_bn_avgpool")
RTOL, ATOL = 1e-5, 1e-6
# (example, radius) pairs: every one, and those checked with full CROWN in the default run.
ALL_CASES = tuple((i, e) for e in lr.EPSILONS for i in range(8))
FAST_CASES = {
    "mlp": ALL_CASES,
    "cnn_small": ((0, "0.03"), (0, "0.1")),
    "resblock_bn_avgpool": ((1, "0.03"), (1, "0.1")),
    "cnn_maxpool": ((2, "0.03"), (2, "0.1")),
}


def _run_slow(request):
  if "slow" not in request.config.getoption("-m"):
    pytest.skip("full CROWN on all 16 examples and radii (about 40 s): run with -m slow")


def _batch(cases):
  """Inputs, labels, spec and radii of the ``(example, radius)`` cases, as one batch."""
  idx = np.asarray([i for i, _ in cases])
  eps = np.asarray([float(e) for _, e in cases], np.float32)
  return (jnp.asarray(REF["x_nchw"][idx]), jnp.asarray(REF["y"][idx]), jnp.asarray(REF["C"][idx]),
          jnp.asarray(eps))


def _reference(name, method, cases):
  """``(logit_lower, logit_upper, margin_lower)`` of the cases, in their order."""
  rows = [[b[i] for b in lr.bounds(REF, name, method, e)] for i, e in cases]
  return tuple(np.stack(part) for part in zip(*rows))


def _assert_equal(ours, reference):
  np.testing.assert_allclose(np.asarray(ours), reference, rtol=RTOL, atol=ATOL)


def _bounds(name, method, x, eps, spec=None):
  """``verify.<method>`` of network ``name`` on the L-inf ball, jitted.

  Inputs, radii and the spec are arguments of the jitted function: with a
  constant spec XLA would fold the whole backward pass at compile time. One
  compilation is also several times faster than the interpreter run eagerly.
  """
  fn = lr.network(REF, name)
  bound = {"ibp": verify.ibp, "crown_ibp": verify.crown_ibp, "crown": verify.crown}[method]
  if spec is None:
    return jax.jit(lambda v, e: bound(fn, verify.linf_ball(v, e)))(x, eps)
  return jax.jit(lambda v, e, s: bound(fn, verify.linf_ball(v, e), s))(x, eps, spec)


def _margin_bounds(name, method, x, y, eps):
  fn = lr.network(REF, name)
  return jax.jit(lambda v, c, e: verify.margin_bounds(fn, v, c, e, method))(x, y, eps)


def _spec_with_logits(spec):
  """``[N, K + S, K]``: identity rows (the logits) above the margin rows."""
  n, _, k = spec.shape
  return jnp.concatenate([jnp.broadcast_to(jnp.eye(k), (n, k, k)), spec], axis=1)


@pytest.mark.parametrize("name", lr.NAMES)
def test_networks_reproduce_the_reference_logits(name):
  logits = lr.network(REF, name)(jnp.asarray(REF["x_nchw"]))
  np.testing.assert_allclose(logits, REF[f"{name}/logits"], rtol=1e-5, atol=1e-5)


def test_reference_specification_is_our_margin_spec():
  np.testing.assert_array_equal(verify.margin_spec(REF["y"], 10), REF["C"])


@pytest.mark.parametrize("name", lr.NAMES)
def test_ibp_equals_auto_lirpa(name):
  x, y, _, eps = _batch(ALL_CASES)
  lower, upper, margin = _reference(name, "IBP", ALL_CASES)
  out = _bounds(name, "ibp", x, eps)
  _assert_equal(out.lower, lower)
  _assert_equal(out.upper, upper)
  # With a specification, auto_LiRPA folds C into the last linear layer; so do we.
  _assert_equal(_margin_bounds(name, "ibp", x, y, eps), margin)


@pytest.mark.parametrize("name", EXACT)
def test_crown_ibp_equals_auto_lirpa(name):
  x, _, spec, eps = _batch(ALL_CASES)
  lower, upper, margin = _reference(name, "CROWN-IBP", ALL_CASES)
  out = _bounds(name, "crown_ibp", x, eps, _spec_with_logits(spec))
  _assert_equal(out.lower[:, :10], lower)
  _assert_equal(out.upper[:, :10], upper)
  _assert_equal(out.lower[:, 10:], margin)


def _check_crown(name, cases):
  x, _, spec, eps = _batch(cases)
  lower, upper, margin = _reference(name, "CROWN", cases)
  # One backward computation for logits and margins: the intermediate bounds are shared.
  out = _bounds(name, "crown", x, eps, _spec_with_logits(spec))
  _assert_equal(out.lower[:, :10], lower)
  _assert_equal(out.upper[:, :10], upper)
  _assert_equal(out.lower[:, 10:], margin)


@pytest.mark.parametrize("name", EXACT)
def test_crown_equals_auto_lirpa(name):
  _check_crown(name, FAST_CASES[name])


def test_crown_without_a_spec_equals_auto_lirpa():
  x, _, _, eps = _batch(ALL_CASES)
  lower, upper, _ = _reference("mlp", "CROWN", ALL_CASES)
  out = _bounds("mlp", "crown", x, eps)
  _assert_equal(out.lower, lower)
  _assert_equal(out.upper, upper)


@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN"])
def test_margin_bounds_equal_auto_lirpa(method):
  # The lower bounds alone, as verify.certify computes them (IBP: test_ibp_equals_auto_lirpa).
  x, y, _, eps = _batch(ALL_CASES)
  margin = _reference("mlp", method, ALL_CASES)[2]
  _assert_equal(_margin_bounds("mlp", lr.METHODS[method], x, y, eps), margin)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_small", "resblock_bn_avgpool"])
def test_crown_equals_auto_lirpa_on_every_example(name, request):
  _run_slow(request)
  _check_crown(name, ALL_CASES)


def _check_maxpool(method, cases):
  fn = lr.network(REF, "cnn_maxpool")
  x, y, spec, eps = _batch(cases)
  box = verify.linf_ball(x, eps)
  out = _bounds("cnn_maxpool", method, x, eps, _spec_with_logits(spec))
  lower, upper, margin = out.lower[:, :10], out.upper[:, :10], out.lower[:, 10:]
  bound_testing.assert_sound(fn, box, lower, upper)
  bound_testing.assert_sound(fn, box, margin, spec=spec)
  ibp = _bounds("cnn_maxpool", "ibp", x, eps)
  ibp_margin = _margin_bounds("cnn_maxpool", "ibp", x, y, eps)
  tol = 1e-5
  assert np.all(lower >= ibp.lower - tol) and np.all(upper <= ibp.upper + tol)
  assert np.all(margin >= ibp_margin - tol)
  # Equal to auto_LiRPA up to the choice among tied lower bounds in a pooling window.
  reference = _reference("cnn_maxpool", {"crown": "CROWN", "crown_ibp": "CROWN-IBP"}[method], cases)
  for ours, theirs in zip((lower, upper, margin), reference):
    np.testing.assert_allclose(ours, theirs, rtol=5e-3, atol=5e-3)


def test_cnn_maxpool_crown_ibp_is_sound_and_never_looser_than_ibp():
  _check_maxpool("crown_ibp", ALL_CASES)


def test_cnn_maxpool_crown_is_sound_and_never_looser_than_ibp():
  _check_maxpool("crown", FAST_CASES["cnn_maxpool"])


@pytest.mark.slow
def test_cnn_maxpool_crown_on_every_example(request):
  _run_slow(request)
  _check_maxpool("crown", ALL_CASES)

"""Attack strength on a trained model: clean >= FGSM >= PGD >= MultiTargeted, AutoAttack <= PGD.

The model is the digits MLP trained for 300 steps by ``python -m training.train``
(and, marked slow, the small MNIST CNN when ``../shared/data`` holds MNIST).
Which claims hold by construction and which are measured:

* By construction of the cascade (each stage runs only on the points the
  earlier stages left robust, and a stage draws its key from its name, so the
  first stage sees exactly what the same attack run alone sees): per example, robust(clean) ⊇ robust(FGSM) ⊇ robust([FGSM, PGD]) ⊇
  robust([FGSM, PGD, MultiTargeted]). The test checks that the first stage
  equals the attack alone, which is what makes these inclusions statements
  about the attacks. Likewise the stages of [AutoAttack's stages, PGD] up to
  AutoAttack's last are AutoAttack alone, and its PGD stage attacks exactly the
  points AutoAttack left robust.
* Measured (empirical, could fail for a weak implementation): each attack run
  alone is at least as strong, in aggregate, as the weaker one (PGD <= FGSM,
  MultiTargeted <= PGD, AutoAttack <= PGD), and per example it rarely misses a
  point the weaker one breaks (at most 2% of the examples; for AutoAttack, both
  PGD alone and PGD run after it).
"""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import attack_models
import attacks
import robustlib
from robustlib import checkpoints, data

REPO = pathlib.Path(__file__).resolve().parents[1]
EPS = 0.1  # L-inf, on 8x8 digits in [0, 1]
NUM_EXAMPLES = 128
MNIST_EPS = 0.1
MNIST_EXAMPLES = 256
TOLERANCE = 0.02  # per-example disagreements allowed in the empirical claims


def _train(workdir: pathlib.Path, *args: str) -> None:
  if not (workdir / "report.json").exists():
    subprocess.run([sys.executable, "-m", "training.train", f"--workdir={workdir}", *args],
                   cwd=REPO,
                   check=True,
                   capture_output=True)


def _load(workdir, num_examples, eps, data_dir=None):
  config, net, variables = checkpoints.load_run(str(workdir))
  test = data.load(config["dataset"], "test", data_dir=data_dir)
  logits_fn = robustlib.as_logits_fn(net, variables, test.info.input_shape)
  return logits_fn, test.images[:num_examples], test.labels[:num_examples], eps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The digits MLP, 300 training steps (trained once per session)."""
  return _load(attack_models.trained_digits_mlp(tmp_path_factory), NUM_EXAMPLES, EPS)


def _evaluate(model, suite):
  logits_fn, x, y, eps = model
  return attacks.evaluate(logits_fn,
                          x,
                          y,
                          suite,
                          eps=eps,
                          key=jax.random.key(0),
                          batch_size=min(len(y), 128),
                          progress=False,
                          run_diagnostics=False)


def _subset(a, b):
  """Per example, robust under ``a`` implies robust under ``b`` (flags ``[N]``)."""
  return not (a & ~b).any()


def _rarely_outside(a, b):
  return (a & ~b).mean() <= TOLERANCE


class _Alone(dict):
  """Reports of attacks run alone (``attacks.<name>(eps=eps)``), evaluated when first asked for."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def __missing__(self, name):
    self[name] = _evaluate(self.model, getattr(attacks, name)(eps=self.model[3]))
    return self[name]


@pytest.fixture(scope="module")
def alone(model):
  return _Alone(model)


def check_cascade_inclusions(model, alone):
  eps = model[3]
  chain = _evaluate(model,
                    [attacks.fgsm(eps=eps),
                     attacks.pgd(eps=eps),
                     attacks.multitargeted(eps=eps)])
  clean = chain.clean_flags
  fgsm, pgd, mt = chain.stage_flags[0]
  assert clean.mean() > 0.9
  # The first stage is FGSM alone, exactly.
  np.testing.assert_array_equal(fgsm, alone["fgsm"].robust_flags[0])
  assert _subset(fgsm, clean) and _subset(pgd, fgsm) and _subset(mt, pgd)
  assert chain.clean_accuracy >= chain.stage_accuracy[0][0] >= chain.stage_accuracy[0][1]
  assert chain.stage_accuracy[0][1] >= chain.robust_accuracy[0]
  assert chain.clean_accuracy > chain.robust_accuracy[0]  # the attacks break something


def check_stronger_alone(alone):
  fgsm, pgd, mt = (alone[n].robust_flags[0] for n in ("fgsm", "pgd", "multitargeted"))
  assert alone["fgsm"].clean_accuracy >= fgsm.mean() >= pgd.mean() >= mt.mean()
  assert fgsm.mean() > pgd.mean()  # iterating helps on this model at this radius
  assert _rarely_outside(pgd, fgsm) and _rarely_outside(mt, pgd)


def check_autoattack(model, alone):
  """One cascade, AutoAttack's stages then PGD: its stages up to the last of AutoAttack's are
  AutoAttack alone (same keys, same points), and the PGD stage after them attacks exactly the
  points AutoAttack left robust."""
  eps = model[3]
  aa = attacks.autoattack(eps=eps)
  report = _evaluate(model, [*aa.stages, attacks.pgd(eps=eps)])
  assert report.stage_names[:-1] == tuple(s.name for s in aa.stages)
  autoattack = report.stage_flags[0, len(aa.stages) - 1]
  pgd = alone["pgd"].robust_flags[0]
  assert autoattack.mean() <= pgd.mean()
  assert _rarely_outside(autoattack, pgd)  # PGD alone rarely breaks a point AutoAttack missed
  assert _rarely_outside(autoattack, report.robust_flags[0])  # nor does PGD run after it
  assert not report.warnings  # no gradient masking on a plain network


@pytest.mark.slow
def test_autoattack_plus_is_never_weaker_than_standard_per_example(model, request):
  # By construction (plus holds every standard stage, which draws the same keys by name) and
  # checked here on the trained model: every point standard breaks, plus breaks.
  if "slow" not in request.config.getoption("-m"):
    pytest.skip("AutoAttack plus on 128 points (about 1 minute): run with -m slow")
  eps = model[3]
  standard = _evaluate(model, attacks.autoattack(eps=eps))
  plus = _evaluate(model, attacks.autoattack(eps=eps, version="plus"))
  assert _subset(plus.robust_flags[0], standard.robust_flags[0])
  assert standard.robust_accuracy[0] < standard.clean_accuracy  # a radius where attacks matter


@pytest.mark.slow
def test_autoattack_rand_beats_its_attacks_without_eot_on_a_randomized_model(model, request):
  # A randomized defence (Gaussian noise on the input, a fresh draw per input). Averaging
  # 20 draws' gradients breaks more points than the same APGD stages on single draws.
  # (Standard AutoAttack, with its 4 stages and 19 runs judged on as many single draws,
  # left fewer points robust than rand here: 12 points robust only under rand, 6 only
  # under standard, on 128.)
  if "slow" not in request.config.getoption("-m"):
    pytest.skip("AutoAttack rand on 128 points of a randomized model: run with -m slow")
  logits_fn, x, y, eps = model
  noisy = attacks.Randomized(lambda v, k: logits_fn(v + 0.1 * jax.random.normal(k, v.shape)),
                             jax.random.key(0))
  rand = _evaluate((noisy, x, y, eps), attacks.autoattack(eps=eps, version="rand"))
  plain = _evaluate((noisy, x, y, eps),
                    [attacks.apgd(eps=eps, loss="ce"),
                     attacks.apgd(eps=eps, loss="dlr")])
  assert rand.robust_accuracy[0] <= plain.robust_accuracy[0]
  assert rand.robust_accuracy[0] < rand.clean_accuracy


@pytest.mark.slow
def test_autoattack_l1_runs_end_to_end_and_is_never_weaker_than_its_first_stage(model, request):
  if "slow" not in request.config.getoption("-m"):
    pytest.skip("AutoAttack L1 on 128 points: run with -m slow")
  eps = 32 * model[3]  # L1: the budget of the L-inf ball spent on half of the 64 pixels
  suite = attacks.autoattack(eps=eps, norm="l1")
  l1 = _evaluate(model[:3] + (eps,), suite)
  first = _evaluate(model[:3] + (eps,), suite.stages[0])
  assert l1.stage_names == ("apgd-ce", "apgd-t")
  assert _subset(l1.robust_flags[0], first.robust_flags[0])
  assert l1.robust_accuracy[0] < l1.clean_accuracy


@pytest.mark.parametrize("norm, radii", [("linf", (0.05, 0.1, 0.15)), ("l2", (0.25, 0.5, 1.0))])
def test_fmn_curve_is_never_above_autoattack(model, norm, radii):
  # One unbounded FMN run gives every radius; AutoAttack runs at each. Measured here: equal
  # in L-inf, FMN 0.8 pp lower at L2 0.25 (a curve above AutoAttack's would be a weak one).
  logits_fn, x, y, _ = model
  curve = _evaluate(model[:3] + (list(radii),), attacks.fmn(norm=norm))
  autoattack = _evaluate(model[:3] + (list(radii),), attacks.autoattack(eps=max(radii), norm=norm))
  assert curve.distances is not None and autoattack.distances is None
  assert np.all(
      np.asarray(curve.robust_accuracy) <= np.asarray(autoattack.robust_accuracy) +
      0.005), (curve.robust_accuracy, autoattack.robust_accuracy)
  assert autoattack.robust_accuracy[-1] < 0.5 * curve.clean_accuracy  # radii where attacks matter


def test_cascade_inclusions_hold_per_example(model, alone):
  check_cascade_inclusions(model, alone)


def test_stronger_attacks_alone_are_stronger(alone):
  check_stronger_alone(alone)


def test_autoattack_is_at_least_as_strong_as_pgd(model, alone):
  check_autoattack(model, alone)


@pytest.mark.slow
def test_the_same_holds_for_a_small_mnist_cnn(shared_data_dir, tmp_path_factory, request):
  if "slow" not in request.config.getoption("-m"):
    pytest.skip("a slow reproduction: run with -m slow")
  workdir = tmp_path_factory.getbasetemp() / "mnist_cnn_small"
  _train(workdir, "--config=training/configs/mnist_cnn_small.py", "--config.num_steps=600",
         f"--config.data_dir={shared_data_dir}", "--config.num_eval_examples=1000")
  mnist = _load(workdir, MNIST_EXAMPLES, MNIST_EPS, data_dir=str(shared_data_dir))
  results = _Alone(mnist)
  check_cascade_inclusions(mnist, results)
  check_stronger_alone(results)
  check_autoattack(mnist, results)

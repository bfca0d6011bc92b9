"""Attack strength on a trained model: clean >= FGSM >= PGD >= MultiTargeted, AutoAttack <= PGD.

The model is the digits MLP trained for 300 steps by ``python -m training.train``
(and, marked slow, the small MNIST CNN when ``../shared/data`` holds MNIST).
Which claims hold by construction and which are measured:

* By construction of the cascade (each stage runs only on the points the
  earlier stages left robust, and stage ``s`` draws its key as
  ``fold_in(key, s)``, so the first stage sees exactly what the same attack run
  alone sees): per example, robust(clean) ⊇ robust(FGSM) ⊇ robust([FGSM, PGD]) ⊇
  robust([FGSM, PGD, MultiTargeted]), and robust([PGD, AutoAttack's stages]) ⊆
  robust(PGD). The test checks that the first stage equals the attack alone,
  which is what makes these inclusions statements about the attacks.
* Measured (empirical, could fail for a weak implementation): each attack run
  alone is at least as strong, in aggregate, as the weaker one (PGD <= FGSM,
  MultiTargeted <= PGD, AutoAttack <= PGD), and per example it rarely misses a
  point the weaker one breaks (at most 2% of the examples).
"""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import attacks
import robustlib
from robustlib import checkpoints, data

REPO = pathlib.Path(__file__).resolve().parents[1]
EPS = 0.1  # L-inf, on 8x8 digits in [0, 1]
NUM_EXAMPLES = 128
MNIST_EPS = 0.1
MNIST_EXAMPLES = 256
TOLERANCE = 0.02  # per-example disagreements allowed in the empirical claims


def _require(*names):
  missing = [n for n in names if not hasattr(attacks, n)]
  if missing:
    pytest.skip(f"attacks.{', attacks.'.join(missing)} not in the package yet")


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
  _require("fgsm", "pgd", "multitargeted")
  workdir = tmp_path_factory.getbasetemp() / "digits_mlp_300"
  _train(workdir, "--config=training/configs/digits_mlp.py", "--config.num_steps=300")
  return _load(workdir, NUM_EXAMPLES, EPS)


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


def _alone(model):
  eps = model[3]
  return {
      name: _evaluate(model,
                      getattr(attacks, name)(eps=eps)) for name in ("fgsm", "pgd", "multitargeted")
  }


@pytest.fixture(scope="module")
def alone(model):
  return _alone(model)


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
  _require("apgd", "apgd_t", "fab", "square")
  aa = attacks.autoattack(eps=model[3])
  combined = _evaluate(model, [attacks.pgd(eps=model[3]), *aa.stages])
  pgd = alone["pgd"].robust_flags[0]
  np.testing.assert_array_equal(combined.stage_flags[0, 0], pgd)  # first stage = PGD alone
  assert _subset(combined.robust_flags[0], pgd)
  standard = _evaluate(model, aa)
  assert standard.stage_names == tuple(s.name for s in aa.stages)
  assert standard.robust_accuracy[0] <= alone["pgd"].robust_accuracy[0]
  assert _rarely_outside(standard.robust_flags[0], pgd)
  assert not standard.warnings  # no gradient masking on a plain network


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
  _require("fgsm", "pgd", "multitargeted")
  workdir = tmp_path_factory.getbasetemp() / "mnist_cnn_small"
  _train(workdir, "--config=training/configs/mnist_cnn_small.py", "--config.num_steps=600",
         f"--config.data_dir={shared_data_dir}", "--config.num_eval_examples=1000")
  mnist = _load(workdir, MNIST_EXAMPLES, MNIST_EPS, data_dir=str(shared_data_dir))
  results = _alone(mnist)
  check_cascade_inclusions(mnist, results)
  check_stronger_alone(results)
  check_autoattack(mnist, results)

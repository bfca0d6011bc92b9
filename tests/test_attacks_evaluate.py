"""Specification of attacks.evaluate, cascades, diagnostics and `python -m attacks.evaluate`.

The attacks used here are small ones built in this file with ``core.make_attack``
(deterministic one-step and few-step sign-gradient attacks), so that the expected
per-example results can be computed independently.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attack_models
import attacks
from attacks import core, diagnostics
from attacks.autoattack import Cascade, cascade, run_stages
from robustlib.checks import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


def sign_attack(steps: int = 1, name: str = "step", norm: str = "linf", min_classes: int = 2):
  """Deterministic sign-gradient ascent on the margin (FGSM for steps=1); ignores the key."""

  def run(logits_fn, x, y, key, eps, target):
    del key, target
    size = core.expand(eps * (1.0 if steps == 1 else 2.5 / steps), x)

    def body(_, xa):
      g = jax.grad(lambda v: jnp.sum(core.margin_loss(logits_fn(v), y)))(xa)
      if norm == "l2":
        g = g / core.expand(jnp.maximum(core.l2_norm(g), 1e-12), x)
      else:
        g = jnp.sign(g)
      return core.project(xa + size * g, x, eps, norm, (0.0, 1.0))

    return jax.lax.fori_loop(0, steps, body, x)

  return core.make_attack(run, name=name, eps=0.1, norm=norm, min_classes=min_classes)


def identity_attack(name: str = "noop"):
  return core.make_attack(lambda logits_fn, x, y, key, eps, target: x, name=name, eps=0.1)


class Counted:
  """A small random tanh network that counts how often JAX traces it."""

  def __init__(self, seed=0, dim=16, transform=None, num_classes=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    self.w1 = rng.normal(size=(dim, 12)).astype(np.float32) * 1.5
    self.w2 = rng.normal(size=(12, num_classes)).astype(np.float32)
    self.transform = transform
    self.count = 0

  def __call__(self, x):
    if isinstance(x, jax.core.Tracer):  # count traces, not eager calls
      self.count += 1
    z = jnp.tanh(x.reshape(x.shape[0], -1) @ self.w1 - 1.0) @ self.w2
    return z if self.transform is None else self.transform(z)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(1)
  model = Counted()
  x = rng.uniform(size=(50, 4, 4, 1)).astype(np.float32)
  y = np.asarray(jnp.argmax(model(x), -1)).astype(np.int32)
  y[:6] = (y[:6] + 1) % NUM_CLASSES  # a few misclassified points
  return model, x, y


@pytest.fixture(scope="module")
def suite():
  return [sign_attack(1, "fgsm"), sign_attack(5, "pgd5")]


def predict(model, x):
  return np.asarray(jnp.argmax(model(jnp.asarray(x)), -1))


def test_report_matches_an_independent_computation_of_the_cascade(problem, suite):
  model, x, y = problem
  eps = [0.0, 0.05, 0.1]
  report = attacks.evaluate(model,
                            x,
                            y,
                            suite,
                            eps=eps,
                            key=jax.random.key(0),
                            batch_size=16,
                            progress=False,
                            run_diagnostics=False)
  correct = predict(model, x) == y
  assert report.num_examples == 50 and report.eps == tuple(eps)
  assert report.stage_names == ("fgsm", "pgd5")
  np.testing.assert_array_equal(report.clean_flags, correct)
  assert report.clean_accuracy == pytest.approx(correct.mean())
  for j, e in enumerate(eps):
    # The attacks are deterministic: each one alone, on all points.
    broken = [predict(model, a(model, x, y, jax.random.key(0), eps=e)) != y for a in suite]
    after_first = correct & ~broken[0]
    np.testing.assert_array_equal(report.stage_flags[j, 0], after_first)
    np.testing.assert_array_equal(report.stage_flags[j, 1], after_first & ~broken[1])
    np.testing.assert_array_equal(report.robust_flags[j], after_first & ~broken[1])
    assert report.robust_accuracy[j] == pytest.approx(report.robust_flags[j].mean())
    assert report.stage_accuracy[j][0] == pytest.approx(after_first.mean())
  np.testing.assert_array_equal(report.robust_flags[0], correct)  # eps = 0 breaks nothing
  assert report.robust_accuracy[2] < report.clean_accuracy  # the attacks do something
  assert report.robust_accuracy[2] < report.stage_accuracy[2][0]  # and PGD adds to FGSM


def test_a_sweep_compiles_once_whatever_the_number_of_epsilons_and_batches(problem, suite):
  _, x, y = problem
  one, many = Counted(), Counted()
  kwargs = dict(key=jax.random.key(0), batch_size=16, progress=False, run_diagnostics=False)
  attacks.evaluate(one, x, y, suite, eps=[0.1], **kwargs)
  attacks.evaluate(many, x, y, suite, eps=[0.02, 0.05, 0.1, 0.2, 0.3], **kwargs)
  assert one.count > 0
  assert many.count == one.count  # 4 batches x 5 epsilons traced as often as 4 x 1
  before = many.count
  attacks.evaluate(many, x[:40], y[:40], suite, eps=[0.07, 0.15], **kwargs)
  assert many.count == before  # same shapes, new epsilons and data: no new trace


def test_padded_rows_do_not_count(problem, suite):
  model, x, y = problem
  kwargs = dict(eps=0.1, key=jax.random.key(0), progress=False, run_diagnostics=False)
  whole = attacks.evaluate(model, x, y, suite, batch_size=50, **kwargs)
  padded = attacks.evaluate(model, x, y, suite, batch_size=32, **kwargs)  # 64 rows, 14 padded
  assert padded.robust_flags.shape == (1, 50)
  np.testing.assert_array_equal(whole.stage_flags, padded.stage_flags)


@pytest.fixture(scope="module")
def random_suite():
  """AutoAttack's kinds of runs, small: restarts, targets, a random search."""
  return [
      attacks.apgd(eps=0.1, steps=5, restarts=2),
      attacks.apgd_t(eps=0.1, steps=5, num_targets=3),
      attacks.fab(eps=0.1, steps=5, num_targets=2),
      attacks.square(eps=0.1, queries=30),
  ]


def test_results_depend_neither_on_the_batch_nor_on_the_chunk_size(problem, random_suite):
  model, x, y = problem
  kwargs = dict(eps=0.1, key=jax.random.key(3), progress=False, run_diagnostics=False)
  whole = attacks.evaluate(model, x, y, random_suite, batch_size=50, chunk_size=50, **kwargs)
  small = attacks.evaluate(model, x, y, random_suite, batch_size=16, chunk_size=5, **kwargs)
  np.testing.assert_array_equal(whole.stage_flags, small.stage_flags)
  assert whole.robust_accuracy[0] < whole.clean_accuracy  # the attacks break points
  assert whole.robust_accuracy[0] > 0  # and leave some: every stage runs


def test_a_raw_key_gives_the_typed_keys_results(problem, random_suite):
  model, x, y = problem
  kwargs = dict(eps=0.1, batch_size=25, progress=False, run_diagnostics=False)
  typed = attacks.evaluate(model, x, y, random_suite[:1], key=jax.random.key(5), **kwargs)
  raw = attacks.evaluate(model, x, y, random_suite[:1], key=jax.random.PRNGKey(5), **kwargs)
  np.testing.assert_array_equal(typed.stage_flags, raw.stage_flags)


def test_runs_go_only_over_the_chunks_holding_robust_points():
  """A stage's run is called once per chunk holding a robust point, never on the rest."""
  calls = []

  def run_one(logits_fn, x, y, key, eps, r, live):
    jax.debug.callback(lambda r_, live_: calls.append((int(r_), int(live_.sum()))), r, live)
    return x

  counting = core.make_attack(lambda *a: a[1], name="counting", eps=0.1, runs=2, run_one=run_one)
  w = np.eye(3, dtype=np.float32)
  x = np.tile(np.eye(3, dtype=np.float32), (10, 1))  # 30 points, argmax = row % 3
  y = (np.arange(30) % 3).astype(np.int32)
  y[:21] = (y[:21] + 1) % 3  # 21 misclassified: 9 robust
  _, _, robust = run_stages([counting],
                            lambda v: v @ w,
                            jnp.asarray(x),
                            jnp.asarray(y),
                            jax.random.key(0),
                            jnp.full((30,), 0.1),
                            chunk_size=4)
  jax.effects_barrier()
  # 9 robust points in chunks of 4: 3 chunks (4, 4, 1 live) of 8, for each of the 2 runs.
  assert sorted(calls) == sorted([(r, c) for r in range(2) for c in (4, 4, 1)])
  assert int(robust.sum()) == 9


def test_a_cascade_is_an_attack_returning_the_first_adversarial_point(problem, suite):
  model, x, y = problem
  both = cascade(suite)
  assert isinstance(both, Cascade) and both.name == "fgsm+pgd5" and both.eps == 0.1
  x_adv = np.asarray(both(model, x, y, jax.random.key(0), eps=0.08))
  assert np.abs(x_adv - x).max() <= 0.08 + 1e-6
  fgsm_adv = np.asarray(suite[0](model, x, y, jax.random.key(0), eps=0.08))
  pgd_adv = np.asarray(suite[1](model, x, y, jax.random.key(0), eps=0.08))
  correct = predict(model, x) == y
  by_fgsm = correct & (predict(model, fgsm_adv) != y)
  np.testing.assert_array_equal(x_adv[~correct], x[~correct])  # x is already adversarial
  np.testing.assert_array_equal(x_adv[by_fgsm], fgsm_adv[by_fgsm])  # first success kept
  rest = correct & ~by_fgsm
  np.testing.assert_array_equal(x_adv[rest], pgd_adv[rest])
  assert (predict(model, x_adv)
          != y).sum() == ((~correct) | by_fgsm | (predict(model, pgd_adv) != y)).sum()


def test_resuming_an_interrupted_run_gives_the_uninterrupted_result(problem, suite, tmp_path):
  model, x, y = problem
  kwargs = dict(eps=[0.05, 0.1],
                key=jax.random.key(3),
                batch_size=8,
                progress=False,
                run_diagnostics=False)
  reference = attacks.evaluate(model, x, y, suite, **kwargs)

  def interrupt(done, total):
    assert total == 7
    if done == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    attacks.evaluate(model, x, y, suite, state_dir=str(tmp_path), callback=interrupt, **kwargs)
  seen = []
  resumed = attacks.evaluate(model,
                             x,
                             y,
                             suite,
                             state_dir=str(tmp_path),
                             callback=lambda done, total: seen.append(done),
                             **kwargs)
  assert resumed.resumed_from_batch == 3
  assert seen == [4, 5, 6, 7]  # only the missing batches were computed
  np.testing.assert_array_equal(resumed.stage_flags, reference.stage_flags)
  np.testing.assert_array_equal(resumed.clean_flags, reference.clean_flags)
  # Another epsilon (or key, data, model, suite) is another evaluation: no resume.
  other = attacks.evaluate(model,
                           x,
                           y,
                           suite,
                           state_dir=str(tmp_path),
                           **{
                               **kwargs, "eps": [0.05, 0.2]
                           })
  assert other.resumed_from_batch == 0
  changed = Counted(seed=5)
  assert attacks.evaluate(changed, x, y, suite, state_dir=str(tmp_path),
                          **kwargs).resumed_from_batch == 0
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_report_serializes_and_plots(problem, suite, tmp_path):
  model, x, y = problem
  path = tmp_path / "sweep.png"
  report = attacks.evaluate(model,
                            x,
                            y,
                            suite,
                            eps=[0.02, 0.1],
                            key=jax.random.key(0),
                            batch_size=25,
                            progress=False,
                            run_diagnostics=False,
                            plot_path=str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  content = json.loads(report.to_json())
  assert content["eps"] == [0.02, 0.1] and content["stage_names"] == ["fgsm", "pgd5"]
  assert np.array_equal(np.asarray(content["robust_flags"], bool), report.robust_flags)
  assert content["robust_accuracy"] == list(report.robust_accuracy)
  table = report.table()
  assert "after fgsm" in table and f"{report.robust_accuracy[1]:.2%}" in table


def test_progress_logs_rate_and_eta(problem, suite, caplog):
  model, x, y = problem
  with caplog.at_level("INFO", logger="attacks.evaluation"):
    attacks.evaluate(model,
                     x,
                     y,
                     suite,
                     eps=0.1,
                     key=jax.random.key(0),
                     batch_size=25,
                     progress=False,
                     run_diagnostics=False)
  lines = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
  assert len(lines) == 2 and "ex/s" in lines[-1] and "ETA" in lines[-1] and "2/2" in lines[-1]


@pytest.mark.parametrize("bad, match", [
    (dict(eps=-0.1), "eps"),
    (dict(norm="l2"), "norm"),
    (dict(suite="pgd"), "suite"),
    (dict(suite=[]), "suite"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_are_errors(problem, suite, bad, match):
  model, x, y = problem
  kwargs = dict(eps=0.1, key=jax.random.key(0), progress=False, suite=suite)
  kwargs.update(bad)
  with pytest.raises(InputError, match=match):
    attacks.evaluate(model, x, y, **kwargs)


def test_targeted_attacks_and_mixed_norms_cannot_form_a_cascade():
  targeted = core.make_attack(lambda *a: a[1], name="t", eps=0.1, targeted=True)
  with pytest.raises(InputError, match="untargeted"):
    cascade([sign_attack(), targeted])
  with pytest.raises(InputError, match="norm"):
    cascade([sign_attack(), sign_attack(norm="l2")])


def test_too_few_classes_is_an_error_before_any_work(problem):
  _, x, y = problem
  two = Counted(num_classes=2)
  needs_three = sign_attack(name="dlr_attack", min_classes=3)
  with pytest.raises(InputError, match="dlr_attack needs >= 3"):
    attacks.evaluate(two,
                     x,
                     y % 2, [needs_three],
                     eps=0.1,
                     key=jax.random.key(0),
                     progress=False,
                     callback=pytest.fail)


# ----------------------------------------------------------------------------
# Diagnostics.


def _warnings_of(model, x, y, stages):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    messages = attacks.diagnose(model, x, y, stages)
  assert [str(w.message) for w in caught if w.category is attacks.AttackWarning] == list(messages)
  return messages


def test_a_plain_model_raises_no_warning(problem, suite):
  model, x, y = problem
  assert _warnings_of(model, x[:16], y[:16], suite) == ()


def test_probabilities_are_flagged(problem, suite):
  _, x, y = problem
  probs = Counted(transform=jax.nn.softmax)
  messages = _warnings_of(probs, x[:16], y[:16], suite)
  assert any("probabilities" in m for m in messages)


def test_zero_gradients_are_flagged(problem, suite):
  _, x, y = problem
  flat = Counted(transform=lambda z: jnp.round(z))  # piecewise constant: zero gradient
  messages = _warnings_of(flat, x[:16], y[:16], suite)
  assert any("16 of 16 examples" in m and "zero input gradient" in m for m in messages)


def test_a_model_depending_on_its_batch_is_flagged(problem, suite):
  _, x, y = problem
  base = Counted()

  def batch_normed(v):  # normalized with the batch's statistics, as BatchNorm in training
    z = base(v)
    return (z - z.mean(axis=0)) / (z.std(axis=0) + 1e-3)

  messages = _warnings_of(batch_normed, x[:16], y[:16], suite)
  assert any("depend on the other inputs of its batch" in m for m in messages)
  assert not diagnostics.check_dynamic(base, x[:16])


def test_a_randomized_model_is_flagged(problem, suite):
  _, x, y = problem
  rng = np.random.default_rng(0)
  base = Counted()

  def noisy(v):  # fresh noise on every call, eager or jitted (a host callback)
    noise = jax.pure_callback(
        lambda shape_arr: rng.normal(size=(v.shape[0], NUM_CLASSES)).astype(np.float32),
        jax.ShapeDtypeStruct((v.shape[0], NUM_CLASSES), jnp.float32), jax.lax.stop_gradient(v))
    return base(v) + noise

  messages = _warnings_of(noisy, x[:16], y[:16], suite)
  assert any("randomized" in m for m in messages)


def test_a_gradient_free_attack_beating_the_white_box_ones_is_flagged(problem):
  model, x, y = problem
  # A white-box stage that does nothing, then a "square" that breaks points.
  masked_suite = [identity_attack("apgd-ce"), sign_attack(3, name="square")]
  with pytest.warns(attacks.AttackWarning, match="square, a gradient-free attack"):
    report = attacks.evaluate(model,
                              x,
                              y,
                              masked_suite,
                              eps=[0.0, 0.1],
                              key=jax.random.key(0),
                              progress=False)
  assert len(report.warnings) == 1 and report.warnings[0].startswith("eps=0.1")
  assert diagnostics.check_gradient_masking(["pgd", "square"], [0.5, 0.5], 0.9) == []
  assert diagnostics.check_gradient_masking(["square", "pgd"], [0.5, 0.4], 0.9) == []


# ----------------------------------------------------------------------------
# AutoAttack and the script.


def test_autoattack_is_the_standard_cascade():
  suite = attacks.autoattack(eps=0.1)
  assert isinstance(suite, Cascade) and suite.name == "autoattack"
  assert len(suite.stages) == 4 and suite.norm == "linf" and suite.eps == 0.1
  assert suite.min_classes >= 4  # targeted DLR
  with pytest.raises(InputError, match="version"):
    attacks.autoattack(eps=0.1, version="custom")


def test_autoattack_plus_is_the_originals_six_stages():
  suite = attacks.autoattack(eps=0.1, version="plus")
  assert suite.name == "autoattack-plus"
  assert [s.name for s in suite.stages
         ] == ["apgd-ce", "apgd-dlr", "fab-linf", "square-linf", "apgd-t", "fab-t-linf"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  return attack_models.trained_digits_mlp(tmp_path_factory)


def _script(*args):
  return subprocess.run([sys.executable, "-m", "attacks.evaluate", *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True)


def test_script_evaluates_a_training_run_end_to_end(trained_run, tmp_path):
  out = _script(f"--workdir={trained_run}", f"--output_dir={tmp_path}", "--suite=fgsm,pgd",
                "--eps=0,0.05,0.1", "--num_examples=60", "--batch_size=32")
  assert out.returncode == 0, out.stderr[-3000:]
  content = json.loads((tmp_path / "attacks.json").read_text())
  assert content["eps"] == [0.0, 0.05, 0.1] and content["num_examples"] == 60
  assert content["stage_names"] == [attacks.fgsm(eps=0.1).name, attacks.pgd(eps=0.1).name]
  clean, robust = content["clean_accuracy"], content["robust_accuracy"]
  assert clean > 0.8 and robust[0] == clean and robust[2] < clean
  assert len(content["robust_flags"]) == 3 and len(content["robust_flags"][0]) == 60
  assert (tmp_path / "attacks.png").read_bytes()[:4] == b"\x89PNG"
  assert os.listdir(tmp_path / "attacks_state")  # resumable state was kept
  assert "clean" in out.stdout and f"{robust[2]:.2%}" in out.stdout


def test_script_reads_a_curve_from_a_minimum_norm_attack(trained_run, tmp_path):
  out = _script(f"--workdir={trained_run}", f"--output_dir={tmp_path}", "--suite=fmn", "--norm=l2",
                "--eps=0,0.5,1,2", "--num_examples=40")
  assert out.returncode == 0, out.stderr[-3000:]
  content = json.loads((tmp_path / "attacks.json").read_text())
  assert content["stage_names"] == ["fmn-t-l2"] and len(content["distances"]) == 40
  distances = np.asarray([np.inf if d is None else d for d in content["distances"]])
  expected = [np.mean(distances > e) for e in (0, 0.5, 1, 2)]
  np.testing.assert_allclose(content["robust_accuracy"], expected)
  assert content["robust_accuracy"][0] == content["clean_accuracy"] > content["robust_accuracy"][3]


def test_script_reports_user_errors_in_one_line(trained_run):
  out = _script(f"--workdir={trained_run}", "--suite=fgsm,nonsense", "--eps=0.1")
  assert out.returncode == 2 and "unknown attack 'nonsense'" in out.stderr
  assert "Traceback" not in out.stderr


def test_evaluating_a_directory_without_a_run_is_an_error(tmp_path):
  from robustlib.checkpoints import CheckpointError  # pylint: disable=import-outside-toplevel
  with pytest.raises(CheckpointError, match="config.json"):
    attacks.evaluation.evaluate_run(str(tmp_path), suite="fgsm", eps=[0.1])

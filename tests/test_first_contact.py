"""What a new user meets first: every script's bad flag is one line and status 2, every
public function's bad argument an `InputError` naming it, and the names of the house
hide nothing."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attacks
import robustlib
import verify
from robustlib import checkpoints, data, jax_internals, models, scripts
from robustlib.checks import InputError

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])

# Every script, with a bad command line and what its one line of error must say.
SCRIPTS = [
    ("training.train",
     ["--config=training/configs/digits_mlp.py", "--workdir={tmp}/run",
      "--config.num_stepz=3"], "unknown config field 'num_stepz'"),
    ("training.train", ["--config=training/configs/no_such.py",
                        "--workdir={tmp}/run"], "no such file 'training/configs/no_such.py'"),
    ("training.train", ["--config=training/configs/digits_mlp.py",
                        "--workdir={tmp}/a_file"], "is a file, not a directory"),
    ("training.train", ["--config=training/configs/digits_mlp.py",
                        "--workdir={tmp}/garbage"], "config.json is damaged"),
    ("attacks.evaluate", ["--workdir={tmp}/run", "--eps=a,b"], "--eps must be numbers"),
    ("attacks.evaluate", ["--workdir={tmp}/nothing_here"], "config.json is missing"),
    ("verify.certify", ["--workdir={tmp}/garbage"], "config.json is damaged"),
    ("verify.vnncomp", ["--onnx=a.onnx", "--vnnlib=b.vnnlib",
                        "--timeout=-1"], "timeout must be a number of seconds > 0"),
    ("verify.fuzz", ["--no_such_flag=1"], "no_such_flag"),
    ("benchmarks.accelerator", ["--models=alexnet"], "--models takes names among mlp"),
    ("benchmarks.attack_speed", ["--models=foo"], "--models takes names among mlp"),
    ("benchmarks.autoattack_speed", ["--models=foo"], "--models takes names among"),
    ("benchmarks.bab_attack_strength", ["--model=foo"], "value should be one of"),
    ("benchmarks.bab_families", ["--families=foo"], "--families takes names among"),
    ("benchmarks.bab_families", ["--out_dir=x",
                                 "--calibrate_radii=a"], "--calibrate_radii takes radii >= 0"),
    ("benchmarks.bab_throughput", ["--model=foo"], "value should be one of"),
    ("benchmarks.bound_speed", ["--methods=lp"], "--methods takes names among ibp"),
    ("benchmarks.curves", ["--no_such_flag=1"], "no_such_flag"),
    ("benchmarks.leaderboard", ["--no_such_flag=1"], "no_such_flag"),
    ("benchmarks.train_throughput", ["--methods=foo"], "--methods takes names among standard"),
]


def _start(module: str, args: list[str]) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m", module, *args],
                          cwd=REPO_ROOT,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("first_contact")
  (tmp / "a_file").write_text("not a directory")
  (tmp / "garbage").mkdir()
  (tmp / "garbage" / "config.json").write_text("{ this is not json")
  (tmp / "garbage" / "checkpoints").mkdir()
  (tmp / "garbage" / "checkpoints" / "10").mkdir()
  (tmp / "run").mkdir()
  (tmp / "run" / "config.json").write_text(json.dumps({"model": "mlp", "dataset": "digits"}))
  return tmp


@pytest.mark.parametrize("module,args,message",
                         SCRIPTS,
                         ids=[f"{m}:{a[-1]}" for m, a, _ in SCRIPTS])
def test_every_script_gives_one_line_and_status_2_on_bad_input_and_0_on_help(
    workdirs, module, args, message):
  bad = _start(module, [a.format(tmp=workdirs) for a in args])
  helped = _start(module, ["--help"])
  out, err = bad.communicate(timeout=300)
  lines = [line for line in err.splitlines() if line.strip()]
  assert bad.returncode == 2, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("see --help"), err
  assert message in lines[0], lines[0]
  assert not out.strip()
  help_out, help_err = helped.communicate(timeout=300)
  assert helped.returncode == 0, help_err[-2000:]
  assert "--" in help_out


def test_train_config_help_lists_every_field_with_its_value():
  proc = _start("training.train",
                ["--config=training/configs/mnist_pgd_cnn_small.py", "--config_help"])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "--config.robust.eps=0.3" in out.splitlines()
  assert "--config.optimizer.learning_rate=0.001" in out.splitlines()
  assert len(out.splitlines()) > 50


def test_a_missing_optional_dependency_names_the_extra():
  with pytest.raises(app.UsageError, match=r'pip install "robustlib\[bench\]"'):
    scripts.require("robustlib_no_such_module")
  scripts.require("numpy")  # installed: nothing happens


# ----------------------------------------------------------------------------------------------
# The API.

FN = lambda x: x.reshape(x.shape[0], -1)[:, :10] * 3.0  # pylint: disable=unnecessary-lambda-assignment
X = np.full((4, 28, 28, 1), 0.5, np.float32)
Y = np.array([0, 1, 2, 3])
MLP = models.create("mlp", num_classes=10, input_shape=(28, 28, 1))
PGD = attacks.pgd(eps=0.1, steps=2)

BAD_CALLS = {
    "key None": (lambda: PGD(FN, X, Y, None), "key must be a PRNG key"),
    "key float": (lambda: PGD(FN, X, Y, 0.5), "key must be a PRNG key"),
    "key of another shape": (lambda: PGD(FN, X, Y, np.zeros(3, np.uint32)), "key must be"),
    "empty batch": (lambda: PGD(FN, X[:0], Y[:0], 0), "x holds no examples"),
    "logits_fn returns a tuple": (lambda: PGD(lambda z:
                                              (FN(z), 1), X, Y, 0), "it returned a tuple"),
    "logits_fn returns None": (lambda: PGD(lambda z: None, X, Y, 0), "it returned None"),
    "evaluate empty":
        (lambda: attacks.evaluate(FN, X[:0], Y[:0], PGD, key=0), "at least one example"),
    "data.load(None)": (lambda: data.load(None, "test"), "must be a string, got None"),
    "normalize std 0": (lambda: robustlib.normalize(0.5, 0.0), "std must be positive"),
    "normalize lengths": (lambda: robustlib.normalize([0.5, 0.5], [1.0, 1.0, 1.0]), "equal length"),
    "accuracy labels >= K":
        (lambda: robustlib.accuracy(FN, X, np.array([0, 1, 2, 12])), r"y must lie in \[0, 10\)"),
    "create num_classes 0": (lambda: models.create("mlp", num_classes=0, input_shape=(28, 28, 1)),
                             "num_classes must be an integer >= 1"),
    "create unknown model":
        (lambda: models.create("resnet50", num_classes=10, input_shape=(28, 28, 1)), "unknown model"
        ),
    "create unknown option":
        (lambda: models.create("mlp", num_classes=10, input_shape=(28, 28, 1), dropout=0.5),
         "unknown options"),
    "init key None": (lambda: models.init(MLP, None, (28, 28, 1)), "key must be a PRNG key"),
    "as_logits_fn other variables": (lambda: robustlib.as_logits_fn(
        MLP,
        models.init(models.create("mlp", num_classes=5, input_shape=(28, 28, 1)), 0, (28, 28, 1)))
                                     (X), "the variables do not fit the MLP model"),
    "compose a number": (lambda: robustlib.compose(FN, 3), "argument 1 is a int"),
    "crown chunk_size 0": (lambda: verify.crown(FN, verify.linf_ball(X, 0.1), chunk_size=0),
                           "chunk_size must be an integer >= 1"),
    "attack eps -1": (lambda: attacks.pgd(eps=-1.0), "eps must be finite and >= 0"),
    "attack steps 0": (lambda: attacks.pgd(eps=0.1, steps=0), "steps must be an integer >= 1"),
    "attack norm": (lambda: attacks.apgd(eps=0.1, norm="l7"), "norm must be one of"),
    "square queries 0": (lambda: attacks.square(eps=0.1, queries=0), "queries must be"),
    "empty cascade": (lambda: attacks.cascade([]), "non-empty list of attacks"),
    "linf_ball eps -1": (lambda: verify.linf_ball(X, -1.0), "eps must be >= 0"),
    "certify method": (lambda: verify.certify(FN, X, Y, 0.1, method="lp"), "method must be one"),
    "margin_spec one class": (lambda: verify.margin_spec(np.array([0]), 1), "num_classes"),
    "decide timeout 0": (lambda: verify.decide(FN, (28, 28, 1), None, 0.0), "timeout must be"),
    "falsify steps 0": (lambda: verify.falsify(FN, X[0] - 0.1, X[0] + 0.1, None, 0, steps=0),
                        "steps must be an integer >= 1"),
    "falsify key None": (lambda: verify.falsify_runs(FN, X[0] - 0.1, X[0] + 0.1, None, None),
                         "key must be a PRNG key"),
    "bab_attack key None":
        (lambda: verify.bab_attack(FN, X[0].ravel(), 0, 0.1, None), "key must be a PRNG key"),
    "bab_attack time 0": (lambda: verify.bab_attack(FN, X[0].ravel(), 0, 0.1, 0, time_limit=0),
                          "time_limit and dive_limit must be positive"),
    "eot samples 0": (lambda: attacks.eot(PGD, samples=0), "samples must be an integer >= 1"),
    "transfer onto a number": (lambda: attacks.transfer(PGD, 3), "surrogate must be a logits_fn"),
}

FACTORIES = [
    "fgsm", "pgd", "apgd", "apgd_t", "multitargeted", "fab", "fmn", "spsa", "square", "autoattack"
]


@pytest.mark.parametrize("name", FACTORIES)
def test_every_attack_factory_refuses_a_negative_radius_and_an_unknown_norm(name):
  factory = getattr(attacks, name)
  with pytest.raises(InputError, match="eps must be"):
    factory(eps=-1.0)
  with pytest.raises(InputError, match="norm must be one of"):
    factory(eps=0.1, norm="l7")


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_every_public_function_refuses_a_bad_argument_with_an_input_error(name):
  call, message = BAD_CALLS[name]
  with pytest.raises(InputError, match=message):
    call()


def test_an_int_seed_is_a_key_everywhere():
  key = jax.random.key(3)
  assert np.array_equal(PGD(FN, X, Y, 3), PGD(FN, X, Y, key))
  assert np.array_equal(PGD(FN, X, Y, jax.random.PRNGKey(3)), PGD(FN, X, Y, key))
  by_seed = models.init(MLP, 3, (28, 28, 1))
  by_key = models.init(MLP, key, (28, 28, 1))
  assert all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(by_seed), jax.tree.leaves(by_key)))
  report = attacks.evaluate(FN, X, Y, PGD, key=3, progress=False)
  assert report.robust_accuracy is not None


def test_an_attack_called_on_probabilities_warns():
  with pytest.warns(UserWarning, match="look like probabilities"):
    PGD(lambda z: jax.nn.softmax(FN(z)), X, Y, 0)


# ----------------------------------------------------------------------------------------------
# Runs on disk.


def test_a_garbage_or_foreign_config_json_is_a_checkpoint_error(tmp_path):
  (tmp_path / "config.json").write_text("{ not json")
  with pytest.raises(checkpoints.CheckpointError, match="config.json is damaged"):
    checkpoints.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(checkpoints.CheckpointError, match="not a training run's config"):
    checkpoints.read_config(str(tmp_path))


def test_a_byte_flipped_step_is_refused_by_its_checksum_and_the_one_before_is_loaded(tmp_path):
  variables = models.init(MLP, 0, (28, 28, 1))
  mngr = checkpoints.manager(str(tmp_path))
  checkpoints.write_config(str(tmp_path), {"model": "mlp", "dataset": "mnist"})
  for step, scale in ((1, 1.0), (2, 2.0)):
    tree = {"weights": jax.tree.map(lambda v, s=scale: v * s, variables["params"])}
    checkpoints.save(mngr, step, tree, {"params": "weights"})
  # Flip bytes in the middle of every data file of step 2: the files still parse.
  for path in (tmp_path / "checkpoints" / "2").rglob("*"):
    if path.is_file() and path.parent.name == "d" and path.stat().st_size > 4096:
      raw = bytearray(path.read_bytes())
      raw[len(raw) // 2] ^= 0x10
      path.write_bytes(bytes(raw))
  with pytest.raises(checkpoints.CheckpointError,
                     match="step 2 .* is damaged: its arrays' checksum"):
    checkpoints.restore_on(mngr, 2, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  _, _, loaded = checkpoints.load_run(str(tmp_path))
  assert all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(variables["params"])))


def test_an_unusable_or_missing_step_asked_for_by_number_is_one_clear_error(tmp_path):
  variables = models.init(MLP, 0, (28, 28, 1))
  checkpoints.write_config(str(tmp_path), {"model": "mlp", "dataset": "mnist"})
  checkpoints.save(checkpoints.manager(str(tmp_path)), 3, {"params": variables["params"]})
  with pytest.raises(checkpoints.CheckpointError, match=r"no step 4 .*; it holds \[3\]"):
    checkpoints.load_run(str(tmp_path), step=4)
  for path in (tmp_path / "checkpoints" / "3").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:100])  # truncated
  with pytest.raises(checkpoints.CheckpointError,
                     match="step 3 .* is unusable: it does not restore"):
    checkpoints.load_run(str(tmp_path), step=3)


def test_the_checksum_sees_one_flipped_bit_in_any_leaf_and_dtype():
  tree = {
      "w": jnp.linspace(-1, 1, 1000),
      "i": jnp.arange(7),
      "b": jnp.ones((3,), jnp.bfloat16),
      "k": jax.random.key(0),
      "m": jnp.array([True, False])
  }
  base = int(checkpoints.checksum(tree))
  for name in tree:
    bits = np.asarray(jax.random.key_data(tree[name]) if name == "k" else tree[name]).copy()
    flat = bits.reshape(-1).view(np.uint8)
    flat[-1] ^= 0x01
    changed = dict(tree)
    changed[name] = jax.random.wrap_key_data(bits) if name == "k" else jnp.asarray(bits)
    assert int(checkpoints.checksum(changed)) != base, name


def test_load_run_reads_which_fields_to_evaluate_from_the_run_not_from_names(tmp_path):
  """The run format: a step's metadata maps the model's collections to its fields."""
  variables = models.init(MLP, 0, (28, 28, 1))
  doubled = jax.tree.map(lambda v: 2 * v, variables["params"])
  checkpoints.write_config(str(tmp_path), {"model": "mlp", "dataset": "mnist"})
  mngr = checkpoints.manager(str(tmp_path))
  checkpoints.save(mngr, 5, {
      "raw": variables["params"],
      "averaged": doubled
  }, {"params": "averaged"})
  _, _, loaded = checkpoints.load_run(str(tmp_path))
  assert all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(doubled)))
  checkpoints.save(mngr, 6, {"raw": variables["params"]}, {"params": "averaged"})
  with pytest.raises(checkpoints.CheckpointError, match="does not hold the model's variables"):
    checkpoints.load_run(str(tmp_path), step=6)


def test_no_module_of_robustlib_knows_the_training_states_fields():
  for path in pathlib.Path(REPO_ROOT, "robustlib").rglob("*.py"):
    text = path.read_text()
    for field in ("ema_params", "ema_batch_stats", "opt_state"):
      assert field not in text, f"{path} names the train state's field {field}"


# ----------------------------------------------------------------------------------------------
# Names.

# Names that hold the same job wherever they are: a package's own exception types.
SAME_JOB = {"errors"}


def test_no_two_modules_share_a_name_for_different_jobs():
  names = {}
  for package in ("robustlib", "attacks", "verify", "training"):
    for path in pathlib.Path(REPO_ROOT, package).rglob("*.py"):
      if path.name != "__init__.py" and "configs" not in path.parts:
        names.setdefault(path.stem, []).append(str(path.relative_to(REPO_ROOT)))
  shared = {n: p for n, p in names.items() if len(p) > 1 and n not in SAME_JOB}
  assert not shared, shared


def test_a_module_and_the_function_of_its_name_are_both_reachable():
  import verify.certify  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import verify.crown  # pylint: disable=import-outside-toplevel
  box = verify.linf_ball(X[:1], 0.01)
  assert callable(verify.certify) and callable(verify.crown.crown_ibp)
  assert np.allclose(verify.crown(FN, box).lower, verify.crown.crown(FN, box).lower)
  assert np.asarray(verify.certify(FN, X[:1], Y[:1], 0.01, method="ibp")).shape == (1,)
  assert attacks.pgd.pgd is not None and attacks.pgd(eps=0.1).name == "pgd"


def test_the_private_jax_name_still_exists_and_answers():
  """`jax_internals.at_top_level` reads one private JAX name: an upgrade that drops it must
  fail here, not silently make every call look nested."""
  assert jax_internals._trace_state_clean is not None  # pylint: disable=protected-access
  assert jax_internals.at_top_level()
  seen = {}

  def probe(name):  # a new function each time: a traced one is cached across transformations

    def fn(x):
      seen[name] = jax_internals.at_top_level()
      return x

    return fn

  jax.jit(probe("jit"))(1.0)
  jax.vmap(probe("vmap"))(jnp.ones(2))
  jax.grad(probe("grad"))(1.0)
  jax.eval_shape(probe("eval_shape"), 1.0)
  assert seen == {"jit": False, "vmap": False, "grad": False, "eval_shape": False}

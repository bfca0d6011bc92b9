"""``evaluate``: the robust accuracy of a model under an attack, a cascade of
attacks or AutoAttack, over a data set, for one epsilon or a sweep.

The data is cut into fixed-size batches (the last one padded, padded rows
masked) and each batch goes through one jitted function whose epsilon is a
traced argument, so a whole sweep compiles once. After each batch the
per-example results so far can be written atomically to ``state_dir``; a rerun
with the same suite, epsilons, key, batch size, data and model resumes there.

Example::

  report = attacks.evaluate(logits_fn, x, y, attacks.autoattack(eps=0.3),
                            eps=[0.1, 0.2, 0.3], key=jax.random.key(0))
  print(report.table())
  report.robust_accuracy        # (E,) overall robust accuracy per epsilon
  report.stage_accuracy         # (E, S) after each attack of the cascade
  report.robust_flags           # bool [E, N]

A minimum-norm attack alone (`attacks.fmn`, `attacks.fab`) runs once, unbounded:
each example's smallest adversarial perturbation found (``report.distances``)
gives the robust accuracy at every epsilon of the sweep, and the plot draws the
whole curve::

  report = attacks.evaluate(logits_fn, x, y, attacks.fmn(norm="l2"),
                            eps=np.linspace(0, 3, 31), key=jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from attacks import core
from attacks import diagnostics
from attacks.autoattack import cascade, flatten, run_stages
from robustlib import compilation
from robustlib import parallel
from robustlib import plotting
from robustlib.checks import InputError, as_key, check_images, check_labels
from robustlib.batching import pad_to_multiple
from robustlib.pipelines import check_logits_fn

_LOG = logging.getLogger(__name__)
STATE_VERSION = 3


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
  """What :func:`evaluate` measured. ``E`` epsilons, ``S`` stages, ``N`` examples.

  Attributes:
    suite: the suite's name.
    norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"``.
    eps: the epsilons ``(E,)``.
    stage_names: the cascade's attacks in order ``(S,)``.
    num_examples: ``N``.
    clean_accuracy: accuracy on the unperturbed inputs.
    robust_accuracy: ``(E,)`` fraction of examples correct and unbroken by every
      attack, per epsilon.
    stage_accuracy: ``(E, S)`` robust accuracy after each stage (non-increasing
      along a row; the last column is ``robust_accuracy``).
    clean_flags: bool ``[N]``, correctly classified.
    robust_flags: bool ``[E, N]``, robust against the whole suite.
    stage_flags: bool ``[E, S, N]``, still robust after each stage.
    seconds: wall time of this call.
    resumed_from_batch: batches read from a saved state instead of computed.
    warnings: the diagnostics' messages (also emitted as ``AttackWarning``).
    distances: for a minimum-norm attack run unbounded, ``[N]`` the norm of the
      smallest adversarial perturbation found per example (0 where ``x`` is
      misclassified, ``inf`` where none was found); robust at epsilon means
      correct with a distance above it. None for a fixed-epsilon suite.
  """
  suite: str
  norm: str
  eps: tuple[float, ...]
  stage_names: tuple[str, ...]
  num_examples: int
  clean_accuracy: float
  robust_accuracy: tuple[float, ...]
  stage_accuracy: tuple[tuple[float, ...], ...]
  clean_flags: np.ndarray
  robust_flags: np.ndarray
  stage_flags: np.ndarray
  seconds: float
  resumed_from_batch: int = 0
  warnings: tuple[str, ...] = ()
  distances: np.ndarray | None = None

  def to_dict(self, flags: bool = True) -> dict:
    """Plain values (lists, floats, strings) ready for ``json.dump``.

    Args:
      flags: include the per-example flags (``N`` and ``E * S * N`` booleans, as
        0/1 integers).
    """
    out = {
        "suite": self.suite,
        "norm": self.norm,
        "eps": list(self.eps),
        "stage_names": list(self.stage_names),
        "num_examples": self.num_examples,
        "clean_accuracy": self.clean_accuracy,
        "robust_accuracy": list(self.robust_accuracy),
        "stage_accuracy": [list(row) for row in self.stage_accuracy],
        "seconds": self.seconds,
        "resumed_from_batch": self.resumed_from_batch,
        "warnings": list(self.warnings),
    }
    if self.distances is not None:
      out["minimal_distance_quantiles"] = {
          f"{q:g}": _finite_or_none(np.quantile(self.distances, q, method="inverted_cdf"))
          for q in (0.1, 0.25, 0.5)
      }
    if flags:
      if self.distances is not None:
        out["distances"] = [_finite_or_none(d) for d in self.distances]
      out["clean_flags"] = self.clean_flags.astype(int).tolist()
      out["robust_flags"] = self.robust_flags.astype(int).tolist()
      out["stage_flags"] = self.stage_flags.astype(int).tolist()
    return out

  def to_json(self, flags: bool = True) -> str:
    """:meth:`to_dict` as a JSON string."""
    return json.dumps(self.to_dict(flags), indent=1)

  def table(self) -> str:
    """A text table: one row per epsilon; clean, after each stage, robust."""
    names = list(self.stage_names) if len(self.stage_names) > 1 else []
    header = ["eps", "clean"] + [f"after {n}" for n in names] + ["robust"]
    rows = [[f"{e:g}", f"{self.clean_accuracy:.2%}"] + [f"{a:.2%}"
                                                        for a in stages[:len(names)]] +
            [f"{robust:.2%}"]
            for e, stages, robust in zip(self.eps, self.stage_accuracy, self.robust_accuracy)]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
  """JSON has no infinity: ``None`` stands for "no adversarial point found"."""
  return float(value) if np.isfinite(value) else None


def _evaluate_batch(stages, logits_fn, chunk_size, x, y, valid, index, key, eps):
  """One batch, one epsilon (traced scalar): ``(correct [B], robust [S, B])``."""
  eps = core.per_example_eps(eps, x.shape[0], x.dtype)
  _, correct, robust = run_stages(stages, logits_fn, x, y, key, eps, valid, index, chunk_size)
  return correct, robust


# Compiled once per (stages, logits_fn, chunk_size) and input shape; epsilon is traced.
evaluate_batch = compilation.jit(_evaluate_batch, static_argnums=(0, 1, 2))


def _distance_batch(attack, logits_fn, x, y, valid, index, key):
  """One batch under a minimum-norm attack run unbounded: ``(correct [B], distances [B])``,
  the distance 0 where ``x`` is misclassified (or padding). Each example draws from
  ``key`` folded with its index (one key per batch for an attack without per-example
  runs)."""
  n = x.shape[0]
  if attack.run_one is not None:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
  else:
    keys = jax.random.fold_in(key, index[0])
  fn, xw = core.widen(logits_fn, x)
  x_adv = core.round_toward(attack.run(fn, xw, y, keys, jnp.full((n,), jnp.inf, xw.dtype), None), x)
  correct = (jnp.argmax(logits_fn(x), axis=-1) == y) & valid
  dist = core.adversarial_distance(logits_fn, x, x_adv, y, attack.norm)
  return correct, jnp.where(correct, dist, 0.0)


distance_batch = compilation.jit(_distance_batch, static_argnums=(0, 1))


def _is_minimum_norm(suite: Any, minimum_norm: bool | None) -> bool:
  single = isinstance(suite, core.AttackFn) and not hasattr(suite, "stages")
  if minimum_norm is None:
    return single and suite.minimum_norm
  if minimum_norm and not (single and suite.minimum_norm):
    raise InputError("minimum_norm=True needs one minimum-norm attack (attacks.fmn, attacks.fab) "
                     f"as the suite, got {getattr(suite, 'name', type(suite).__name__)}")
  return bool(minimum_norm)


def default_chunk_size(batch_size: int) -> int:
  """Rows per chunk of a cascade's runs: half the batch, at least 32. Measured on a 2-core
  CPU (small MNIST CNN, AutoAttack, 200 points, 92 % robust): two chunks of 100 cost 2 %
  more than one of 200, four of 50 cost 20 % more; a model whose points fall early skips
  the chunks they would fill."""
  return min(batch_size, max(32, -(-batch_size // 2)))


def _check_eps_list(eps: Any, stages: Sequence[core.AttackFn]) -> tuple[float, ...]:
  if eps is None:
    values = sorted({s.eps for s in stages})
    if len(values) > 1:
      raise InputError(f"the attacks of the suite have different eps {values}; pass eps=")
    if not np.isfinite(values[0]):
      raise InputError(f"{stages[0].name} is unbounded (eps=inf): pass eps=, the radii at which "
                       "to read its robust accuracy")
    return (values[0],)
  arr = np.asarray(eps, dtype=np.float64)
  if arr.ndim > 1 or arr.size == 0:
    raise InputError(f"eps must be one value or a non-empty list of values, got {eps!r}")
  core.check_eps(arr)
  return tuple(float(e) for e in np.atleast_1d(arr))


def _describe(obj: Any, depth: int = 0) -> str:
  """A stable description of an attack's configuration, for the state fingerprint."""
  if depth > 6:
    return type(obj).__name__
  if obj is None or isinstance(obj, (bool, int, float, str, np.number)):
    return repr(obj)
  if isinstance(obj, (tuple, list)):
    return "(" + ",".join(_describe(o, depth + 1) for o in obj) + ")"
  if isinstance(obj, dict):
    return "{" + ",".join(f"{k}:{_describe(v, depth + 1)}" for k, v in sorted(obj.items())) + "}"
  if isinstance(obj, core.AttackFn):
    fields = [f.name for f in dataclasses.fields(obj)]
    return type(obj).__name__ + _describe({f: getattr(obj, f) for f in fields}, depth + 1)
  if isinstance(obj, functools.partial):
    return "partial" + _describe((obj.func, obj.args, obj.keywords), depth + 1)
  if isinstance(obj, (np.ndarray, jax.Array)) and not isinstance(obj, jax.core.Tracer):
    if obj.size <= 64 and not jnp.issubdtype(obj.dtype, jax.dtypes.prng_key):
      return f"array{np.asarray(obj).tolist()}"
    return f"array{obj.shape}{obj.dtype}"
  code = getattr(obj, "__code__", None)
  if code is not None:
    cells = []
    for cell in getattr(obj, "__closure__", None) or ():
      try:
        cells.append(_describe(cell.cell_contents, depth + 1))
      except ValueError:  # an empty cell
        cells.append("<empty>")
    defaults = _describe(getattr(obj, "__defaults__", None), depth + 1)
    return f"{obj.__module__}.{obj.__qualname__}{defaults}[{','.join(cells)}]"
  return type(obj).__name__


def _fingerprint(stages, eps, key, batch_size, x, y, first_logits) -> str:
  h = hashlib.sha256()
  for part in (f"v{STATE_VERSION}", _describe(stages), repr(eps), str(batch_size), str(x.shape),
               str(x.dtype)):
    h.update(part.encode())
    h.update(b"\0")
  h.update(np.asarray(jax.random.key_data(key)).tobytes())
  h.update(np.ascontiguousarray(x).tobytes())
  h.update(np.ascontiguousarray(y).tobytes())
  # The model: its outputs on the first batch (a changed model starts afresh).
  h.update(np.round(np.asarray(first_logits, np.float64), 4).tobytes())
  return h.hexdigest()


def _load_state(path: str, fingerprint: str):
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as state:
      if str(state["fingerprint"]) != fingerprint:
        return None
      return (int(state["done"]), state["clean"].copy(), state["stages"].copy(),
              state["distances"].copy())
  except (OSError, KeyError, ValueError) as e:
    _LOG.warning("ignoring unreadable evaluation state %s (%s)", path, e)
    return None


def _save_state(path: str, fingerprint: str, done: int, clean: np.ndarray, stages: np.ndarray,
                distances: np.ndarray | None) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f,
             fingerprint=np.asarray(fingerprint),
             done=np.asarray(done),
             clean=clean,
             stages=stages,
             distances=np.zeros(0) if distances is None else distances)
  os.replace(tmp, path)


def _unique_names(stages: Sequence[core.AttackFn]) -> tuple[str, ...]:
  names = []
  for stage in stages:
    name, i = stage.name, 2
    while name in names:
      name, i = f"{stage.name}#{i}", i + 1
    names.append(name)
  return tuple(names)


def evaluate(logits_fn: core.LogitsFn,
             x,
             y,
             suite: Any,
             *,
             key: Any,
             eps: float | Sequence[float] | None = None,
             batch_size: int = 256,
             chunk_size: int | None = None,
             norm: str | None = None,
             plot_path: str | None = None,
             state_dir: str | None = None,
             state_every: int = 1,
             progress: bool = True,
             run_diagnostics: bool = True,
             minimum_norm: bool | None = None,
             callback: Callable[[int, int], None] | None = None,
             mesh: jax.sharding.Mesh | None = None) -> Report:
  """Robust accuracy of ``logits_fn`` on ``(x, y)`` under ``suite``.

  Each run of each attack of a cascade runs on the points still robust,
  gathered into chunks of fixed shape; a point counts as robust when it is classified correctly and no
  attack's result fools the model. With several epsilons (a sweep) the same
  compiled batch function runs for each: epsilon is a traced argument.

  Args:
    logits_fn: pure ``[N, ...] -> [N, K]``, returning logits.
    x: inputs ``[N, ...]`` inside the attacks' box.
    y: integer labels ``[N]``.
    suite: an attack, a list of attacks (a cascade) or ``attacks.autoattack(...)``;
      all untargeted, sharing one norm and box.
    key: a PRNG key (or an int seed); epsilon ``j`` uses ``fold_in(key, j)``
      and each stage draws per example from its index in ``x`` (see
      `attacks.autoattack.run_stages`), so results depend neither on resuming
      nor on the batch size.
    eps: one radius or a list; by default the suite's.
    batch_size: rows per call (the last batch is padded).
    chunk_size: rows each run of a cascade's stage works on at a time; the
      still-robust rows are gathered into as few chunks as hold them (default
      `default_chunk_size`).
    norm: if given, must be the suite's norm (a guard against mixing up units).
    plot_path: where to save a PNG of robust accuracy against epsilon.
    state_dir: directory for resumable state; a rerun with the same
      arguments, data and model resumes after the last saved batch.
    state_every: save the state every this many batches (and at the end).
    progress: show a progress bar with rate and ETA (INFO log lines are
      written either way).
    run_diagnostics: run :func:`attacks.diagnostics.diagnose` on the first batch.
    minimum_norm: run the suite, one minimum-norm attack, once unbounded and read
      every epsilon from the distances it finds (``report.distances``); by
      default whenever the suite is one such attack (`attacks.fmn`,
      `attacks.fab`). False runs it at each epsilon instead.
    callback: ``callback(batches_done, num_batches)`` after each computed batch
      (after its state is saved).
    mesh: split each batch over this mesh's devices (`robustlib.parallel.make_mesh`;
      with ``jax.distributed``, those of every process). Every process then calls
      ``evaluate`` with the same arguments and gets the whole report; per-example keys
      make the results those of one device. ``batch_size`` must split evenly over
      the mesh. With several processes only process 0 writes the plot, and each
      keeps its own resumable state.

  Returns:
    A :class:`Report`.

  Raises:
    InputError: for bad inputs, a suite that is not one, a norm mismatch, or a
      model with too few classes for an attack of the suite (before any work).
  """
  start = time.time()
  distance_mode = _is_minimum_norm(suite, minimum_norm)
  stages = flatten(suite)
  eps_list = _check_eps_list(eps, stages)
  suite_name = suite.name if isinstance(suite, core.AttackFn) else "+".join(s.name for s in stages)
  cascade(stages, eps=eps_list[0])  # validates: untargeted, one norm, one box
  if norm is not None and core.check_norm(norm, core.NORMS) != stages[0].norm:
    raise InputError(f"norm={norm!r} but the suite attacks in {stages[0].norm!r}")
  x = np.asarray(x)
  y = np.asarray(y)
  check_images(x, bounds=stages[0].bounds, name="x")
  check_labels(y, num_examples=x.shape[0], name="y")
  if x.shape[0] == 0:
    raise InputError("evaluate needs at least one example")
  batch_size = min(core.check_positive_int(batch_size, "batch_size"), x.shape[0])
  if mesh is not None:
    try:
      parallel.check_divisible(batch_size, mesh)
    except ValueError as e:
      raise InputError(str(e)) from None
  core.check_positive_int(state_every, "state_every")
  chunk = default_chunk_size(batch_size) if chunk_size is None else min(
      core.check_positive_int(chunk_size, "chunk_size"), batch_size)
  key = as_key(key)
  num_classes = check_logits_fn(logits_fn, (batch_size,) + x.shape[1:], x.dtype)
  diagnostics.check_num_classes(num_classes, stages)
  check_labels(y, num_classes=num_classes, name="y")

  n = x.shape[0]
  xp, yp = pad_to_multiple(x, batch_size), pad_to_multiple(y, batch_size)
  valid = np.arange(xp.shape[0]) < n
  num_batches = xp.shape[0] // batch_size
  names = _unique_names(stages)
  num_eps, num_stages = len(eps_list), len(stages)

  messages: tuple[str, ...] = ()
  if run_diagnostics:
    messages = diagnostics.diagnose(logits_fn, xp[:batch_size], yp[:batch_size], stages)

  clean = np.zeros(xp.shape[0], bool)
  robust = np.zeros((num_eps, num_stages, xp.shape[0]), bool)
  distances = np.zeros(xp.shape[0], np.float32) if distance_mode else None
  done = 0
  state_path = fingerprint = None
  if state_dir is not None:
    os.makedirs(state_dir, exist_ok=True)
    first_logits = compilation.jit(lambda v: logits_fn(v))(xp[:batch_size])  # pylint: disable=unnecessary-lambda
    fingerprint = _fingerprint(stages, (eps_list, distance_mode), key, batch_size, x, y,
                               first_logits)
    process = f"-process{jax.process_index()}" if jax.process_count() > 1 else ""
    state_path = os.path.join(state_dir, f"evaluate-{fingerprint[:16]}{process}.npz")
    loaded = _load_state(state_path, fingerprint)
    if loaded is not None:
      done, clean, robust, saved_distances = loaded
      if distance_mode:
        distances = saved_distances
      _LOG.info("resuming the evaluation from %s: %d of %d batches done", state_path, done,
                num_batches)
  resumed = done

  eps_arrays = [jnp.asarray(e, x.dtype) for e in eps_list]
  bar = tqdm(total=n,
             initial=min(done * batch_size, n),
             desc=suite_name,
             unit="ex",
             leave=False,
             disable=not progress)
  place = (lambda a: a) if mesh is None else functools.partial(
      parallel.place_global_batch, sharding=parallel.data_sharding(mesh))
  loop_start = time.time()
  for b in range(done, num_batches):
    rows = slice(b * batch_size, (b + 1) * batch_size)
    batch = [
        place(a)
        for a in (xp[rows], yp[rows], valid[rows], np.arange(rows.start, rows.stop, dtype=np.int32))
    ]
    if distance_mode:
      correct, dist = parallel.to_host(distance_batch(stages[0], logits_fn, *batch, key))
      clean[rows], distances[rows] = correct, dist
      for j, e in enumerate(eps_list):
        robust[j, 0, rows] = correct & (dist > e)
    else:
      outputs = parallel.to_host([
          evaluate_batch(stages, logits_fn, chunk, *batch, jax.random.fold_in(key, j), e)
          for j, e in enumerate(eps_arrays)
      ])
      clean[rows] = outputs[0][0]
      for j, (_, flags) in enumerate(outputs):
        robust[j, :, rows] = flags
    done = b + 1
    seen = min(done * batch_size, n)
    running = robust[:, -1, :seen].mean(axis=1)
    bar.set_postfix_str("robust " + " ".join(f"{a:.1%}" for a in running), refresh=False)
    bar.update(seen - bar.n)
    rate = (done - resumed) * batch_size / max(time.time() - loop_start, 1e-9)
    eta = max(n - seen, 0) / max(rate, 1e-9)
    _LOG.info("%s: batch %d/%d, robust accuracy so far %s | %.1f ex/s | ETA %.0f s", suite_name,
              done, num_batches, ", ".join(f"{a:.2%}" for a in running), rate, eta)
    if state_path is not None and (done % state_every == 0 or done == num_batches):
      _save_state(state_path, fingerprint, done, clean, robust, distances)
    if callback is not None:
      callback(done, num_batches)
  bar.close()

  clean, robust = clean[:n], robust[:, :, :n]
  clean_accuracy = float(clean.mean())
  stage_accuracy = robust.mean(axis=2)
  masking = [
      f"eps={e:g}: {m}" for e, row in zip(eps_list, stage_accuracy)
      for m in diagnostics.check_gradient_masking(names, row, clean_accuracy)
  ]
  diagnostics.warn(masking)
  messages += tuple(masking)
  report = Report(suite=suite_name,
                  norm=stages[0].norm,
                  eps=eps_list,
                  stage_names=names,
                  num_examples=n,
                  clean_accuracy=clean_accuracy,
                  robust_accuracy=tuple(float(a) for a in stage_accuracy[:, -1]),
                  stage_accuracy=tuple(tuple(float(a) for a in row) for row in stage_accuracy),
                  clean_flags=clean,
                  robust_flags=robust[:, -1, :].copy(),
                  stage_flags=robust,
                  seconds=time.time() - start,
                  resumed_from_batch=resumed,
                  warnings=messages,
                  distances=None if distances is None else distances[:n].copy())
  if plot_path is not None and jax.process_index() == 0:
    save_plot(report, plot_path)
  return report


def robustness_curve(distances: np.ndarray, eps: Sequence[float]) -> np.ndarray:
  """Robust accuracy at each of ``eps`` from per-example minimal distances ``[N]`` (0 for
  a misclassified example, ``inf`` where no adversarial point was found): the fraction
  above each radius."""
  d = np.asarray(distances, np.float64)
  return np.asarray([float(np.mean(d > e)) for e in eps])


def save_plot(report: Report, path: str) -> str:
  """Saves robust accuracy against epsilon (clean, after each stage) as a PNG; for a
  minimum-norm attack, the whole curve its distances give."""
  eps = list(report.eps)
  series = {"clean": (eps, [report.clean_accuracy] * len(eps))}
  if report.distances is not None:
    grid = np.linspace(min(eps), max(eps), 200).tolist()
    series[f"robust ({report.suite})"] = (grid, robustness_curve(report.distances, grid).tolist())
    return plotting.save_line_plots(path, {"robust accuracy": series},
                                    xlabel=f"epsilon ({report.norm})",
                                    title=f"{report.suite}, {report.num_examples} examples")
  if len(report.stage_names) > 1:
    for s, name in enumerate(report.stage_names[:-1]):
      series[f"after {name}"] = (eps, [row[s] for row in report.stage_accuracy])
  series[f"robust ({report.suite})"] = (eps, list(report.robust_accuracy))
  return plotting.save_line_plots(path, {"robust accuracy": series},
                                  xlabel=f"epsilon ({report.norm})",
                                  title=f"{report.suite}, {report.num_examples} examples")


# ----------------------------------------------------------------------------
# Suites by name, and evaluating a training run (what ``python -m attacks.evaluate``
# does).

# name -> (factory in the attacks package, keyword arguments besides eps/norm/bounds).
SUITES: dict[str, tuple[str, dict]] = {
    "fgsm": ("fgsm", {}),
    "pgd": ("pgd", {}),
    "multitargeted": ("multitargeted", {}),
    "apgd": ("apgd", {
        "loss": "ce"
    }),
    "apgd_ce": ("apgd", {
        "loss": "ce"
    }),
    "apgd_dlr": ("apgd", {
        "loss": "dlr"
    }),
    "apgd_t": ("apgd_t", {}),
    "fab": ("fab", {}),
    "fmn": ("fmn", {}),
    "square": ("square", {}),
    "spsa": ("spsa", {}),
    "autoattack": ("autoattack", {}),
    "autoattack_plus": ("autoattack", {
        "version": "plus"
    }),
    "autoattack_rand": ("autoattack", {
        "version": "rand"
    }),
}


def build_suite(spec: str | Sequence[str],
                *,
                eps: float,
                norm: str = "linf",
                bounds: Sequence[float] = (0.0, 1.0)) -> list[core.AttackFn]:
  """Attacks by name, with their factories' default settings.

  Args:
    spec: names separated by commas (``"fgsm,pgd"``: a cascade) or a list; see
      :data:`SUITES`.
    eps: the attacks' default radius (:func:`evaluate` passes its own; a
      minimum-norm attack alone runs unbounded, see :func:`evaluate`).
    norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"`` (the attacks' own support).
    bounds: the input box.

  Returns:
    The attacks, in order.
  """
  import attacks  # pylint: disable=import-outside-toplevel
  names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
  unknown = [name for name in names if name not in SUITES]
  if unknown or not names:
    raise InputError(f"unknown attack {unknown[0] if unknown else ''!r} in the suite; choose from "
                     f"{sorted(SUITES)} (a comma-separated list is a cascade)")
  suite = []
  for name in names:
    factory_name, kwargs = SUITES[name]
    factory = getattr(attacks, factory_name, None)
    if factory is None:
      raise InputError(f"attack {name!r} needs attacks.{factory_name}, which this build lacks")
    suite.append(factory(eps=eps, norm=norm, bounds=tuple(bounds), **kwargs))
  return suite


def _write_json(path: str, content: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(content, f, indent=1)
  os.replace(tmp, path)


def evaluate_run(workdir: str | None = None,
                 *,
                 onnx: str | None = None,
                 suite: str | Sequence[str],
                 eps: Sequence[float],
                 norm: str = "linf",
                 num_examples: int = 0,
                 batch_size: int = 256,
                 data_dir: str | None = None,
                 dataset: str | None = None,
                 seed: int = 0,
                 output_dir: str | None = None,
                 resume: bool = True,
                 progress: bool = True,
                 checkpoint: str = "latest") -> Report:
  """Evaluates a training run's latest checkpoint, or an ONNX network, on a test split.

  Args:
    workdir: a directory written by a training run (``config.json`` and
      ``checkpoints/``), read with ``robustlib.checkpoints.load_run``.
    onnx: instead of ``workdir``, an ONNX classifier of ``dataset``'s images
      (see `robustlib.sources`).
    suite: attack names (see :func:`build_suite`).
    eps: the radii.
    norm: ``"linf"`` or ``"l2"``.
    num_examples: the first this many test examples (0: all).
    batch_size: rows per call.
    data_dir: where the data files are (default: the run's, then
      ``ROBUSTLIB_DATA_DIR``).
    dataset: another data set with the same input shape and classes (default:
      the run's; required with ``onnx``).
    seed: seeds the attacks' PRNG key.
    output_dir: where ``attacks.json``, ``attacks.png`` and the resumable state
      (``attacks_state/``) go; default ``workdir``, or the ONNX file's folder.
    resume: keep and reuse the resumable state.
    progress: show a progress bar.
    checkpoint: the run's ``"latest"`` or ``"best"`` checkpoint (`robustlib.sources`).

  With several devices (or processes, ``jax.distributed``) each batch is split over
  all of them (`evaluate`'s ``mesh``); only process 0 writes the files.

  Returns:
    The :class:`Report`; ``attacks.json`` holds it with the run's details.
  """
  from robustlib import sources  # pylint: disable=import-outside-toplevel
  test = sources.load_test_set(workdir,
                               onnx=onnx,
                               dataset=dataset,
                               data_dir=data_dir,
                               num_examples=num_examples,
                               checkpoint=checkpoint)
  attacks_list = build_suite(suite, eps=max(eps), norm=norm)
  output_dir = output_dir or workdir or os.path.dirname(test.source)
  os.makedirs(output_dir, exist_ok=True)
  report = evaluate(test.logits_fn,
                    test.images,
                    test.labels,
                    attacks_list if len(attacks_list) > 1 else attacks_list[0],
                    key=jax.random.key(seed),
                    eps=list(eps),
                    batch_size=batch_size,
                    norm=norm,
                    plot_path=os.path.join(output_dir, "attacks.png"),
                    state_dir=os.path.join(output_dir, "attacks_state") if resume else None,
                    progress=progress,
                    mesh=parallel.make_mesh() if jax.device_count() > 1 else None)
  content = report.to_dict()
  content.update(workdir=test.source,
                 dataset=test.dataset,
                 model=test.model,
                 seed=seed,
                 batch_size=batch_size,
                 num_devices=jax.device_count())
  content[sources.CHECKPOINT_FIELD] = checkpoint if onnx is None else None
  if jax.process_index() == 0:
    _write_json(os.path.join(output_dir, "attacks.json"), content)
  return report

"""Cascades of attacks, and AutoAttack (Croce & Hein, ICML 2020).

A cascade runs its attacks one after the other, each only on the points that are
still robust: correctly classified and unbroken by every earlier attack. Before
every run of an attack (its targets and restarts) the robust points are gathered
into chunks of a fixed size and only the chunks holding one are attacked, so the
work shrinks as points fall while nothing recompiles (`run_stages`).

A cascade is itself an attack (it follows the calling convention of
:mod:`attacks.core` and returns, per example, the first adversarial point found,
or the last stage's best point when none is), and :func:`attacks.evaluate`
reads its ``stages`` to report the robust accuracy after each of them.

Example::

  suite = attacks.autoattack(eps=8 / 255)                  # APGD-CE, APGD-T, FAB-T, Square
  x_adv = suite(logits_fn, x, y, jax.random.key(0))
  report = attacks.evaluate(logits_fn, x, y, suite, key=jax.random.key(0))
  report.stage_accuracy                                    # [E, 4]: after each stage
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from attacks import core
from robustlib.checks import InputError

VERSIONS = ("standard", "plus", "rand")


@dataclasses.dataclass(frozen=True, eq=False)
class Cascade(core.AttackFn):
  """An attack made of stages run one after the other on the still-robust points.

  Attributes:
    stages: the attacks, in the order they run (all untargeted, one norm and
      one box).
    (the other attributes are those of :class:`attacks.core.AttackFn`.)
  """
  stages: tuple[core.AttackFn, ...] = ()


def stage_key_of(key: jax.Array, stages: Sequence[core.AttackFn], s: int) -> jax.Array:
  """Stage ``s``'s key: ``key`` folded with a hash of its name and the count of earlier
  stages of that name. A stage draws the same randomness first or later in any cascade
  (each example from this key and its own index, `run_stages`); so a cascade whose stages include another's (AutoAttack's ``plus`` holds every
  ``standard`` stage, APGD-CE with 5 restarts the first restart alone) breaks every point
  the other breaks, as a stage's result on a point does not depend on the other points."""
  name = stages[s].name
  repeat = sum(1 for t in stages[:s] if t.name == name)
  return jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF), repeat)


def run_stages(stages: Sequence[core.AttackFn],
               logits_fn: core.LogitsFn,
               x: jax.Array,
               y: jax.Array,
               key: jax.Array,
               eps: jax.Array,
               valid: jax.Array | None = None,
               index: jax.Array | None = None,
               chunk_size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs ``stages`` as a cascade; the array program behind :class:`Cascade`.

  Before each run of each stage (a stage's runs are its targets and restarts,
  ``AttackFn.runs``) the examples still robust are gathered to the front and the
  run goes over them in chunks of ``chunk_size`` rows, stopping after the last
  chunk holding one; inside a chunk a run stops once every example is broken. So
  the work follows the robust examples, as in the original AutoAttack, with one
  compilation: shapes never depend on how many remain.

  Args:
    stages: untargeted attacks.
    logits_fn: ``[N, ...] -> [N, K]``.
    x: inputs ``[N, ...]``.
    y: labels ``[N]``.
    key: PRNG key; stage ``s`` draws from `stage_key_of` folded with each
      example's ``index``, so an example's draws depend neither on the other
      examples nor on the chunking.
    eps: ``[N]`` radii.
    valid: optional ``[N]`` bool; rows that are False (padding) count as not
      robust, so they never keep a stage running.
    index: ``[N]`` int, each example's number in the data set (default
      ``0..N-1``).
    chunk_size: rows per chunk (default all ``N``: one chunk).

  Returns:
    ``(x_adv [N, ...], correct [N] bool, robust [S, N] bool)``: per example the
    first adversarial point found (``x`` where ``x`` is misclassified; the last
    run's point where no stage succeeded), whether ``x`` is classified
    correctly, and whether it is still robust after each stage.
  """
  n = x.shape[0]
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key: typed, so that
    key = jax.random.wrap_key_data(key)  # per-example keys are one key each
  pred = jnp.argmax(logits_fn(x), axis=-1)
  correct = pred == y
  robust = correct if valid is None else correct & valid
  index = jnp.arange(n) if index is None else index
  chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  x_best = x
  flags = []
  for s, stage in enumerate(stages):
    stage_key = stage_key_of(key, stages, s)
    keys = jax.vmap(lambda i, k=stage_key: jax.random.fold_in(k, i))(index)

    def one_run(r, carry, stage=stage, stage_key=stage_key, keys=keys):
      robust, x_best = carry
      # Robust rows first, then the others; past N, rows that gathers clip and scatters drop.
      order = jnp.argsort(~robust, stable=True)
      order = jnp.concatenate([order, jnp.full((num_chunks * chunk - n,), n, order.dtype)])
      count = jnp.sum(robust)

      def chunk_run(state):
        i, robust_now, x_now = state
        rows = jax.lax.dynamic_slice_in_dim(order, i * chunk, chunk)
        live = jnp.take(robust, rows, mode="fill", fill_value=False)
        take = lambda a: jnp.take(a, jnp.minimum(rows, n - 1), axis=0)
        if stage.run_one is None:
          chunk_key = jax.random.fold_in(jax.random.fold_in(stage_key, r), i)
        else:
          chunk_key = keys[jnp.minimum(rows, n - 1)]
        x_c, y_c = take(x), take(y)
        x_run = stage.run_part(logits_fn, x_c, y_c, chunk_key, take(eps), r, live)
        broken = jnp.argmax(logits_fn(x_run), axis=-1) != y_c
        x_now = x_now.at[rows].set(jnp.where(core.expand(live, x_c), x_run, take(x_now)),
                                   mode="drop")
        robust_now = robust_now.at[rows].set(take(robust_now) & ~(broken & live), mode="drop")
        return i + 1, robust_now, x_now

      _, robust, x_best = jax.lax.while_loop(lambda state: state[0] * chunk < count, chunk_run,
                                             (0, robust, x_best))
      return robust, x_best

    runs = stage.runs if stage.run_one is not None else 1
    robust, x_best = jax.lax.fori_loop(0, runs, one_run, (robust, x_best))
    flags.append(robust)
  robust_flags = jnp.stack(flags) if flags else jnp.zeros((0,) + y.shape, bool)
  return x_best, correct, robust_flags


def flatten(suite: Any) -> tuple[core.AttackFn, ...]:
  """The stages of a suite: one attack, a :class:`Cascade` or a list of either."""
  if isinstance(suite, Cascade):
    return tuple(suite.stages)
  if isinstance(suite, core.AttackFn):
    return (suite,)
  if isinstance(suite, (list, tuple)) and suite:
    return tuple(stage for item in suite for stage in flatten(item))
  raise InputError(f"a suite is an attack, a non-empty list of attacks or attacks.autoattack(...); "
                   f"got {type(suite).__name__}")


def cascade(suite: Any, *, eps: float | None = None, name: str | None = None) -> Cascade:
  """Composes attacks into one that runs each on the points still robust.

  Args:
    suite: an attack, a list of attacks or cascades (flattened in order).
    eps: the cascade's default epsilon; by default the stages' common one (an
      error if they differ). A call's ``eps`` goes to every stage.
    name: the cascade's name; by default the stage names joined with ``+``.

  Returns:
    A :class:`Cascade`: callable like any attack, with its ``stages``.

  Raises:
    InputError: for targeted stages (a cascade is untargeted), stages that
      disagree on the norm or the box, or on ``eps`` when none is given.
  """
  stages = flatten(suite)
  targeted = [s.name for s in stages if s.targeted]
  if targeted:
    raise InputError(f"a cascade runs untargeted attacks (each picks its own targets, like "
                     f"apgd_t); these take target=: {targeted}")
  for attribute in ("norm", "bounds"):
    values = {getattr(s, attribute) for s in stages}
    if len(values) > 1:
      raise InputError(f"the attacks of a cascade must share one {attribute}; got " +
                       ", ".join(f"{s.name}: {getattr(s, attribute)}" for s in stages))
  if eps is None:
    values = sorted({s.eps for s in stages})
    if len(values) > 1:
      raise InputError(f"the attacks of the cascade have different eps {values}; pass eps=")
    eps = values[0]

  def run(logits_fn, x, y, key, eps, target):
    del target  # untargeted
    return run_stages(stages, logits_fn, x, y, key, eps)[0]

  return Cascade(run=run,
                 name=name or "+".join(s.name for s in stages),
                 eps=float(eps),
                 norm=stages[0].norm,
                 bounds=stages[0].bounds,
                 targeted=False,
                 min_classes=max(s.min_classes for s in stages),
                 stages=stages)


def autoattack(eps: float,
               norm: str = "linf",
               version: str = "standard",
               bounds: Sequence[float] = (0.0, 1.0),
               *,
               steps: int = 100,
               num_targets: int = 9,
               queries: int = 5000,
               eot_samples: int = 20) -> Cascade:
  """AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with
  an ensemble of diverse parameter-free attacks", ICML 2020).

  ``version="standard"``: APGD-CE (1 restart, 100 steps), APGD-T (targeted DLR
  over the top 9 other classes, 1 restart, 100 steps), FAB-T (9 targets, 1
  restart, 100 steps) and Square (5000 queries, ``p_init=0.8``, its schedule
  not rescaled), each on the points the previous ones left robust.
  ``version="plus"``, as the original's: APGD-CE and APGD-DLR (5 restarts
  each), untargeted FAB (5 restarts), Square (1 restart: the original's
  ``plus`` leaves Square's single restart as it is), APGD-T and FAB-T.
  ``version="rand"`` (randomized models): APGD-CE and APGD-DLR, each averaging
  its loss gradients over 20 draws and judging on one (EOT, as the original).
  ``norm="l1"`` (standard only): L1-APGD-CE with 5 restarts and L1-APGD-T over
  the top 5 classes, both with radii 3, 2 and 1 times eps in turn (the
  original's ``use_largereps``); the original's list of attacks also names
  FAB-T and Square, which this cascade leaves out in L1.

  Remaining deviations from the original code: the random draws differ (JAX's
  keys, not PyTorch's seeds), and a run stops once every example of its chunk
  is broken (the original runs its steps to the end; the robust accuracy is the
  same, the broken examples' points may differ).

  Args:
    eps: radius of the threat model.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    version: ``"standard"``, ``"plus"`` or ``"rand"``.
    bounds: the input box.
    steps, num_targets, queries, eot_samples: AutoAttack's fixed values by
      default; smaller values (quick tests) are no longer AutoAttack.

  Returns:
    A :class:`Cascade` named ``"autoattack"``.
  """
  core.check_eps(eps)
  core.check_norm(norm, ("linf", "l2", "l1"))
  bounds = core.check_bounds(bounds)
  if version not in VERSIONS:
    raise InputError(f"autoattack version must be one of {VERSIONS}, got {version!r} ('custom' "
                     "is not offered: build a list of attacks and pass it to attacks.cascade)")
  for value, field in ((steps, "steps"), (num_targets, "num_targets"), (queries, "queries"),
                       (eot_samples, "eot_samples")):
    core.check_positive_int(value, field)
  # The attack modules are imported here, not at the top, so that this module
  # (and evaluate) do not depend on which attacks a build ships.
  import attacks  # pylint: disable=import-outside-toplevel
  needed = ("apgd", "eot") if version == "rand" else ("apgd", "apgd_t", "fab", "square")
  missing = [name for name in needed if not hasattr(attacks, name)]
  if missing:
    raise InputError(f"autoattack version {version!r} needs attacks.{', attacks.'.join(missing)}, "
                     "which this build lacks")
  common = dict(eps=eps, norm=norm, bounds=bounds)
  if norm == "l1":
    if version != "standard":
      raise InputError(f"autoattack in L1 has the standard version only, got {version!r}")
    # The original's L1 setting: APGD with radii 3, 2, 1 x eps, 5 restarts, 5 targets.
    stages = [
        attacks.apgd(loss="ce", steps=steps, restarts=5, large_eps=True, **common),
        attacks.apgd_t(steps=steps,
                       restarts=1,
                       num_targets=min(num_targets, 5),
                       large_eps=True,
                       **common),
    ]
    return cascade(stages, eps=eps, name="autoattack-l1")
  apgd_t = attacks.apgd_t(steps=steps, restarts=1, num_targets=num_targets, **common)
  fab_t = attacks.fab(steps=steps, restarts=1, num_targets=num_targets, **common)
  square = attacks.square(queries=queries, p_init=0.8, rescale_schedule=False, **common)
  if version == "standard":
    stages = [attacks.apgd(loss="ce", steps=steps, restarts=1, **common), apgd_t, fab_t, square]
  elif version == "plus":
    stages = [
        attacks.apgd(loss="ce", steps=steps, restarts=5, **common),
        attacks.apgd(loss="dlr", steps=steps, restarts=5, **common),
        attacks.fab(steps=steps, restarts=5, num_targets=None, **common),
        square,
        apgd_t,
        fab_t,
    ]
  else:
    stages = [
        attacks.eot(attacks.apgd(loss=loss, steps=steps, restarts=1, **common),
                    samples=eot_samples,
                    judge_one_draw=True) for loss in ("ce", "dlr")
    ]
  return cascade(stages,
                 eps=eps,
                 name="autoattack" if version == "standard" else f"autoattack-{version}")

"""What every attack shares: the calling convention, input checks, projections,
losses and the per-example best-point bookkeeping.

The calling convention (a contract; later tools call exactly this)::

  attack = attacks.pgd(eps=0.3, steps=40, step_size=0.01)   # a factory
  x_adv = attack(logits_fn, x, y, key)                      # pure, jittable
  x_adv = attack(logits_fn, x, y, key, eps=0.1)             # traced override
  x_adv = attack(logits_fn, x, y, key, target=t)            # targeted attacks
  x_adv = attack(logits_fn, x, y, key, x_init=x_start)      # a warm start (pgd, apgd, apgd_t, multitargeted)

* ``logits_fn``: any JAX callable ``[N, ...] -> [N, K]``.
* ``x``: ``[N, ...]`` floating, inside the attack's box ``bounds``.
* ``y``: int labels ``[N]``; ``target``: int ``[N]`` for attacks built with
  ``targeted=True`` (never equal to ``y``).
* ``eps``: a scalar or ``[N]``; may be a traced value, so a sweep over epsilon
  compiles once.
* The result lies inside the epsilon-ball around ``x`` and inside the box, and per
  example is the best point found: an adversarial point beats any
  non-adversarial one, ties are broken by the attack's objective, and ``x``
  itself is always a candidate.

Every attack is written as ``run(logits_fn, x, y, key, eps, target) -> x_adv``
with ``eps`` a float array ``[N]`` and wrapped by :func:`make_attack`, which
checks concrete inputs on the host (a clear :class:`InputError` instead of a
wrong answer), jits ``run`` once per ``logits_fn`` and input shape, and calls
``run`` directly when it is already being traced (inside a user's ``jit``,
``vmap`` or ``grad``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustlib import compilation
from robustlib import backend
from robustlib import fastgrad
from robustlib.checks import InputError
from robustlib.checks import as_key
from robustlib.checks import check_images
from robustlib.checks import check_logits_shape
from robustlib.checks import check_labels

NORMS = ("linf", "l2", "l1", "l0")  # every norm some attack supports
Bounds = tuple[float, float]
LogitsFn = Callable[[jax.Array], jax.Array]
Run = Callable[..., jax.Array]


class Attack(Protocol):
  """``attack(logits_fn, x, y, key, *, eps=None, target=None) -> x_adv``."""

  name: str
  eps: float
  norm: str
  bounds: Bounds
  targeted: bool

  def __call__(self,
               logits_fn: LogitsFn,
               x: jax.Array,
               y: jax.Array,
               key: jax.Array,
               *,
               eps: Any = None,
               target: jax.Array | None = None) -> jax.Array:
    ...


# ----------------------------------------------------------------------------
# Checks.


def is_traced(*values: Any) -> bool:
  """True when any leaf of ``values`` is a tracer (inside jit, vmap or grad)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def check_norm(norm: str, supported: Sequence[str] = ("linf", "l2")) -> str:
  """``norm`` if the attack supports it (L1: `attacks.apgd`, `attacks.apgd_t`, `attacks.fab`,
  `attacks.fmn`; L0: `attacks.fmn`)."""
  if norm not in supported:
    also = {
        "l1": " (L1 attacks: attacks.apgd, attacks.apgd_t, attacks.fab, attacks.fmn)",
        "l0": " (the L0 attack: attacks.fmn)"
    }.get(norm, "")
    raise InputError(f"norm must be one of {tuple(supported)}, got {norm!r}{also}")
  return norm


def check_bounds(bounds: Sequence[float]) -> Bounds:
  lo, hi = (float(b) for b in bounds)
  if not lo < hi:
    raise InputError(f"bounds must be (lower, upper) with lower < upper, got {tuple(bounds)}")
  return lo, hi


def check_eps(eps: Any, name: str = "eps", allow_inf: bool = False) -> None:
  """Rejects negative, NaN or (unless ``allow_inf``: a minimum-norm attack, unbounded)
  infinite epsilons, scalar or per example, if concrete."""
  if eps is None or is_traced(eps):
    return
  arr = np.asarray(eps, dtype=np.float64)
  if arr.ndim > 1:
    raise InputError(f"{name} must be a scalar or a vector [N], got shape {arr.shape}")
  if np.isnan(arr).any() or (arr < 0).any() or (not allow_inf and np.isinf(arr).any()):
    also = "" if allow_inf else " (only minimum-norm attacks, attacks.fmn and attacks.fab, take inf)"
    raise InputError(f"{name} must be {'' if allow_inf else 'finite and '}>= 0, got {eps}{also}")


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_probabilities(logits: jax.Array, tolerance: float = 1e-5) -> list[str]:
  """Flags outputs that look like probabilities: in [0, 1] with rows summing to 1.

  Args:
    logits: the model's outputs ``[N, K]``.
    tolerance: slack on the range and the sums.
  """
  out = np.asarray(logits, np.float64)
  if (out.min() > -tolerance and out.max() < 1 + tolerance and
      np.abs(out.sum(-1) - 1).max() < tolerance):
    return [
        "the model's outputs look like probabilities (in [0, 1], rows sum to 1): pass logits "
        "(drop the final softmax); on probabilities the cross-entropy and DLR losses lose "
        "their gradient and attacks become ineffective"
    ]
  return []


def per_example_eps(eps: Any, num_examples: int, dtype=jnp.float32) -> jax.Array:
  """Broadcasts a scalar or ``[N]`` epsilon to a float array ``[N]`` of ``dtype`` or
  float32, the wider: a radius is never rounded to a narrow input dtype (in
  bfloat16, 0.03 is 0.0300293)."""
  eps = jnp.asarray(eps, dtype=jnp.promote_types(dtype, jnp.float32))
  if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != num_examples):
    raise InputError(f"eps must be a scalar or a vector [N] with N={num_examples}, "
                     f"got shape {eps.shape}")
  return jnp.broadcast_to(eps, (num_examples,))


def _check_concrete_inputs(x, y, eps, target, bounds: Bounds, targeted: bool,
                           allow_inf: bool) -> None:
  check_images(x, bounds=bounds, name="x")
  check_labels(y, num_examples=np.shape(x)[0], name="y")
  check_eps(eps, allow_inf=allow_inf)
  if targeted:
    check_labels(target, num_examples=np.shape(x)[0], name="target")
    same = np.flatnonzero(np.asarray(target) == np.asarray(y))
    if same.size:
      raise InputError(f"target must differ from the true label y; they are equal for "
                       f"{same.size} examples (first at index {int(same[0])})")


def _check_static_inputs(x, y, target, targeted: bool) -> None:
  """Checks what is known at trace time too: shapes, dtypes, and whether a target is given."""
  if jnp.ndim(x) < 1 or jnp.ndim(y) != 1 or jnp.shape(y)[0] != jnp.shape(x)[0]:
    raise InputError(f"x must be [N, ...] and y int labels [N]; got shapes "
                     f"{jnp.shape(x)} and {jnp.shape(y)}")
  if jnp.shape(x)[0] == 0:
    raise InputError(f"x holds no examples (shape {jnp.shape(x)}); an attack needs at least one")
  if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
    raise InputError(f"y must hold integer class labels, got dtype {jnp.result_type(y)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise InputError(f"x must have a floating dtype, got {jnp.result_type(x)}")
  if target is not None and jnp.shape(target) != jnp.shape(y):
    raise InputError(f"target must have the shape of y {jnp.shape(y)}, got {jnp.shape(target)}")
  if targeted and target is None:
    raise InputError("this attack is targeted: pass target= (int labels [N])")
  if not targeted and target is not None:
    raise InputError("target= was given to an untargeted attack; build it with targeted=True")


# ----------------------------------------------------------------------------
# Keys: one for the batch, or one per example (cascades pass these, so that an
# example's draws do not depend on which other examples share its chunk).


def per_example(key: jax.Array) -> bool:
  """True for a key array ``[N]`` holding one key per example."""
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def fold_in(key: jax.Array, data: Any) -> jax.Array:
  """``jax.random.fold_in`` of one key, or of each example's key."""
  if per_example(key):
    return jax.vmap(jax.random.fold_in, (0, None))(key, data)
  return jax.random.fold_in(key, data)


def split(key: jax.Array, num: int) -> jax.Array:
  """``num`` keys ``[num]``, or ``[num, N]`` from per-example keys."""
  if per_example(key):
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)
  return jax.random.split(key, num)


def uniform(key: jax.Array,
            shape: tuple[int, ...],
            dtype=jnp.float32,
            minval: float = 0.0,
            maxval: float = 1.0,
            flat: bool = False) -> jax.Array:
  """Uniform draws of ``shape`` ``[N, ...]``; from per-example keys, row ``i`` from key
  ``i``. ``flat`` draws a vector and reshapes it (XLA compiles threefry for rank-1
  shapes much faster)."""
  if per_example(key):
    size = int(np.prod(shape[1:]))
    draw = lambda k: jax.random.uniform(k, (size,), dtype, minval, maxval)
    return jax.vmap(draw)(key).reshape(shape)
  if flat:
    return jax.random.uniform(key, (int(np.prod(shape)),), dtype, minval, maxval).reshape(shape)
  return jax.random.uniform(key, shape, dtype, minval, maxval)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32, flat: bool = False):
  """Standard normal draws of ``shape`` ``[N, ...]``, like :func:`uniform`."""
  if per_example(key):
    size = int(np.prod(shape[1:]))
    return jax.vmap(lambda k: jax.random.normal(k, (size,), dtype))(key).reshape(shape)
  if flat:
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)
  return jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------
# Gradients of a loss.


def prepare(logits_fn: LogitsFn, x: jax.Array) -> LogitsFn:
  """``logits_fn`` with fast input-gradients (`robustlib.fastgrad.prepare`) where the backend
  policy takes them (`robustlib.backend`: ``fast_gradients``), called once before an attack's
  loop; an EOT view (`attacks.eot`) stays what it is."""
  if (getattr(logits_fn, "expected_gradient", None) is not None or
      not backend.fast_paths().fast_gradients):
    return logits_fn
  return fastgrad.prepare(logits_fn, x)


def loss_gradient(fn: LogitsFn, loss: Callable[[jax.Array], jax.Array]):
  """``z -> (gradient of sum(loss(fn(z))), (loss [N], logits [N, K]))``: what every
  gradient attack ascends. For an EOT view of a randomized model (`attacks.eot`) the
  gradient is averaged over its draws and the loss and logits are those of one draw,
  as AutoAttack's EOT does (Croce & Hein 2020)."""
  expected = getattr(fn, "expected_gradient", None)
  if expected is not None:
    return expected(loss)

  def total(z):
    logits = fn(z)
    value = loss(logits)
    return jnp.sum(value), (value, logits)

  return jax.grad(total, has_aux=True)


# ----------------------------------------------------------------------------
# Narrow input dtypes.


def round_toward(v: jax.Array, x: jax.Array) -> jax.Array:
  """``v`` (float32 or wider) in ``x``'s dtype, each coordinate rounded toward ``x``.

  Every coordinate's distance to ``x`` shrinks or stays, so a point of the ball
  around ``x`` (any norm) and of the box stays inside both in a narrow dtype
  (float16, bfloat16), where rounding to nearest may step out by half an ulp.
  """
  if v.dtype == x.dtype:
    return v
  c = v.astype(x.dtype)
  xw = x.astype(v.dtype)
  beyond = jnp.abs(c.astype(v.dtype) - xw) > jnp.abs(v - xw)
  return jnp.where(beyond, jnp.nextafter(c, x), c)


def widen(logits_fn: LogitsFn, x: jax.Array) -> tuple[LogitsFn, jax.Array]:
  """An attack's view of a narrow-dtype problem: iterates in float32, the model still fed
  its own dtype. Attacks search in float32 (a float16 step of a small size would round
  away); the result comes back with `round_toward`."""
  wide = jnp.promote_types(x.dtype, jnp.float32)
  if wide == x.dtype:
    return logits_fn, x
  cast = getattr(logits_fn, "cast_inputs", None)  # a model that must stay what it is (Randomized)
  fn = cast(x.dtype) if cast is not None else (lambda z: logits_fn(z.astype(x.dtype)))
  return fn, x.astype(wide)


def _run_wide(run: Run, logits_fn, x, y, key, eps, target, x_init=None) -> jax.Array:
  fn, xw = widen(logits_fn, x)
  if x_init is None:
    return round_toward(run(fn, xw, y, key, eps, target), x)
  return round_toward(run(fn, xw, y, key, eps, target, x_init=x_init.astype(xw.dtype)), x)


def _check_x_init(x_init, x, attack_name: str, warm_start: bool) -> None:
  if x_init is None:
    return
  if not warm_start:
    raise InputError(
        f"{attack_name} takes no x_init= (warm starts: attacks.pgd, apgd, apgd_t, multitargeted)")
  if jnp.shape(x_init) != jnp.shape(x):
    raise InputError(f"x_init must have the shape of x {jnp.shape(x)}, got {jnp.shape(x_init)}")
  if not is_traced(x_init) and not np.isfinite(np.asarray(x_init)).all():
    raise InputError("x_init holds NaN or infinite values")


# ----------------------------------------------------------------------------
# The wrapper every factory returns.


@dataclasses.dataclass(frozen=True, eq=False)
class AttackFn:
  """A configured attack; see the module docstring for the calling convention.

  Attributes:
    run: ``run(logits_fn, x, y, key, eps[N], target) -> x_adv``, pure.
    name: the attack's name as reports print it.
    eps: the default epsilon (``inf`` for a minimum-norm attack built without one).
    norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"``.
    bounds: the input box.
    targeted: whether calls take ``target=``.
    min_classes: the fewest classes the attack's loss is defined for.
    runs: the attack's independent runs (targets times restarts), between
      which a cascade gathers the examples still robust.
    run_one: ``run_one(logits_fn, x, y, key, eps[N], r, live[N]) -> x_adv``,
      run ``r`` (traced) alone, with ``key`` one key per example, stopping once
      every live example is adversarial (rows not ``live`` count as done); None
      when the attack has no such form (a cascade calls ``run``).
    minimum_norm: ``run`` with ``eps = inf`` returns the smallest adversarial
      point it finds (FMN, FAB): `distances` reads an attack's robustness curve
      over every epsilon from one run.
    warm_start: calls take ``x_init=`` ``[N, ...]``, where the first run starts
      (projected onto the ball and the box; e.g. another attack's points).
  """
  run: Run
  name: str
  eps: float
  norm: str
  bounds: Bounds
  targeted: bool = False
  min_classes: int = 2
  runs: int = 1
  run_one: Callable[..., jax.Array] | None = None
  minimum_norm: bool = False
  warm_start: bool = False

  def __post_init__(self):
    jitted = compilation.jit(self._checked_run, static_argnums=0)
    object.__setattr__(self, "_jitted", jitted)

  def _checked_run(self, logits_fn, x, y, key, eps, target, x_init):
    clean_logits = logits_fn(x)
    check_logits_shape(clean_logits, x.shape[0], self.min_classes)
    x_adv = _run_wide(self.run, logits_fn, x, y, key, eps, target, x_init)
    return x_adv, clean_logits

  def run_part(self, logits_fn, x, y, key, eps, r, live) -> jax.Array:
    """Run ``r`` of this untargeted attack on a cascade's chunk (traced): ``run_one``
    with per-example ``key`` ``[N]``, or ``run`` with one key when there is none;
    narrow dtypes searched in float32, as every call."""
    fn, xw = widen(logits_fn, x)
    if self.run_one is None:
      x_adv = self.run(fn, xw, y, key, eps, None)
    else:
      x_adv = self.run_one(fn, xw, y, key, eps, r, live)
    return round_toward(x_adv, x)

  def __call__(self, logits_fn, x, y, key, *, eps=None, target=None, x_init=None):
    eps = self.eps if eps is None else eps
    key = as_key(key)
    _check_static_inputs(x, y, target, self.targeted)
    _check_x_init(x_init, x, self.name, self.warm_start)
    if is_traced(x, y, key, eps, target, x_init):
      clean_logits = jax.eval_shape(logits_fn, x)
      check_logits_shape(clean_logits, x.shape[0], self.min_classes)
      return _run_wide(self.run, logits_fn, x, y, key, per_example_eps(eps, x.shape[0], x.dtype),
                       target, x_init)
    _check_concrete_inputs(x, y, eps, target, self.bounds, self.targeted, self.minimum_norm)
    x = jnp.asarray(x)
    x_adv, clean_logits = self._jitted(logits_fn, x, jnp.asarray(y), key,
                                       per_example_eps(eps, x.shape[0], x.dtype),
                                       None if target is None else jnp.asarray(target),
                                       None if x_init is None else jnp.asarray(x_init))
    clean_logits = np.asarray(clean_logits, np.float32)
    if not np.isfinite(clean_logits).all():
      raise InputError("logits_fn returned NaN or infinite logits on the clean inputs x")
    for message in check_probabilities(clean_logits):
      warnings.warn(message, stacklevel=2)
    num_classes = clean_logits.shape[1]
    check_labels(y, num_classes=int(num_classes), name="y")
    if target is not None:
      check_labels(target, num_classes=int(num_classes), name="target")
    return x_adv

  def distances(self, logits_fn, x, y, key, *, target=None) -> jax.Array:
    """``[N]`` the norm of the smallest adversarial perturbation this minimum-norm attack
    finds (unbounded: ``eps = inf``); 0 where ``x`` itself is misclassified (or hits
    ``target``), ``inf`` where it finds none."""
    if not self.minimum_norm:
      raise InputError(f"{self.name} is not a minimum-norm attack (attacks.fmn, attacks.fab)")
    x_adv = self(logits_fn, x, y, key, eps=jnp.inf, target=target)
    return adversarial_distance(logits_fn, jnp.asarray(x), x_adv, jnp.asarray(y), self.norm, target)


def make_attack(run: Run,
                *,
                name: str,
                eps: float,
                norm: str = "linf",
                bounds: Sequence[float] = (0.0, 1.0),
                targeted: bool = False,
                min_classes: int = 2,
                runs: int = 1,
                run_one: Callable[..., jax.Array] | None = None,
                minimum_norm: bool = False,
                warm_start: bool = False) -> AttackFn:
  """Validates a factory's hyper-parameters and wraps ``run`` as an attack."""
  check_eps(eps, allow_inf=minimum_norm)
  return AttackFn(run=run,
                  name=name,
                  eps=float(eps),
                  norm=check_norm(norm, NORMS),
                  bounds=check_bounds(bounds),
                  targeted=targeted,
                  min_classes=min_classes,
                  runs=runs,
                  run_one=run_one,
                  minimum_norm=minimum_norm,
                  warm_start=warm_start)


def derived_attack(attack: AttackFn, run: Run, name: str) -> AttackFn:
  """An attack with ``attack``'s settings (radius, norm, box, targeted, classes, minimum
  norm) and another ``run``: what wrappers (`attacks.eot`, `attacks.transfer`) return."""
  return make_attack(run,
                     name=name,
                     eps=attack.eps,
                     norm=attack.norm,
                     bounds=attack.bounds,
                     targeted=attack.targeted,
                     min_classes=attack.min_classes,
                     minimum_norm=attack.minimum_norm)


def make_minimum_norm_attack(run: Callable[..., jax.Array], *, family: str, eps: float, norm: str,
                             bounds: Bounds, targeted: bool, num_targets: int | None,
                             runs: int) -> AttackFn:
  """A minimum-norm attack (FAB, FMN) from ``run(fn, x, y, key, eps, target, r=None,
  live=None)``, which runs every run or, with ``r``, run ``r`` alone (a cascade's form).
  Named ``<family>-targeted-<norm>`` (calls take ``target=``), ``<family>-<norm>``
  (untargeted, ``num_targets=None``) or ``<family>-t-<norm>`` (runs over top classes)."""
  if targeted:
    name = f"{family}-targeted-{norm}"
  elif num_targets is None:
    name = f"{family}-{norm}"
  else:
    name = f"{family}-t-{norm}"
  run_one = None if targeted else (
      lambda fn, x, y, key, eps, r, live: run(fn, x, y, key, eps, None, r, live))
  return make_attack(run,
                     name=name,
                     eps=eps,
                     norm=norm,
                     bounds=bounds,
                     targeted=targeted,
                     min_classes=2,
                     runs=runs,
                     run_one=run_one,
                     minimum_norm=True)


# ----------------------------------------------------------------------------
# Geometry.


def expand(v: jax.Array, like: jax.Array) -> jax.Array:
  """``[N]`` -> ``[N, 1, ..., 1]`` broadcastable against ``like`` ``[N, ...]``."""
  return jnp.reshape(v, v.shape + (1,) * (like.ndim - 1))


def steepest_direction(g: jax.Array, norm: str) -> jax.Array:
  """The unit-``norm`` direction of steepest ascent along ``g`` ``[N, ...]``, per example:
  ``sign(g)`` for L-inf, ``g / ||g||_2`` for L2 (zero stays zero)."""
  if norm == "linf":
    return jnp.sign(g)
  if norm == "l2":
    return g / expand(jnp.maximum(l2_norm(g), 1e-12), g)
  raise InputError(f"steepest_direction takes 'linf' or 'l2', got {norm!r}")


def l2_norm(v: jax.Array) -> jax.Array:
  """Per-example L2 norm: ``[N, ...] -> [N]``."""
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1))


def project(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str, bounds: Bounds) -> jax.Array:
  """Projects onto the ``norm`` ball of radius ``eps`` [N] around ``x``, then the box.

  Clipping to the box after the ball keeps the point in the ball (``x`` is in the
  box, so clipping only shrinks each coordinate's distance to ``x``).
  """
  delta = x_adv - x
  if norm == "l1":
    return x + project_l1_box(delta, x, eps, bounds)
  if norm == "l0":
    return jnp.clip(x + project_l0(delta, eps), bounds[0], bounds[1])
  if norm == "linf":
    e = expand(eps, x)
    delta = jnp.clip(delta, -e, e)
  else:
    n = l2_norm(delta)
    scale = jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    delta = delta * expand(scale, x)
  return jnp.clip(x + delta, bounds[0], bounds[1])


# Halvings of a projection's threshold bracket: to 2^-24 of its width, float32's resolution, so
# the last solve on the bracket's linear piece is exact up to rounding.
BISECTIONS = 24


def project_l1_box(delta: jax.Array, x: jax.Array, eps: jax.Array, bounds: Bounds) -> jax.Array:
  """The Euclidean projection of ``x + delta`` onto ``{||z - x||_1 <= eps} ∩ box``, as a step
  from ``x``: ``[N, ...]``.

  The minimizer soft-thresholds every coordinate and clips it to the box,
  ``w_i = sign(d_i) min(max(|d_i| - tau, 0), room_i)``, with ``tau >= 0`` the
  smallest threshold giving ``||w||_1 <= eps`` (Croce & Hein 2021, "Mind the
  box: l1-APGD for sparse adversarial attacks on image classifiers", whose
  code sorts; here ``tau`` is bracketed by bisection, then solved on the
  bracket's linear piece).
  """
  n = x.shape[0]
  d = delta.reshape(n, -1)
  xf = x.reshape(n, -1)
  size = jnp.abs(d)
  room = jnp.maximum(jnp.where(d > 0, bounds[1] - xf, xf - bounds[0]), 0.0)
  e = jnp.asarray(eps, d.dtype)

  def mass(tau):
    return jnp.sum(jnp.minimum(jnp.maximum(size - tau[:, None], 0.0), room), axis=1)

  def bisect(_, bracket):
    low, high = bracket
    mid = 0.5 * (low + high)
    over = mass(mid) > e
    return jnp.where(over, mid, low), jnp.where(over, high, mid)

  low, high = jax.lax.fori_loop(0, BISECTIONS, bisect, (jnp.zeros(
      (n,), d.dtype), jnp.max(size, axis=1)))
  # On (low, high] the mass is linear: free coordinates lose tau, capped ones keep their room.
  free = (size > low[:, None]) & (size - low[:, None] < room)
  capped = size - low[:, None] >= room
  free_mass = jnp.sum(jnp.where(free, size, 0.0), axis=1)
  capped_mass = jnp.sum(jnp.where(capped, room, 0.0), axis=1)
  count = jnp.sum(free, axis=1)
  tau = jnp.clip((free_mass + capped_mass - e) / jnp.maximum(count, 1), low, high)
  tau = jnp.where(mass(jnp.zeros((n,), d.dtype)) > e, tau, 0.0)
  w = jnp.minimum(jnp.maximum(size - tau[:, None], 0.0), room)
  return (jnp.sign(d) * w).reshape(delta.shape)


def kth_smallest(v: jax.Array, k: jax.Array) -> jax.Array:
  """``sort(v, axis=1)[:, k]`` for ``v >= 0`` ``[N, D]`` and ``k`` ``[N]``, without a sort
  (XLA's CPU sort of an image batch costs several forward passes): bisection on the
  bit patterns of non-negative floats, which order as the integers they read as."""
  bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)

  def halve(_, bracket):
    low, high = bracket  # count(bits <= low) <= k < count(bits <= high)
    mid = low + (high - low) // 2
    enough = jnp.sum(bits <= mid[:, None], axis=1) > k
    return jnp.where(enough, low, mid), jnp.where(enough, mid, high)

  n = v.shape[0]
  low = jnp.full((n,), -1, jnp.int32)
  low, high = jax.lax.fori_loop(0, 32, halve, (low, jnp.max(bits, axis=1)))
  return jax.lax.bitcast_convert_type(high, jnp.float32).astype(v.dtype)


def project_l0(delta: jax.Array, k: jax.Array) -> jax.Array:
  """``delta`` ``[N, ...]`` with all but its ``floor(k)`` (``[N]``) largest-magnitude
  coordinates zeroed, ties broken by position: the Euclidean projection onto
  ``{||d||_0 <= k}``."""
  n = delta.shape[0]
  d = delta.reshape(n, -1)
  size = jnp.abs(d)
  dim = d.shape[1]
  keep = jnp.clip(jnp.floor(jnp.nan_to_num(k, posinf=dim)), 0, dim).astype(jnp.int32)
  threshold = kth_smallest(size, jnp.clip(dim - keep, 0, dim - 1))[:, None]
  above = size > threshold
  tied = size == threshold
  room = keep - jnp.sum(above, axis=1)
  kept = above | (tied & (jnp.cumsum(tied, axis=1) <= room[:, None]))
  return jnp.where(kept & (keep[:, None] > 0), d, 0.0).reshape(delta.shape)


def l0_norm(v: jax.Array) -> jax.Array:
  """Per-example count of non-zero coordinates: ``[N, ...] -> [N]``."""
  return jnp.sum(v.reshape(v.shape[0], -1) != 0, axis=1)


def l1_norm(v: jax.Array) -> jax.Array:
  """Per-example L1 norm: ``[N, ...] -> [N]``."""
  return jnp.sum(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def linf_norm(v: jax.Array) -> jax.Array:
  """Per-example L-inf norm: ``[N, ...] -> [N]``."""
  return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example ``norm`` (``"linf"``, ``"l2"``, ``"l1"``, ``"l0"``): ``[N, ...] -> [N]``,
  in ``v``'s dtype."""
  fns = {"linf": linf_norm, "l2": l2_norm, "l1": l1_norm, "l0": l0_norm}
  return fns[norm](v).astype(v.dtype)


def dual_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example dual of ``norm`` (L1 for L-inf, L2 for L2, L-inf for L1): ``[N, ...] -> [N]``;
  ``|f(x)| / dual_norm(grad f)`` is the distance to ``f = 0`` of the linearization."""
  return lp_norm(v, {"linf": "l1", "l2": "l2", "l1": "linf"}[norm])


def adversarial_distance(logits_fn: LogitsFn,
                         x: jax.Array,
                         x_adv: jax.Array,
                         y: jax.Array,
                         norm: str,
                         target: jax.Array | None = None) -> jax.Array:
  """``[N]``: ``||x_adv - x||`` (float32 or wider) where ``x_adv`` fools ``logits_fn``
  (misclassified, or classified as ``target``), ``inf`` elsewhere."""
  wide = jnp.promote_types(x.dtype, jnp.float32)
  dist = lp_norm(x_adv.astype(wide) - x.astype(wide), norm)
  return jnp.where(is_adversarial(logits_fn(x_adv), y, target), dist, jnp.inf)


def random_init(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str,
                bounds: Bounds) -> jax.Array:
  """A uniform random point of the ``norm`` ball around ``x``, clipped to the box."""
  if norm == "linf":
    e = expand(eps, x)
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * e
  else:
    k_dir, k_rad = jax.random.split(key)
    d = jax.random.normal(k_dir, x.shape, x.dtype)
    dim = np.prod(x.shape[1:])
    radius = eps * jax.random.uniform(k_rad, (x.shape[0],), x.dtype)**(1.0 / dim)
    delta = d * expand(radius / jnp.maximum(l2_norm(d), 1e-12), x)
  return jnp.clip(x + delta, bounds[0], bounds[1])


# ----------------------------------------------------------------------------
# Losses: ``loss(logits [N, K], y [N], target [N] | None) -> [N]``, higher is
# more adversarial.


def _top_other(logits: jax.Array, label: jax.Array) -> jax.Array:
  """``max_{j != label} logits_j`` per example."""
  mask = jax.nn.one_hot(label, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def _take(logits: jax.Array, label: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits, label[:, None], axis=-1)[:, 0]


def cross_entropy_loss(logits, y, target=None):
  """Untargeted: ``CE(logits, y)``; targeted: ``-CE(logits, target)``."""
  logp = jax.nn.log_softmax(logits)
  if target is None:
    return -_take(logp, y)
  return _take(logp, target)


def margin_loss(logits, y, target=None):
  """Untargeted: ``max_{j != y} z_j - z_y``; targeted: ``z_t - max_{j != t} z_j``
  (Carlini & Wagner 2017): positive exactly where the attack succeeds, ``argmax == y``
  misses or ``argmax == t`` hits."""
  if target is None:
    return _top_other(logits, y) - _take(logits, y)
  return _take(logits, target) - _top_other(logits, target)


def logit_difference(logits, y, target):
  """``z_t - z_y``: MultiTargeted's loss (Gowal et al. 2019), one target at a time."""
  return _take(logits, target) - _take(logits, y)


def dlr_loss(logits, y, target=None):
  """Difference of logits ratio (Croce & Hein 2020), untargeted or targeted.

  Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``; targeted:
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi`` the sorted logits.
  Needs K >= 3 (untargeted) or K >= 4 (targeted).
  """
  z = jnp.sort(logits, axis=-1)[:, ::-1]
  if target is None:
    return -(_take(logits, y) - _top_other(logits, y)) / (z[:, 0] - z[:, 2] + 1e-12)
  return -(_take(logits, y) - _take(logits, target)) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


LOSSES = {"ce": cross_entropy_loss, "margin": margin_loss, "dlr": dlr_loss}
MIN_CLASSES = {"ce": 2, "margin": 2, "dlr": 3}


def get_loss(name: str | Callable, targeted: bool = False) -> tuple[Callable, int]:
  """Returns ``(loss_fn, min_classes)`` for ``"ce" | "margin" | "dlr"`` or a callable.

  A callable ``loss(logits [N, K], y [N], target [N] | None) -> [N]`` (higher is
  more adversarial) is used as it is, e.g. TRADES' KL divergence to the clean
  prediction.
  """
  if callable(name):
    return name, 2
  if name not in LOSSES:
    raise InputError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
  return LOSSES[name], MIN_CLASSES[name] + (1 if targeted and name == "dlr" else 0)


def top_targets(logits: jax.Array, y: jax.Array, num_targets: int | None) -> jax.Array:
  """The classes other than ``y`` ordered by decreasing clean logit.

  Args:
    logits: clean logits ``[N, K]``.
    y: labels ``[N]``.
    num_targets: how many to keep (at most ``K - 1``), or None for all ``K - 1``.

  Returns:
    Target classes ``[N, T]`` (int32), ``T = min(num_targets, K - 1)``.
  """
  num_classes = logits.shape[1]
  count = num_classes - 1 if num_targets is None else min(num_targets, num_classes - 1)
  others = jnp.where(jnp.arange(num_classes)[None] == y[:, None], -jnp.inf, logits)
  return jnp.argsort(-others, axis=1)[:, :count].astype(jnp.int32)


def loss_name(loss: str | Callable) -> str:
  """What an attack's name calls its loss: the name given, a function's own name, or
  ``"custom"`` for a lambda."""
  if isinstance(loss, str):
    return loss
  name = getattr(loss, "__name__", "custom")
  return "custom" if name == "<lambda>" else name


def is_adversarial(logits: jax.Array, y: jax.Array, target: jax.Array | None = None) -> jax.Array:
  """``[N]`` bool: misclassified (untargeted) or classified as ``target``."""
  pred = jnp.argmax(logits, axis=-1)
  return pred != y if target is None else pred == target


def iterate(steps: int, body: Callable, state: Any, done: Callable[[Any], jax.Array] | None = None):
  """``lax.fori_loop(0, steps, body, state)``; with ``done``, a while loop that also stops
  once ``done(state)`` (a cascade's run whose examples are all broken)."""
  if done is None:
    return jax.lax.fori_loop(0, steps, body, state)
  return jax.lax.while_loop(lambda c: (c[0] < steps) & ~done(c[1]), lambda c:
                            (c[0] + 1, body(c[0], c[1])), (0, state))[1]


# ----------------------------------------------------------------------------
# The best point per example.


class Best(NamedTuple):
  """Per-example best candidate so far.

  Attributes:
    x: ``[N, ...]`` the best point.
    adversarial: ``[N]`` bool, whether it fools the model.
    score: ``[N]`` the attack's objective at it (higher is better).
  """
  x: jax.Array
  adversarial: jax.Array
  score: jax.Array


def init_best(x: jax.Array, adversarial: jax.Array, score: jax.Array) -> Best:
  """The bookkeeping starts from ``x`` itself, so the result is never worse than ``x``."""
  return Best(x, adversarial, score)


def update_best(best: Best, x: jax.Array, adversarial: jax.Array, score: jax.Array) -> Best:
  """Keeps, per example, the better of ``best`` and the candidate.

  A candidate wins if it is adversarial and the best is not, or if both agree
  on adversarialness and its score is strictly higher.
  """
  better = (adversarial & ~best.adversarial) | ((adversarial == best.adversarial) &
                                                (score > best.score))
  return Best(jnp.where(expand(better, x), x, best.x), best.adversarial | adversarial,
              jnp.where(better, score, best.score))

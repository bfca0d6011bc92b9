"""Checks that flag an unreliable robustness evaluation, after AutoAttack's
(Croce & Hein, ICML 2020, ``autoattack/checks.py``).

* zero input-gradients (gradient masking or saturated outputs): gradient-based
  attacks see nothing;
* a randomized model (two forward passes on the same input differ): evaluate it
  with EOT (``attacks.autoattack(..., version="rand")``);
* outputs that look like probabilities (rows in [0, 1] summing to 1): pass
  logits, on probabilities CE and DLR lose their signal;
* a gradient-free attack (Square, SPSA) breaking points the white-box attacks
  before it missed: a sign of gradient masking;
* too few classes for a stage's loss (DLR needs 3, targeted DLR 4): an error
  before any work.

Each check returns messages (empty when all is well); :func:`diagnose` runs the
checks that need only the model and a batch and also emits every message as an
:class:`AttackWarning`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attacks import core
from attacks.eot import Randomized
from robustlib.checks import InputError

GRADIENT_FREE = ("square", "spsa")


class AttackWarning(UserWarning):
  """The evaluation ran, but its result may overstate the model's robustness."""


def warn(messages: Sequence[str]) -> None:
  """Emits each message as an :class:`AttackWarning`."""
  for message in messages:
    warnings.warn(message, AttackWarning, stacklevel=3)


def check_num_classes(num_classes: int, stages: Sequence[core.AttackFn]) -> None:
  """Raises InputError when a stage's loss needs more classes than the model has.

  Args:
    num_classes: ``K``, the model's number of outputs.
    stages: attacks with their ``min_classes``.
  """
  short = [(s.name, s.min_classes) for s in stages if num_classes < s.min_classes]
  if short:
    needs = ", ".join(f"{name} needs >= {k}" for name, k in short)
    raise InputError(f"the model has {num_classes} classes, too few for these attacks ({needs}; "
                     "DLR needs 3 classes, targeted DLR 4): drop them from the suite")


def check_zero_gradients(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array) -> list[str]:
  """Flags examples whose input-gradient of the cross-entropy is exactly zero.

  Args:
    logits_fn: ``[N, ...] -> [N, K]``.
    x: inputs ``[N, ...]``.
    y: labels ``[N]``.

  Returns:
    A message when any example has an all-zero gradient.
  """

  def loss(x):
    return jnp.sum(core.cross_entropy_loss(logits_fn(x), y))

  grad = jax.jit(jax.grad(loss))(jnp.asarray(x))
  zero = np.asarray(jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=1))
  if not zero.any():
    return []
  return [
      f"{int(zero.sum())} of {zero.size} examples ({zero.mean():.1%}) have an all-zero input "
      "gradient: gradient-based attacks see nothing there (saturated softmax, quantized or "
      "non-differentiable preprocessing?), so the evaluation may be unreliable; look at "
      "the gradient-free attacks' results"
  ]


def check_randomized(logits_fn: core.LogitsFn,
                     x: jax.Array,
                     *,
                     passes: int = 3,
                     tolerance: float = 1e-4) -> list[str]:
  """Flags a model whose outputs differ between forward passes on the same input.

  Runs the model eagerly and jitted (randomness drawn in Python or in a host
  callback shows in either), normalizes each output row to unit L2 norm and
  compares. A :class:`attacks.Randomized` model draws the same randomness for
  the same input (its calls are pure), so its draws are compared under
  different keys instead.

  Args:
    logits_fn: ``[N, ...] -> [N, K]``.
    x: inputs ``[N, ...]``.
    passes: forward passes of each kind.
    tolerance: largest accepted L2 difference of normalized rows.

  Returns:
    A message when the model looks randomized.
  """
  x = jnp.asarray(x)
  if isinstance(logits_fn, Randomized):
    draw = jax.jit(logits_fn.fn)
    outputs = [np.asarray(draw(x, jax.random.fold_in(logits_fn.key, i))) for i in range(passes)]
  else:
    jitted = jax.jit(lambda v: logits_fn(v))  # pylint: disable=unnecessary-lambda
    outputs = [np.asarray(logits_fn(x)) for _ in range(passes)]
    outputs += [np.asarray(jitted(x)) for _ in range(passes)]
  normed = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs]
  diff = max(float(np.linalg.norm(a - normed[0], axis=-1).max()) for a in normed[1:])
  preds = {tuple(o.argmax(-1)) for o in outputs}
  if diff <= tolerance and len(preds) == 1:
    return []
  return [
      f"the model looks randomized: {len(outputs)} forward passes on the same inputs differ "
      f"(largest difference of normalized outputs {diff:.2g}); attacks on one sample of the "
      "randomness overstate robustness: average gradients over samples (attacks.eot, "
      "attacks.autoattack(..., version='rand'))"
  ]


def check_dynamic(logits_fn: core.LogitsFn, x: jax.Array, tolerance: float = 1e-4) -> list[str]:
  """Flags a model whose output for an example depends on the other examples of its batch
  (BatchNorm with batch statistics, for instance), as AutoAttack's ``check_dynamic`` does:
  the first half of the batch alone against the same rows inside the whole batch.

  Args:
    logits_fn: ``[N, ...] -> [N, K]``.
    x: inputs ``[N, ...]``, ``N >= 2``.
    tolerance: largest accepted L2 difference of rows normalized to unit norm.

  Returns:
    A message when the outputs depend on the batch.
  """
  x = jnp.asarray(x)
  half = x.shape[0] // 2
  if half == 0 or isinstance(logits_fn, Randomized):
    return []
  jitted = jax.jit(lambda v: logits_fn(v))  # pylint: disable=unnecessary-lambda
  whole, alone = np.asarray(jitted(x))[:half], np.asarray(jitted(x[:half]))
  unit = lambda o: o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10)
  diff = float(np.linalg.norm(unit(whole) - unit(alone), axis=-1).max())
  if diff <= tolerance:
    return []
  return [
      f"the model's outputs depend on the other inputs of its batch (largest difference of "
      f"normalized outputs {diff:.2g} between {half} inputs alone and in a batch of "
      f"{x.shape[0]}; BatchNorm with batch statistics?): attacks and robust accuracy then "
      "depend on the batch size and composition; evaluate the model in inference mode"
  ]


def check_gradient_masking(stage_names: Sequence[str],
                           stage_accuracy: Sequence[float],
                           clean_accuracy: float,
                           *,
                           tolerance: float = 0.002) -> list[str]:
  """Flags a gradient-free stage of a cascade that beat the white-box stages before it.

  In a cascade, a gradient-free attack (Square, SPSA) only sees the points the
  white-box attacks before it left robust; if it still breaks more than
  ``tolerance`` of all examples, the gradients are likely masked.

  Args:
    stage_names: the cascade's stage names ``[S]``.
    stage_accuracy: robust accuracy after each stage ``[S]`` (one epsilon).
    clean_accuracy: accuracy on the clean inputs.
    tolerance: accepted drop, as a fraction of all examples (AutoAttack: 0.2%).
  """
  messages = []
  before = clean_accuracy
  white_box_seen = False
  for name, after in zip(stage_names, stage_accuracy):
    gradient_free = name.lower().startswith(GRADIENT_FREE)
    if gradient_free and white_box_seen and before - after > tolerance:
      messages.append(f"{name}, a gradient-free attack, lowered the robust accuracy by "
                      f"{before - after:.2%} after the white-box attacks: the gradients look "
                      "masked and the evaluation may be unreliable; consider more queries and "
                      "restarts for it or an adaptive attack")
    white_box_seen |= not gradient_free
    before = after
  return messages


def diagnose(logits_fn: core.LogitsFn,
             x: jax.Array,
             y: jax.Array,
             stages: Sequence[core.AttackFn] = (),
             *,
             emit: bool = True) -> tuple[str, ...]:
  """Runs the checks that need only the model and one batch.

  Args:
    logits_fn: ``[N, ...] -> [N, K]``.
    x: a batch of inputs ``[N, ...]`` (the first batch of an evaluation).
    y: its labels ``[N]``.
    stages: the attacks to be run; a model with too few classes for them is an
      error.
    emit: also emit each message as an :class:`AttackWarning`.

  Returns:
    The warning messages (empty when nothing looks wrong).

  Raises:
    InputError: when the model has too few classes for a stage.
  """
  logits = jax.jit(lambda v: logits_fn(v))(jnp.asarray(x))  # pylint: disable=unnecessary-lambda
  core.check_logits_shape(logits, np.shape(x)[0])
  check_num_classes(logits.shape[1], stages)
  randomized = any("eot" in s.name.lower() for s in stages)
  messages = core.check_probabilities(logits)
  messages += check_zero_gradients(logits_fn, x, y)
  if not randomized:
    messages += check_randomized(logits_fn, x)
  messages += check_dynamic(logits_fn, x)
  if emit:
    warn(messages)
  return tuple(messages)

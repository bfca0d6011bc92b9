"""Pure training steps: ``train_step(state, (x, y)) -> (state, metrics)``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from robustlib import checks
from robustlib.data import Augment
from training.state import TrainState

# loss_fn(apply_fn, variables, x, y, key, step) -> (loss, (metrics, new_batch_stats))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]


def standard_loss(apply_fn, variables, x, y, key, step):
  """Cross-entropy on clean inputs, with the model in train mode.

  Args:
    apply_fn: ``model.apply``.
    variables: ``{"params", ["batch_stats"]}``.
    x: inputs ``[B, H, W, C]``; y: labels ``[B]``.
    key: PRNG key for stochastic layers; step: the current step (unused).

  Returns:
    ``(loss, (metrics, batch_stats))``.
  """
  del step
  logits, updates = apply_fn(variables,
                             x,
                             train=True,
                             mutable=["batch_stats"],
                             rngs={"dropout": key})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
  return loss, (metrics, updates.get("batch_stats", variables.get("batch_stats", {})))


DTYPES = ("float32", "bfloat16")


def mixed_precision(apply_fn, dtype: str = "bfloat16"):
  """``apply_fn`` computing in ``dtype``: floating variables and inputs are cast to it, and
  floating outputs (logits, updated BatchNorm statistics) back to float32.

  The caller's parameters stay float32 (their gradients come back float32 through the casts),
  and the loss is computed from float32 logits: bfloat16 has float32's exponent range, so no
  loss scaling is needed (Micikevicius et al. 2018 need it for float16). The result's
  ``full_precision`` is ``apply_fn`` itself: what certified losses bound
  (`training.methods`), since bounds of the bfloat16 program carry its rounding.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if dtype == "float32":
    return apply_fn
  compute = jnp.dtype(dtype)

  def cast(tree, to):
    return jax.tree.map(
        lambda v: v.astype(to) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v, tree)

  def apply(variables, x, *args, **kwargs):
    return cast(apply_fn(cast(variables, compute), cast(x, compute), *args, **kwargs), jnp.float32)

  apply.full_precision = apply_fn
  return apply


def make_train_step(apply_fn,
                    tx: optax.GradientTransformation,
                    loss_fn: LossFn = standard_loss,
                    ema_decay: float = 0.0,
                    augment: Optional[Augment] = None):
  """Builds the pure train step.

  Args:
    apply_fn: ``model.apply``.
    tx: the optimizer.
    loss_fn: the training objective (see ``LossFn``).
    ema_decay: with a state that has ``ema_params``, each step ``t`` (counted from 0)
      sets them to ``d * ema_params + (1 - d) * params`` with the warm-up
      ``d = min(ema_decay, (1 + t) / (10 + t))`` (Gowal et al. 2020), and averages the
      BatchNorm statistics the same way (``ema_batch_stats``).
    augment: ``augment(key, x) -> x`` applied to each batch inside the step, with
      a key of its own (``robustlib.data.make_augment``); None: none.

  Returns:
    ``train_step(state, (x [B, ...], y [B])) -> (state, metrics)``, with
    metrics ``loss``, ``accuracy``, ``grad_norm`` and ``learning_rate``-free
    scalars averaged over the batch, and ``nonfinite``: 1.0 where the loss, a
    gradient, the new parameters or BatchNorm statistics were not finite. Such a
    step changes nothing but the step counter (as ``optax.apply_if_finite`` skips
    an update, here with the optimizer state, the average and the statistics too),
    so the data order stays that of the step.
  """

  def train_step(state: TrainState, batch):
    x, y = batch
    key = jax.random.fold_in(state.key, state.step)
    if augment is not None:
      key, augment_key = jax.random.split(key)
      x = augment(augment_key, x)

    def objective(params):
      variables = state.variables() | {"params": params}
      return loss_fn(apply_fn, variables, x, y, key, state.step)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(objective,
                                                               has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_params:
      t = state.step.astype(jnp.float32)
      keep = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
      ema_params = optax.incremental_update(params, ema_params, 1.0 - keep)
      if ema_batch_stats:
        ema_batch_stats = optax.incremental_update(batch_stats, ema_batch_stats, 1.0 - keep)
    new_state = state.replace(params=params,
                              batch_stats=batch_stats,
                              opt_state=opt_state,
                              ema_params=ema_params,
                              ema_batch_stats=ema_batch_stats)
    finite = checks.all_finite((loss, grads, params, batch_stats))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(metrics,
                   grad_norm=optax.tree.norm(grads),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state.replace(step=state.step + 1), metrics

  return train_step

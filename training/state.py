"""The train state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from robustlib import models


@flax.struct.dataclass
class TrainState:
  """Immutable training state.

  Attributes:
    step: int32 scalar, the number of steps taken.
    params: the model's parameters.
    batch_stats: BatchNorm running statistics (an empty dict for models without).
    opt_state: the optax optimizer state.
    key: the run's PRNG key (raw uint32[2]); step ``s`` uses ``fold_in(key, s)``.
    ema_params: an exponential moving average of ``params`` (an empty dict when
      weight averaging is off); evaluation uses it when present.
    ema_batch_stats: the same average of ``batch_stats`` (empty without weight
      averaging or BatchNorm): the statistics the averaged weights are evaluated with.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array
  ema_params: Any = flax.struct.field(default_factory=dict)
  ema_batch_stats: Any = flax.struct.field(default_factory=dict)

  def variables(self) -> dict:
    """The model variables for ``model.apply``."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

  def eval_fields(self) -> dict[str, str]:
    """Which field holds each variable collection to evaluate: the averaged parameters
    (and BatchNorm statistics) when there are any. Saved with every checkpoint (the
    run format of `robustlib.checkpoints`), so a loader needs no field names."""
    fields = {"params": "ema_params" if self.ema_params else "params"}
    if self.batch_stats:
      fields["batch_stats"] = "ema_batch_stats" if self.ema_batch_stats else "batch_stats"
    return fields

  def eval_variables(self) -> dict:
    """The variables to evaluate (see `eval_fields`)."""
    return {name: getattr(self, field) for name, field in self.eval_fields().items()}


def create(model,
           tx: optax.GradientTransformation,
           key: jax.Array,
           input_shape: tuple[int, ...],
           ema: bool = False) -> TrainState:
  """Initializes the model and optimizer from ``key`` (a raw ``PRNGKey``).

  With ``ema``, the state also carries a moving average of the parameters and of the
  BatchNorm statistics, starting at their initial values.
  """
  init_key, state_key = jax.random.split(key)
  variables = models.init(model, init_key, input_shape)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=params,
                    batch_stats=batch_stats,
                    opt_state=tx.init(params),
                    key=state_key,
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {},
                    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else {})

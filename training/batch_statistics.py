"""BatchNorm in bound computations with the clean batch's statistics.

Certified training bounds the network as it trains: Shi et al. 2021 ("Fast Certified
Robust Training with Short Warmup") and auto_LiRPA bound a BatchNorm layer in training
mode as the affine map ``(x - mean) / sqrt(var + eps) * scale + bias`` with the mean and
variance of the *clean* batch at that layer (not the running averages, and not the
statistics of perturbed inputs, for which a batch has no meaning under bounds).

`record` runs a Flax model's training-mode pass and notes each ``flax.linen.BatchNorm``'s
batch statistics by module path; `replay` makes a function call every such layer as
that affine map. Gradients flow through the statistics, as in training mode. Models
without BatchNorm are unaffected.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Statistics = dict[tuple[str, ...], tuple[jax.Array, jax.Array]]


def _axes(module: nn.BatchNorm, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  features = tuple(sorted(a % ndim for a in axis))
  return features, tuple(i for i in range(ndim) if i not in features)


def _is_batch_norm_call(context: Any) -> bool:
  return isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"


def _uses_batch(module: nn.BatchNorm, kwargs: dict, args: tuple) -> bool:
  given = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  running = module.use_running_average if given is None else given
  return not running


def record(call: Callable[[], Any]) -> tuple[Any, Statistics]:
  """``(call(), statistics)``: the mean and variance (float32, over every axis but the
  features) of each BatchNorm layer's input where ``call`` (a training-mode
  ``model.apply``) normalizes with batch statistics."""
  stats: Statistics = {}

  def interceptor(next_fun, args, kwargs, context):
    if _is_batch_norm_call(context) and _uses_batch(context.module, kwargs, args):
      x = jnp.asarray(args[0], jnp.float32)
      _, reduction = _axes(context.module, x.ndim)
      mean = jnp.mean(x, reduction)
      var = jnp.maximum(jnp.mean(jnp.square(x), reduction) - jnp.square(mean), 0.0)
      stats[tuple(context.module.path)] = (mean, var)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = call()
  return out, stats


def replay(fn: Callable[..., Any], stats: Statistics) -> Callable[..., Any]:
  """``fn`` (an inference-mode ``model.apply`` closure) with each BatchNorm layer that
  `record` saw computed as the affine map of its recorded statistics."""
  if not stats:
    return fn

  def interceptor(next_fun, args, kwargs, context):
    if not _is_batch_norm_call(context) or tuple(context.module.path) not in stats:
      return next_fun(*args, **kwargs)
    module, x = context.module, args[0]
    mean, var = stats[tuple(module.path)]
    features, _ = _axes(module, x.ndim)
    shape = [x.shape[i] if i in features else 1 for i in range(x.ndim)]
    params = module.variables.get("params", {})
    y = (x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + module.epsilon)
    if module.use_scale:
      y = y * params["scale"].reshape(shape)
    if module.use_bias:
      y = y + params["bias"].reshape(shape)
    return y.astype(x.dtype)

  def replayed(*args, **kwargs):
    with nn.intercept_methods(interceptor):
      return fn(*args, **kwargs)

  return replayed

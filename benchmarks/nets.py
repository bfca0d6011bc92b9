"""The benchmark networks as plain JAX functions and, with the same weights, PyTorch modules.

Weights are stored in PyTorch's layout (OIHW kernels, ``[out, in]`` linear
weights, channel-major flatten) and both functions take NCHW images, so both
libraries see the same weights and points. Inside, each library computes in its
own native layout: the JAX function transposes the images to NHWC once, runs its
convolutions channels-last (the fast layout of XLA's CPU convolutions) and goes
back to channel-major order before flattening (``channels_last=False`` keeps
NCHW throughout). Weights are trained briefly in JAX (Adam on cross-entropy) so
that robust accuracies are not trivially zero or one.

Architectures (28x28x1 inputs):
  * ``mlp``: 784-256-256-10, ReLU; ``mlp_4x256``, ``mlp_6x256``: four and six
    hidden layers of 256.
  * ``cnn_small`` (Gowal et al. 2018): conv 16 4x4 s2, conv 32 4x4 s1, FC100, FC10.
  * ``cnn_large`` (Gowal et al. 2018): conv 64, 64, 128 (s2), 128, 128, all 3x3 SAME,
    FC512, FC10.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import attacks
from robustlib import data

# (kind, out, kernel, stride, padding) per layer; "fc" layers flatten first.
ARCHITECTURES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "mlp": (("fc", 256), ("fc", 256), ("fc", 10)),
    "mlp_4x256": (("fc", 256),) * 4 + (("fc", 10),),
    "mlp_6x256": (("fc", 256),) * 6 + (("fc", 10),),
    "cnn_small": (("conv", 16, 4, 2, 0), ("conv", 32, 4, 1, 0), ("fc", 100), ("fc", 10)),
    "cnn_large": (("conv", 64, 3, 1, 1), ("conv", 64, 3, 1, 1), ("conv", 128, 3, 2, 1),
                  ("conv", 128, 3, 1, 1), ("conv", 128, 3, 1, 1), ("fc", 512), ("fc", 10)),
}
Params = list[tuple[np.ndarray, np.ndarray]]


def init_params(name: str, key: jax.Array, input_shape=(1, 28, 28)) -> Params:
  """He-uniform weights in PyTorch layout."""
  params = []
  shape = input_shape
  for layer in ARCHITECTURES[name]:
    key, sub = jax.random.split(key)
    if layer[0] == "conv":
      _, out, k, s, p = layer
      fan_in = shape[0] * k * k
      w = jax.random.uniform(sub, (out, shape[0], k, k), minval=-1, maxval=1) * np.sqrt(6 / fan_in)
      size = (shape[1] + 2 * p - k) // s + 1
      shape = (out, size, size)
    else:
      fan_in = int(np.prod(shape))
      w = jax.random.uniform(sub, (layer[1], fan_in), minval=-1, maxval=1) * np.sqrt(6 / fan_in)
      shape = (layer[1],)
    params.append((np.asarray(w, np.float32), np.zeros(w.shape[0], np.float32)))
  return params


def logits_fn(
    name: str,
    params: Params,
    channels_last: bool = True,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu) -> Callable[[jax.Array], jax.Array]:
  """``[N, 1, 28, 28] -> [N, 10]`` closing over ``params`` (constants of the function).

  With ``channels_last`` (JAX's native layout, and the fast one for XLA's CPU
  convolutions) the input is transposed to NHWC once, the convolutions run
  NHWC/HWIO, and the last feature maps go back to channel-major order before
  flattening, so the function equals the NCHW one (and PyTorch's) exactly.
  ``activation`` follows every layer but the last (the identity gives the
  network's linear operations alone).
  """
  layers = ARCHITECTURES[name]

  def apply(x: jax.Array) -> jax.Array:
    return _apply(layers, [(jnp.asarray(w), jnp.asarray(b)) for w, b in params], x, channels_last,
                  activation)

  return apply


def _apply(layers, params, x, channels_last, activation):
  channels_last = channels_last and layers[0][0] == "conv"
  h = jnp.transpose(x, (0, 2, 3, 1)) if channels_last else x
  for i, (layer, (w, b)) in enumerate(zip(layers, params)):
    if layer[0] == "conv":
      _, _, _, s, p = layer
      if channels_last:
        h = jax.lax.conv_general_dilated(h,
                                         jnp.transpose(w, (2, 3, 1, 0)), (s, s), [(p, p)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
      else:
        h = jax.lax.conv_general_dilated(h,
                                         w, (s, s), [(p, p)] * 2,
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = h + b[None, :, None, None]
    else:
      if channels_last and h.ndim == 4:
        h = jnp.transpose(h, (0, 3, 1, 2))
      h = h.reshape(h.shape[0], -1) @ w.T + b
    if i < len(layers) - 1:
      h = activation(h)
  return h


def torch_module(name: str, params: Params):
  """The same network as a ``torch.nn.Sequential`` in eval mode, weights copied."""
  import torch  # pylint: disable=import-outside-toplevel
  nn = torch.nn
  modules = []
  in_channels = 1
  layers = ARCHITECTURES[name]
  flat = False
  for i, (layer, (w, b)) in enumerate(zip(layers, params)):
    if layer[0] == "conv":
      _, out, k, s, p = layer
      m = nn.Conv2d(in_channels, out, k, stride=s, padding=p)
      in_channels = out
    else:
      if not flat:
        modules.append(nn.Flatten())
        flat = True
      m = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
      m.weight.copy_(torch.from_numpy(np.asarray(w)))
      m.bias.copy_(torch.from_numpy(np.asarray(b)))
    modules.append(m)
    if i < len(layers) - 1:
      modules.append(nn.ReLU())
  return nn.Sequential(*modules).eval()


def to_onnx(name: str, params: Params) -> bytes:
  """The network as an ONNX model (opset 13: Conv, Flatten, Gemm, Relu) reading NCHW images."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  nodes, inits, h, flat = [], [], "x", False
  layers = ARCHITECTURES[name]
  for i, (layer, (w, b)) in enumerate(zip(layers, params)):
    inits += [
        numpy_helper.from_array(np.asarray(w, np.float32), f"w{i}"),
        numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}")
    ]
    out = "y" if i + 1 == len(layers) else f"z{i}"
    if layer[0] == "conv":
      _, _, k, st, p = layer
      nodes.append(
          helper.make_node("Conv", [h, f"w{i}", f"b{i}"], [out],
                           kernel_shape=[k, k],
                           strides=[st, st],
                           pads=[p] * 4))
    else:
      if not flat:
        nodes.append(helper.make_node("Flatten", [h], [f"flat{i}"], axis=1))
        h, flat = f"flat{i}", True
      nodes.append(helper.make_node("Gemm", [h, f"w{i}", f"b{i}"], [out], transB=1))
    if out != "y":
      nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
      h = f"h{i}"
  graph = helper.make_graph(
      nodes, name, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def mnist_nchw(split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num`` images of an MNIST split as ``[num, 1, 28, 28]`` float32 and labels.

  MNIST comes from ``$ROBUSTLIB_DATA_DIR`` (see ``robustlib.data.load``).
  """
  ds = data.load("mnist", split, download=False)
  return np.transpose(ds.images[:num], (0, 3, 1, 2)).copy(), ds.labels[:num]


def train(name: str,
          steps: int,
          seed: int = 0,
          batch_size: int = 128,
          adversarial_eps: float = 0.0,
          pgd_steps: int = 0,
          ramp_steps: int = 0) -> Params:
  """Adam (1e-3) on cross-entropy for ``steps`` steps on MNIST; prints the time taken.

  With ``adversarial_eps > 0``, on L-inf FGSM points with a random start of that
  radius (step 1.25 eps; Wong et al. 2020, "Fast is better than free"), so that a
  robustness evaluation has points that survive its first attacks; with
  ``pgd_steps > 0`` on PGD points of that many steps instead (Madry et al. 2018;
  steps of 2.5 eps / pgd_steps from a random start). The radius grows linearly from 0
  over the first ``ramp_steps`` steps (a small network trained at MNIST's eps 0.3 from
  the start stays at chance; Gowal et al. 2018 ramp theirs likewise).
  """
  x, y = mnist_nchw("train", 60000)
  params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in init_params(name, jax.random.key(seed))]
  tx = optax.adam(1e-3)
  layers = ARCHITECTURES[name]

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(_apply(layers, p, xb, True, jax.nn.relu),
                                                           yb).mean()

  @jax.jit
  def step(p, o, xb, yb, key, eps):
    if adversarial_eps > 0 and pgd_steps > 0:
      fn = lambda z: _apply(layers, p, z, True, jax.nn.relu)
      xb = attacks.pgd(eps=adversarial_eps, steps=pgd_steps)(fn, xb, yb, key, eps=eps)
    elif adversarial_eps > 0:
      delta = jax.random.uniform(key, xb.shape, minval=-eps, maxval=eps)
      g = jax.grad(lambda z: loss(p, z, yb))(jnp.clip(xb + delta, 0.0, 1.0))
      delta = jnp.clip(delta + 1.25 * eps * jnp.sign(g), -eps, eps)
      xb = jnp.clip(xb + delta, 0.0, 1.0)
    g = jax.grad(loss)(p, xb, yb)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  key = jax.random.key(seed)
  for i in range(steps):
    idx = rng.integers(0, x.shape[0], batch_size)
    eps = adversarial_eps * min(1.0, (i + 1) / ramp_steps) if ramp_steps else adversarial_eps
    params, opt_state = step(params, opt_state, x[idx], y[idx], jax.random.fold_in(key, i),
                             jnp.float32(eps))
  jax.block_until_ready(params)
  kind = "clean"
  if adversarial_eps > 0:
    kind = f"{f'PGD-{pgd_steps}' if pgd_steps else 'FGSM-RS'} eps {adversarial_eps:g}"
    kind += f", ramped over {ramp_steps} steps" if ramp_steps else ""
  print(f"trained {name} ({kind}) for {steps} steps in {time.perf_counter() - start:.1f} s")
  return [(np.asarray(w), np.asarray(b)) for w, b in params]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up (compilation) call."""
  return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median wall time of each function, timed in turn, one timed call of each per round.

  After one warm-up (compilation) call each. Interleaving spreads the drift of a
  noisy machine over all of them, so their ratios hold better than those of
  back-to-back series. With several functions, each timed call follows an
  untimed call of the same function: a library's worker threads go to sleep
  while another library runs, and waking them at every parallel operation of the
  next call costs a call of many small operations (IBP, an attack on an MLP) up
  to several times its steady-state time here, which is not the cost of either
  library in use.
  """
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      if len(fns) > 1:
        fn()
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}

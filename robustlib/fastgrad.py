"""Faster input-gradients of convolutions inside loops, for any JAX function.

On XLA's CPU backend the input-gradient of a convolution inside ``lax.fori_loop``
or ``lax.scan`` runs several times slower than the same gradient outside a loop:
JAX's transpose rule expresses it as a convolution with the kernel reversed
inside the program and its in/out channel roles swapped through the dimension
numbers, and the layout XLA then picks for the kernel is slow. This module
rewrites a function so that every convolution whose kernel does not depend on
the input gets a custom VJP whose input-gradient is a plain convolution with a
kernel that was flipped spatially and had its in/out channels swapped once, at
preparation time (before the loop). A convolution with few input channels (a
first layer) is computed instead as one matrix product of its patches, and its
input-gradient as a matrix product and a scatter. Forward results are
bit-identical except for those first layers; they and the gradients agree to
float rounding (see ``PERFORMANCE.md``).

Example::

  fast_fn = fastgrad.prepare(logits_fn, x)   # once, before the loop
  def body(i, z):
    g = jax.grad(lambda v: loss(fast_fn(v)))(z)
    ...

How it works: ``fn`` is traced to a jaxpr for inputs shaped like the example.
The part of the jaxpr that does not depend on the inputs (the weights, their
casts and reshapes) is evaluated once, in :func:`prepare` — concretely, or
inside whatever trace ``prepare`` is called in (e.g. a jitted training step
whose parameters are tracers). The prepared function evaluates the rest equation
by equation, re-binding every primitive unchanged except
``conv_general_dilated`` with an input-independent kernel, and inlining nested
``jit`` calls so their convolutions are found too. Calls with custom derivative
rules (``custom_jvp``/``custom_vjp``, e.g. ``jax.nn.relu``) are re-bound as they
are: their rules, not their bodies, define their gradients.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import jax
from jax import lax
import numpy as np

from robustlib import jax_internals as jint

# Call primitives whose body is inlined (their gradient is their body's gradient).
_INLINED_CALLS = ("jit", "pjit", "closed_call", "core_call")
_CONV = "conv_general_dilated"


class _Unknown:
  """Marks a value that depends on the prepared function's inputs."""

  def __repr__(self):
    return "<input-dependent>"


_UNKNOWN = _Unknown()

# ----------------------------------------------------------------------------
# The convolution with a prepared input-gradient.


def _dilate_shape(shape, dilation):
  return tuple(0 if d == 0 else 1 + r * (d - 1) for d, r in zip(shape, dilation))


def _transposed_kernel(rhs: jax.Array, params: dict[str, Any]) -> jax.Array:
  """The kernel of the input-gradient convolution, laid out like ``rhs``.

  JAX's transpose rule uses ``rev(rhs)`` with the rhs spec's in/out feature
  dimensions swapped; here the swap is a physical transpose, done once, so the
  gradient convolution reads the kernel with the forward pass's dimension numbers.
  """
  _, rhs_spec, _ = params["dimension_numbers"]
  groups = params["feature_group_count"]
  out_dim, in_dim = rhs_spec[0], rhs_spec[1]
  if groups > 1:
    # Move the group axis from the output features into the input features.
    shape = list(rhs.shape)
    shape[out_dim:out_dim + 1] = [groups, shape[out_dim] // groups]
    rhs = lax.reshape(rhs, shape)
    perm = [i for i in range(rhs.ndim) if i != out_dim]
    dst = in_dim  # the in-feature axis's index once the group axis is taken out
    perm.insert(dst, out_dim)
    new_shape = list(np.delete(rhs.shape, out_dim))
    new_shape[dst] *= rhs.shape[out_dim]
    rhs = lax.reshape(rhs, new_shape, perm)
  spatial = tuple(rhs_spec[2:])
  rhs = lax.rev(rhs, spatial)
  perm = list(range(rhs.ndim))
  perm[out_dim], perm[in_dim] = perm[in_dim], perm[out_dim]
  return lax.transpose(rhs, perm)


def _make_fast_conv(params: dict[str, Any]) -> Callable[..., jax.Array]:
  """``conv(lhs, rhs, rhs_t)``: the original convolution, with a VJP that uses ``rhs_t``."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  primitive = jint.primitives.conv_general_dilated_p

  def forward(lhs, rhs):
    if _scatter_pays(params, rhs.shape):
      return _patch_product(lhs, rhs, params)
    return primitive.bind(lhs, rhs, **params)

  @jax.custom_vjp
  def conv(lhs, rhs, rhs_t):
    del rhs_t
    return forward(lhs, rhs)

  def conv_fwd(lhs, rhs, rhs_t):
    return forward(lhs, rhs), (lhs, rhs, rhs_t)

  def conv_bwd(residuals, g):
    lhs, rhs, rhs_t = residuals
    lhs_sdims = [lhs.shape[d] for d in lhs_spec[2:]]
    rhs_sdims = [rhs.shape[d] for d in rhs_spec[2:]]
    out_sdims = [g.shape[d] for d in out_spec[2:]]
    in_dilated = _dilate_shape(lhs_sdims, params["lhs_dilation"])
    window_dilated = _dilate_shape(rhs_sdims, params["rhs_dilation"])
    out_dilated = _dilate_shape(out_sdims, params["window_strides"])
    before = [w - lo - 1 for w, (lo, _) in zip(window_dilated, params["padding"])]
    after = [
        i + w - 1 - o - b for i, w, o, b in zip(in_dilated, window_dilated, out_dilated, before)
    ]
    kernel = rhs_t if rhs_t.dtype == g.dtype else lax.convert_element_type(rhs_t, g.dtype)
    gradient_params = dict(window_strides=params["lhs_dilation"],
                           padding=tuple(zip(before, after)),
                           lhs_dilation=params["window_strides"],
                           rhs_dilation=params["rhs_dilation"],
                           dimension_numbers=lax.ConvDimensionNumbers(out_spec, rhs_spec, lhs_spec),
                           feature_group_count=params["feature_group_count"],
                           precision=params["precision"],
                           preferred_element_type=params["preferred_element_type"])
    if _scatter_pays(params, rhs.shape):
      g_lhs = _scatter_input_gradient(params, tuple(lhs_sdims))(g, rhs)
    else:
      g_lhs = _input_gradient(gradient_params, forward)(g, kernel, rhs)
    if g_lhs.dtype != lhs.dtype:
      g_lhs = lax.convert_element_type(g_lhs, lhs.dtype)
    # The kernel's gradient (e.g. adversarial training through the attack) as JAX computes it.
    _, rhs_vjp = jax.vjp(lambda r: forward(lhs, r), rhs)
    (g_rhs,) = rhs_vjp(g)
    return g_lhs, g_rhs, jax.numpy.zeros_like(rhs_t)

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def _scatter_pays(params: dict[str, Any], rhs_shape: tuple[int, ...]) -> bool:
  """Whether `_scatter_input_gradient` applies and beats a transposed convolution.

  It applies to channels-last convolutions with one feature group and no input
  dilation, and pays when each output element scatters no more values than it
  has channels (``prod(K) * I <= O``: few input channels, as a network's first
  layer). Measured on this CPU for the small CNN's first layer (28x28x1 -> 16
  channels, 4x4, stride 2): 2.6 -> 0.7 ms at batch 128, 33 -> 9 ms for the 2304
  rows of a backward bound pass.
  """
  if params["feature_group_count"] != 1 or any(d != 1 for d in params["lhs_dilation"]):
    return False
  return math.prod(rhs_shape[:-1]) <= rhs_shape[-1]


def _scatter_input_gradient(params: dict[str, Any], lhs_spatial: tuple[int, ...]) -> Callable:
  """The input-gradient of a channels-last convolution as one matrix product and a scatter.

  ``out[n, m s + k d - lo, i] += sum_o g[n, m, o] rhs[k, i, o]``: the product
  ``Z = g . rhs^T`` gives every (position, kernel offset) contribution at once.
  Kernel offsets whose positions fall on the same strided lattice of the output
  are summed at the resolution of ``g`` (shifted by whole strides), and each
  lattice is placed with one strided pad; XLA fuses the sums into few passes.

  It is differentiable in turn (CROWN-IBP training differentiates backward
  bound passes), by a custom VJP: with ``P``, the windows of the cotangent
  ``dout`` at every (position, kernel offset) (``[N * M, prod(K) * I]``, no
  larger than ``g`` here), ``dg = P . rhs`` (the forward convolution) and
  ``d rhs = P^T . g``. JAX's own transposes of the strided pads took half of a
  CROWN-IBP training step.

  Args:
    params: channels-last convolution parameters (no input dilation, one group).
    lhs_spatial: the input's spatial shape ``L``.

  Returns:
    ``f(g, rhs)``: ``g [N, *M, O]``, the cotangent of the convolution's output,
    and ``rhs [*K, I, O]``, the kernel, to ``[N, *L, I]``.
  """

  @jax.custom_vjp
  def scatter(g, rhs):
    return _scatter(g, rhs, params, lhs_spatial)

  def scatter_fwd(g, rhs):
    return scatter(g, rhs), (g, rhs)

  def scatter_bwd(residuals, dout):
    g, rhs = residuals
    windows = _windows(dout.astype(g.dtype), rhs.shape[:-2], g.shape[1:-1], params)
    flat_rhs = rhs.astype(g.dtype).reshape(-1, rhs.shape[-1])
    dg = lax.dot(windows, flat_rhs, precision=params["precision"]).reshape(g.shape)
    drhs = lax.dot_general(windows,
                           g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                           precision=params["precision"])
    return dg, drhs.reshape(rhs.shape).astype(rhs.dtype)

  scatter.defvjp(scatter_fwd, scatter_bwd)
  return scatter


def _strided_window(v: jax.Array, start, count, stride) -> jax.Array:
  """``v [N, *S, C]`` at spatial positions ``start + stride * t``, ``0 <= t < count``."""
  limit = [st + (c - 1) * s + 1 for st, c, s in zip(start, count, stride)]
  return lax.slice(v, [0, *start, 0], [v.shape[0], *limit, v.shape[-1]], [1, *stride, 1])


def _windows(v: jax.Array, kernel: tuple[int, ...], out_spatial: tuple[int, ...],
             params: dict[str, Any]) -> jax.Array:
  """``[N * prod(M), prod(K) * I]``: ``v [N, *L, I]`` at ``m s + k d - lo`` (zero outside)."""
  strides, rd = params["window_strides"], params["rhs_dilation"]
  config = [(0, 0, 0)]
  for (lo, _), k, d, s, m, size in zip(params["padding"], kernel, rd, strides, out_spatial,
                                       v.shape[1:-1]):
    config.append((lo, (m - 1) * s + (k - 1) * d - lo - (size - 1), 0))
  vp = lax.pad(v, jax.numpy.zeros((), v.dtype), config + [(0, 0, 0)])
  parts = [
      _strided_window(vp, [kk * d
                           for kk, d in zip(k, rd)], out_spatial, strides)
      for k in itertools.product(*[range(k) for k in kernel])
  ]
  stacked = jax.numpy.stack(parts, axis=-2)  # [N, *M, prod(K), I]
  return stacked.reshape(-1, len(parts) * v.shape[-1])


def _patch_product(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]) -> jax.Array:
  """A channels-last convolution with few input channels as one matrix product of its patches.

  Where `_scatter_pays`, the patches ``[N * prod(M), prod(K) * I]`` are no larger
  than the output; on this CPU the small CNN's first layer (28x28x1 -> 16
  channels, 4x4, stride 2) took 0.52 ms at batch 128 this way against 1.29 ms as
  a convolution (inside a loop, as in an attack).
  """
  out_spatial = tuple(
      (size + lo + hi - (k - 1) * d - 1) // s + 1
      for size, (lo, hi), k, d, s in zip(lhs.shape[1:-1], params["padding"], rhs.shape[:-2],
                                         params["rhs_dilation"], params["window_strides"]))
  windows = _windows(lhs, rhs.shape[:-2], out_spatial, params)
  out = lax.dot_general(windows,
                        rhs.reshape(-1, rhs.shape[-1]).astype(lhs.dtype), (((1,), (0,)), ((), ())),
                        precision=params["precision"],
                        preferred_element_type=params["preferred_element_type"])
  return out.reshape((lhs.shape[0],) + out_spatial + (rhs.shape[-1],))


def _scatter(g: jax.Array, rhs: jax.Array, params: dict[str, Any],
             lhs_spatial: tuple[int, ...]) -> jax.Array:
  """`_scatter_input_gradient`'s forward computation."""
  kernel, in_features = rhs.shape[:-2], rhs.shape[-2]
  out_spatial = g.shape[1:-1]
  z = lax.dot_general(g.reshape(-1, g.shape[-1]),
                      rhs.astype(g.dtype).reshape(-1, rhs.shape[-1]), (((1,), (1,)), ((), ())),
                      precision=params["precision"])
  z = z.reshape(g.shape[:-1] + tuple(kernel) + (in_features,))
  strides, rd = params["window_strides"], params["rhs_dilation"]
  zero = jax.numpy.zeros((), g.dtype)
  z = z.reshape(g.shape[:-1] + (-1, in_features))
  # Offset k lands at output positions m s + k d - lo = (m + b) s + r, r = (k d - lo) mod s.
  # Offsets with the same residue r share one strided lattice: sum them, shifted by b, at the
  # resolution of the output of the convolution, then place each lattice with one strided pad.
  lattices: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
  for offset, k in enumerate(itertools.product(*[range(k) for k in kernel])):
    first = [kk * d - lo for kk, d, (lo, _) in zip(k, rd, params["padding"])]
    residue = tuple(f % st for f, st in zip(first, strides))
    lattices.setdefault(residue, []).append(
        (offset, tuple(f // st for f, st in zip(first, strides))))
  out = None
  for residue, members in lattices.items():
    low = [min(b[i] for _, b in members) for i in range(len(residue))]
    high = [max(b[i] for _, b in members) for i in range(len(residue))]
    lattice = None
    for offset, b in members:
      config = [(0, 0, 0)] + [(bi - lo, hi - bi, 0) for bi, lo, hi in zip(b, low, high)]
      shifted = lax.pad(z[..., offset, :], zero, config + [(0, 0, 0)])
      lattice = shifted if lattice is None else lattice + shifted
    config = [(0, 0, 0)]
    for lo, hi, r, st, m, size in zip(low, high, residue, strides, out_spatial, lhs_spatial):
      before = lo * st + r
      config.append((before, size - before - (m + hi - lo - 1) * st - 1, st - 1))
    placed = lax.pad(lattice, zero, config + [(0, 0, 0)])
    out = placed if out is None else out + placed
  return out


def _input_gradient(params: dict[str, Any], forward: Callable) -> Callable[..., jax.Array]:
  """``f(g, kernel, rhs)``: the input-gradient convolution of ``g`` (``params``, channels-last).

  It is differentiable in turn (CROWN-IBP training differentiates the backward
  bound pass): with respect to ``g`` by ``forward`` with the original kernel
  ``rhs`` (the transpose of a transpose), with respect to ``kernel`` by
  `_kernel_gradient` (one feature group, unit window strides) or else by XLA's
  kernel-gradient convolution. ``params`` are channels-last, as every convolution
  here is (`_canonical_params`).
  """

  @jax.custom_vjp
  def conv(g, kernel, rhs):
    del rhs
    return lax.conv_general_dilated(g, kernel, **params)

  def conv_fwd(g, kernel, rhs):
    return conv(g, kernel, rhs), (g, kernel, rhs)

  def conv_bwd(residuals, dq):
    g, kernel, rhs = residuals
    dg = forward(dq.astype(g.dtype), rhs.astype(g.dtype))
    if params["feature_group_count"] == 1 and all(s == 1 for s in params["window_strides"]):
      dk = _kernel_gradient(g, dq.astype(g.dtype), kernel.shape[:-2], params)
    else:
      _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(g, k, **params), kernel)
      (dk,) = vjp(dq)
    return dg, dk.astype(kernel.dtype), jax.numpy.zeros_like(rhs)

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def _kernel_gradient(a: jax.Array, dq: jax.Array, kernel_spatial: tuple[int, ...],
                     params: dict[str, Any]) -> jax.Array:
  """``d kernel`` of ``q = conv(a, kernel)``, channels-last, unit window strides, one group.

  ``q[n, m, d] = sum_{k, c} a_dilated[n, m + k rd, c] kernel[k, c, d]`` with ``a``
  dilated by ``lhs_dilation`` and padded, so ``d kernel[k, c, d] = sum_{n, t}
  a[n, t, c] dq[n, lo + ld t - k rd, d]``: for each kernel offset, one matrix
  product of ``a`` with a strided window of ``dq`` at the positions of ``a``.
  On this CPU, for the many-example batches of backward bound passes (2304
  rows), XLA's kernel-gradient convolution took 1.3 s (32 -> 16 channels, 4x4),
  6.9 s (128 -> 128, 3x3) and 107 s (the transpose of a strided 128 -> 64
  convolution, a dilated ``a``); this took 0.28, 2.4 and 2.2 s.

  Args:
    a: ``[N, *L, C]``.
    dq: ``[N, *M, D]``, the cotangent of ``q``.
    kernel_spatial: the kernel's spatial shape ``K``.
    params: the convolution's parameters.

  Returns:
    ``[*K, C, D]``.
  """
  lo = [p[0] for p in params["padding"]]
  ld, rd = params["lhs_dilation"], params["rhs_dilation"]
  spatial_a, spatial_q = a.shape[1:-1], dq.shape[1:-1]
  pre = [max(0, (k - 1) * r - l) for k, r, l in zip(kernel_spatial, rd, lo)]
  post = [max(0, l + d * (n - 1) - (m - 1)) for l, d, n, m in zip(lo, ld, spatial_a, spatial_q)]
  dqp = lax.pad(dq, jax.numpy.zeros((), dq.dtype),
                [(0, 0, 0)] + [(p, q, 0) for p, q in zip(pre, post)] + [(0, 0, 0)])
  rows = a.shape[0] * math.prod(spatial_a)
  flat = a.reshape(rows, a.shape[-1])
  parts = []
  for k in itertools.product(*[range(k) for k in kernel_spatial]):
    start = [l - kk * r + p for l, kk, r, p in zip(lo, k, rd, pre)]
    window = _strided_window(dqp, start, spatial_a, ld)
    parts.append(jax.numpy.einsum("rc,rd->cd", flat, window.reshape(rows, dq.shape[-1])))
  return jax.numpy.stack(parts).reshape(tuple(kernel_spatial) + parts[0].shape)


def _canonical_params(params: dict[str, Any], ndim: int) -> dict[str, Any]:
  """``params`` with channels-last dimension numbers (NHWC / HWIO / NHWC for 2-D)."""
  spatial = tuple(range(1, ndim - 1))
  act = (0, ndim - 1) + spatial
  kernel = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return dict(params, dimension_numbers=lax.ConvDimensionNumbers(act, kernel, act))


def _channels_last(rhs: jax.Array, params: dict[str, Any]) -> tuple[Callable, jax.Array, Callable]:
  """(to_canonical(lhs), canonical kernel, from_canonical(out)) for one convolution.

  XLA's CPU convolutions inside loops are fast only channels-last: a convolution
  in another layout (e.g. PyTorch's NCHW / OIHW) is computed channels-last
  between two transposes of its activations, its kernel transposed once here.
  """
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  lhs_perm = (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],)
  rhs_perm = tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0])
  out_order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
  out_perm = tuple(int(i) for i in np.argsort(out_order))

  def maybe_transpose(v, perm):
    return v if perm == tuple(range(len(perm))) else lax.transpose(v, perm)

  return (lambda lhs: maybe_transpose(lhs, lhs_perm), maybe_transpose(rhs, rhs_perm),
          lambda out: maybe_transpose(out, out_perm))


def conv_with_fast_transpose(rhs: jax.Array, params: dict[str,
                                                          Any]) -> Callable[[jax.Array], jax.Array]:
  """``conv(lhs)``: ``conv_general_dilated(lhs, rhs, **params)`` with a fast input-gradient.

  Its VJP (and linear transpose) with respect to ``lhs`` is a channels-last
  convolution with a kernel flipped and transposed here, once; use it where a
  convolution's transpose runs many times (attack steps, backward bound passes).

  Args:
    rhs: the kernel, laid out as ``params["dimension_numbers"]`` says.
    params: the parameters of a ``conv_general_dilated`` with ``batch_group_count == 1``.

  Returns:
    ``conv(lhs) -> out``, equal to the original convolution.
  """
  to_canonical, rhs_c, from_canonical = _channels_last(rhs, params)
  canonical = _canonical_params(params, rhs.ndim)
  rhs_t = _transposed_kernel(rhs_c, canonical)
  fast = _make_fast_conv(canonical)
  return lambda lhs: from_canonical(fast(to_canonical(lhs), rhs_c, rhs_t))


def _is_replaceable(eqn) -> bool:
  return (eqn.primitive.name == _CONV and eqn.params["batch_group_count"] == 1 and
          len(eqn.invars[0].aval.shape) >= 3)


# ----------------------------------------------------------------------------
# The interpreter.


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
    subfuns, bind_params = bind_params
  with jint.source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
    ans = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return list(ans) if eqn.primitive.multiple_results else [ans]


def _inner_jaxpr(eqn):
  """The closed body of an inlinable call, or None."""
  if eqn.primitive.name not in _INLINED_CALLS:
    return None
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(inner, jint.ClosedJaxpr):
    return inner
  if isinstance(inner, jint.Jaxpr):
    return jint.ClosedJaxpr(inner, ())
  return None


def _contains_conv(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if _is_replaceable(eqn):
      return True
    inner = _inner_jaxpr(eqn)
    if inner is not None and _contains_conv(inner.jaxpr):
      return True
  return False


class _Plan:
  """What preparation found: values of input-independent equations, and kernels.

  Keys are paths of equation indices (one per level of inlined calls), so a
  body called twice with different arguments is planned per call site.
  """

  def __init__(self):
    self.known: dict[tuple[int, ...], list[Any]] = {}
    self.convs: dict[tuple[int, ...], Callable[[jax.Array], jax.Array]] = {}
    self.num_convs = 0


def _interpret(jaxpr, consts, args, path, plan: _Plan, planning: bool):
  """Evaluates ``jaxpr``; while planning, ``_UNKNOWN`` marks input-dependent values."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jint.Literal) else env[v]

  def write(v, val):
    env[v] = val

  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  for i, eqn in enumerate(jaxpr.eqns):
    key = path + (i,)
    if not planning and key in plan.known:
      outs = plan.known[key]
    else:
      invals = [read(v) for v in eqn.invars]
      inner = _inner_jaxpr(eqn)
      unknown = planning and any(val is _UNKNOWN for val in invals)
      if planning and not unknown:
        outs = _bind(eqn, invals)
        plan.known[key] = outs
      elif inner is not None and _contains_conv(inner.jaxpr):
        outs = _interpret(inner.jaxpr, inner.consts, invals, key, plan, planning)
      elif planning:
        if _is_replaceable(eqn) and invals[1] is not _UNKNOWN:
          plan.convs[key] = conv_with_fast_transpose(invals[1], eqn.params)
          plan.num_convs += 1
        outs = [_UNKNOWN] * len(eqn.outvars)
      elif key in plan.convs:
        outs = [plan.convs[key](invals[0])]
      else:
        outs = _bind(eqn, invals)
    for v, val in zip(eqn.outvars, outs):
      write(v, val)
  return [read(v) for v in jaxpr.outvars]


def prepare(fn: Callable[..., Any], *example_args: Any) -> Callable[..., Any]:
  """Returns ``fn`` with fast, prepared input-gradients of its convolutions.

  Call it once, outside the loop that differentiates the result (inside the
  same ``jit`` is fine: the kernels are then prepared by ops placed before the
  loop). Works for any JAX function of array arguments (pytrees allowed):
  Flax models (NHWC/HWIO), any ``dimension_numbers``, strides, padding,
  input and kernel dilation and feature groups.

  Args:
    fn: a JAX function ``fn(*args) -> outputs``, e.g. ``logits_fn(x)``.
    *example_args: arguments shaped like those the prepared function will get
      (values are not used, only shapes and dtypes).

  Returns:
    A function with ``fn``'s signature and results; ``fn`` itself when it has
    no convolution with an input-independent kernel. Called with arguments of
    other shapes or dtypes than the examples, it calls ``fn``.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  if not _contains_conv(closed.jaxpr):
    return fn
  in_tree = jax.tree.structure(example_args)
  in_avals = [(np.shape(a), jax.numpy.result_type(a)) for a in jax.tree.leaves(example_args)]
  out_tree = jax.tree.structure(out_shape)
  plan = _Plan()
  _interpret(closed.jaxpr, closed.consts, [_UNKNOWN] * len(closed.jaxpr.invars), (), plan, True)
  if not plan.num_convs:
    return fn

  def prepared(*args):
    leaves, tree = jax.tree.flatten(args)
    if tree != in_tree or [(np.shape(a), jax.numpy.result_type(a)) for a in leaves] != in_avals:
      return fn(*args)
    outs = _interpret(closed.jaxpr, closed.consts, leaves, (), plan, False)
    return jax.tree.unflatten(out_tree, outs)

  return prepared

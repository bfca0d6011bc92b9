"""Time per batch of IBP, CROWN-IBP and CROWN, and each as a multiple of one forward pass.

    ROBUSTLIB_DATA_DIR=../shared/data python -m benchmarks.bound_speed \\
        --models=mlp,cnn_small,cnn_large --methods=ibp,crown_ibp,crown

Networks from ``benchmarks.nets`` (trained briefly on MNIST, so that the number
of unstable ReLUs, which drives CROWN's cost, is realistic), MNIST test images,
an L-inf ball of radius ``--eps`` intersected with [0, 1], and the margin
specification of the true label. Every bound is one jitted call, timed after
compilation; the forward pass is the jitted ``logits_fn`` on the same batch.
When auto_LiRPA is installed (``--lirpa``, on by default), it bounds the same
network (weights copied to PyTorch), inputs, box and specification with the same
method; the two are timed interleaved, and a second table gives their times,
the ratio, and the largest difference between the two lower bounds relative to
their scale (the bounds must agree). The main table's IBP bounds the network's
logits, then the specification (as IBP training does); against auto_LiRPA, IBP
folds the specification into the last layer, as auto_LiRPA and ``verify.certify`` do. Without it, auto_LiRPA's times on this machine
are in ``../shared/PERFORMANCE.md`` (e.g. CROWN on the small CNN at batch 128:
7.6 s, about 600x its IBP time).
"""

from __future__ import annotations

from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import verify
from benchmarks import nets
from robustlib import compilation
from robustlib import scripts
from verify.crown import lower_bounds

_MODELS = scripts.define_names("models", ["mlp", "cnn_small", "cnn_large"], nets.ARCHITECTURES,
                               "benchmarks.nets names.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per call.")
_EPS = flags.DEFINE_float("eps", 0.03, "L-inf radius.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "Adam steps to train each network.")
_LIRPA = flags.DEFINE_bool("lirpa", True, "Also run auto_LiRPA, when it is installed.")

# Our methods by auto_LiRPA's names.
LIRPA_METHODS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}

BOUNDS = {
    "ibp": lambda fn, box, spec: verify.ibp(lambda z: spec_logits(fn, z, spec), box),
    "crown_ibp": lambda fn, box, spec: verify.crown_ibp(fn, box, spec=spec),
    "crown": lambda fn, box, spec: verify.crown(fn, box, spec=spec),
    "alpha_crown": lambda fn, box, spec: verify.alpha_crown(fn, box, spec=spec),
}
_METHODS = scripts.define_names("methods", ["ibp", "crown_ibp", "crown"], BOUNDS, "Bound methods.")


def spec_logits(fn, x, spec):
  return jnp.einsum("nsk,nk->ns", spec, fn(x))


def spec_ibp(fn, box: verify.Interval, spec: jax.Array) -> verify.Interval:
  """IBP bounds on ``spec @ fn(x)`` with the specification folded into the last layer, as
  `verify.certify` and auto_LiRPA compute them (both sides, as auto_LiRPA's default)."""
  s = spec.shape[1]
  lower = lower_bounds(fn, box, jnp.concatenate([spec, -spec], axis=1), "ibp")
  return verify.Interval(lower[:, :s], -lower[:, s:])


# The main table times IBP of the network (what IBP training uses); against auto_LiRPA, IBP with
# the specification folded into the last layer, which gives auto_LiRPA's (tighter) bounds.
AS_LIRPA = {"ibp": spec_ibp}


def lirpa_bounds(name: str, params, x_np: np.ndarray, box: verify.Interval,
                 spec: jax.Array) -> Callable[[str], np.ndarray] | None:
  """auto_LiRPA's lower bounds ``[N, S]`` on the same problem, by our method name.

  None when auto_LiRPA (or PyTorch) is not installed. Like ours, each call bounds
  both sides (auto_LiRPA's default).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from auto_LiRPA import BoundedModule, BoundedTensor  # pylint: disable=import-outside-toplevel
    from auto_LiRPA.perturbations import PerturbationLpNorm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  model = nets.torch_module(name, params)
  x = torch.from_numpy(np.array(x_np))
  bounded = BoundedModule(model, torch.zeros_like(x), device="cpu")
  ball = PerturbationLpNorm(norm=np.inf,
                            x_L=torch.from_numpy(np.array(box.lower)),
                            x_U=torch.from_numpy(np.array(box.upper)))
  inputs = BoundedTensor(x, ball)
  c = torch.from_numpy(np.array(spec))

  def bound(method: str) -> np.ndarray:
    with torch.no_grad():
      lower, _ = bounded.compute_bounds(x=(inputs,), C=c, method=LIRPA_METHODS[method])
    return lower.numpy()

  return bound


def _jit_bound(bound_fn, fn):
  """``(lower, upper, spec) -> Interval``, jitted. Both sides come out of the call, so that
  neither is left out of the work."""
  return compilation.jit(lambda lo, hi, s: bound_fn(fn, verify.Interval(lo, hi), s))


def main(argv):
  del argv
  print(f"bounds on margins, L-inf eps {_EPS.value}, batch {_BATCH.value}, "
        f"{jax.devices()[0].platform}, median of {_REPEATS.value}")
  header = f"{'model':>10} {'forward ms':>11}"
  for m in _METHODS.value:
    header += f" {m + ' ms':>14} {'x fwd':>7} {'verified':>9}"
  rows, lirpa_rows = [], []
  for name in _MODELS.value:
    params = nets.train(name, _TRAIN_STEPS.value)
    fn = nets.logits_fn(name, params)
    x_np, y_np = nets.mnist_nchw("test", _BATCH.value)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    box = verify.linf_ball(x, _EPS.value)
    spec = verify.margin_spec(y, 10)
    forward = compilation.jit(fn)
    fwd = nets.median_seconds(lambda: jax.block_until_ready(forward(x)), _REPEATS.value)
    theirs = lirpa_bounds(name, params, x_np, box, spec) if _LIRPA.value else None
    row = f"{name:>10} {1e3 * fwd:>11.2f}"
    for method in _METHODS.value:
      bound = _jit_bound(BOUNDS[method], fn)
      timed = {"ours": lambda b=bound: jax.block_until_ready(b(box.lower, box.upper, spec))}
      compare = theirs is not None and method in LIRPA_METHODS
      if compare and method not in AS_LIRPA:
        timed["theirs"] = lambda m=method: theirs(m)
      seconds = nets.interleaved_medians(timed, _REPEATS.value)
      lower = np.asarray(bound(box.lower, box.upper, spec).lower)
      verified = float(np.mean(np.all(lower > 0, axis=1)))
      row += f" {1e3 * seconds['ours']:>14.1f} {seconds['ours'] / fwd:>7.1f} {verified:>9.3f}"
      print(f"  {name} {method}: {1e3 * seconds['ours']:.1f} ms", flush=True)
      if compare:
        if method in AS_LIRPA:
          bound = _jit_bound(AS_LIRPA[method], fn)
          seconds = nets.interleaved_medians(
              {
                  "ours": lambda b=bound: jax.block_until_ready(b(box.lower, box.upper, spec)),
                  "theirs": lambda m=method: theirs(m)
              }, _REPEATS.value)
          lower = np.asarray(bound(box.lower, box.upper, spec).lower)
        reference = theirs(method)
        gap = np.max(np.abs(lower - reference)) / max(np.max(np.abs(reference)), 1e-12)
        lirpa_rows.append(f"{name:>10} {method:>10} {1e3 * seconds['ours']:>10.1f} "
                          f"{1e3 * seconds['theirs']:>14.1f} "
                          f"{seconds['ours'] / seconds['theirs']:>7.3f} {gap:>13.1e}" +
                          ("" if gap <= 1e-4 else "  BOUNDS DIFFER"))
    rows.append(row)
  print(header)
  for row in rows:
    print(row)
  if lirpa_rows:
    print(f"\nagainst auto_LiRPA on the same problems (interleaved medians of {_REPEATS.value}):")
    print(f"{'model':>10} {'method':>10} {'ours ms':>10} {'auto_LiRPA ms':>14} {'ratio':>7} "
          f"{'rel. diff':>13}")
    for row in lirpa_rows:
      print(row)
  elif _LIRPA.value:
    print("\n(auto_LiRPA is not installed: no side-by-side comparison)")


if __name__ == "__main__":
  scripts.run(main)

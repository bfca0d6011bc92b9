"""The fast gradient (sign) method (Goodfellow et al. 2015, "Explaining and
Harnessing Adversarial Examples"); its L2 form steps along the normalised
gradient.

Example::

  x_adv = attacks.fgsm(eps=0.1)(logits_fn, x, y, jax.random.key(0))
"""

from __future__ import annotations

from typing import Callable, Sequence

from attacks import core


def fgsm(eps: float,
         *,
         norm: str = "linf",
         loss: str | Callable = "ce",
         bounds: Sequence[float] = (0.0, 1.0)) -> core.AttackFn:
  """One step of size ``eps`` along the loss gradient, then the box.

  L-inf: ``x + eps * sign(grad)``; L2: ``x + eps * grad / ||grad||_2``. The
  result is the better (adversarial first, then higher loss) of that point and
  ``x``. The key is unused (the attack is deterministic).

  Args:
    eps: default radius (a call may pass a traced ``eps=`` scalar or ``[N]``).
    norm: ``"linf"`` or ``"l2"``.
    loss: ``"ce"``, ``"margin"``, ``"dlr"`` or a callable (`attacks.core.get_loss`).
    bounds: the input box.

  Returns:
    An attack ``attack(logits_fn, x, y, key, *, eps=None) -> x_adv``.
  """
  core.check_norm(norm)
  loss_fn, min_classes = core.get_loss(loss)
  bounds = core.check_bounds(bounds)

  def run(logits_fn, x, y, key, eps, target):
    del key, target
    fn = core.prepare(logits_fn, x)
    grad, (_, logits) = core.loss_gradient(fn, lambda logits: loss_fn(logits, y))(x)
    direction = core.steepest_direction(grad, norm)
    x_step = core.project(x + core.expand(eps, x) * direction, x, eps, norm, bounds)
    best = core.init_best(x, core.is_adversarial(logits, y), loss_fn(logits, y))
    logits_step = fn(x_step)
    best = core.update_best(best, x_step, core.is_adversarial(logits_step, y),
                            loss_fn(logits_step, y))
    return best.x

  return core.make_attack(run,
                          name="fgsm" if loss == "ce" else f"fgsm-{core.loss_name(loss)}",
                          eps=eps,
                          norm=norm,
                          bounds=bounds,
                          min_classes=min_classes)

"""attacks: white-box and black-box adversarial attacks on any ``logits_fn``.

Depends on ``robustlib`` only. Every attack is built by a factory that closes over
its hyper-parameters and returns a pure ``attack(logits_fn, x, y, key) -> x_adv``.
"""

__all__: list[str] = []

# Gradient attacks.
from attacks.apgd import apgd, apgd_t
from attacks.eot import Randomized, eot
from attacks.fgsm import fgsm
from attacks.multitargeted import multitargeted
from attacks.pgd import pgd

__all__ += ["Randomized", "apgd", "apgd_t", "eot", "fgsm", "multitargeted", "pgd"]

# Minimum-norm and black-box attacks: FAB, Square, SPSA.
from attacks.fab import fab
from attacks.spsa import spsa, spsa_gradient
from attacks.square import SquareResult, square, square_search

__all__ += ["SquareResult", "fab", "spsa", "spsa_gradient", "square", "square_search"]

# Evaluation: cascades, AutoAttack, evaluate, diagnostics.
from attacks.autoattack import Cascade, autoattack, cascade
from attacks.diagnostics import AttackWarning, diagnose
from attacks.evaluation import Report, evaluate

__all__ += ["AttackWarning", "Cascade", "Report", "autoattack", "cascade", "diagnose", "evaluate"]

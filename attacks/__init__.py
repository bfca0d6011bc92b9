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

# Gradients from a stand-in: BPDA, transfer attacks.
from attacks.surrogates import bpda, transfer

__all__ += ["bpda", "transfer"]

# Minimum-norm and black-box attacks: FAB, FMN, Square, SPSA.
from attacks.fab import fab
from attacks.fmn import fmn
from attacks.spsa import spsa, spsa_gradient
from attacks.square import SquareResult, square, square_search

__all__ += ["SquareResult", "fab", "fmn", "spsa", "spsa_gradient", "square", "square_search"]

# Evaluation: cascades, AutoAttack, evaluate, diagnostics.
from attacks.autoattack import Cascade, autoattack, cascade
from attacks.diagnostics import AttackWarning, diagnose
from attacks.evaluation import Report, evaluate

__all__ += ["AttackWarning", "Cascade", "Report", "autoattack", "cascade", "diagnose", "evaluate"]

# An attack's module is also its factory: ``attacks.square(eps=...)`` builds the attack and
# ``attacks.square.p_selection`` is the module's function; the name never hides the module.
from robustlib import modules as _modules

globals().update(
    _modules.callable_modules(__name__, ("apgd", "autoattack", "eot", "fab", "fgsm", "fmn",
                                         "multitargeted", "pgd", "spsa", "square")))

"""verify: sound bound propagation through any JAX function, certified accuracy, exact
verification of ReLU networks by mixed-integer programming, and complete verification
of VNN-COMP instances (VNNLIB, falsification, branch and bound).

Bounds are sound for the real-valued function a program computes from its float
weights; "verified" (`certify`, `decide`, `branch_and_bound`) also subtracts
`rounding_allowance`, so that it holds at every float32 point of the box for the
program's float32 evaluation too (`verify.rounding` gives the model); with
``precision="float64"`` the complete searches bound in float64 and prove the
float64 evaluation instead (`PRECISIONS`: the real-valued network up to some 1e-12). What the
interpreter cannot bound soundly raises `UnsupportedPrimitiveError` naming the
primitive and the user's source line; `verify.primitives` holds what it knows.

Depends on ``robustlib`` only.
"""

from verify import vnnlib
from verify.alpha_crown import alpha_crown
from verify.bab import BabResult, branch_and_bound
from verify.bab_attack import BabAttackResult, bab_attack, bab_attack_examples
from verify.beta_crown import ReluLayer, beta_crown, relu_layers
from verify import specs
from verify.certification import METHODS, certify, certify_spec, margin_bounds, spec_bounds
from verify.crown import crown, crown_ibp
from verify.falsification import falsify, falsify_runs
from verify.functional_lagrangian import (GaussianLinear, GaussianNoise, entropy_lower_bound,
                                          functional_lagrangian)
from verify.ibp import ibp, relu_input_bounds
from verify.lagrangian_dual import lagrangian_dual
from verify.interval import PRECISIONS, Interval, linf_ball
from verify.instances import Decision, decide
from verify.milp import MilpResult, milp_minimum, milp_verify
from verify.primitives import SUPPORTED_PRIMITIVES, UnsupportedPrimitiveError
from verify.rounding import allowance as rounding_allowance
from verify.specs import margin_spec
from verify.unsafe import UnsafeSet

__all__: list[str] = [
    "BabAttackResult",
    "BabResult",
    "Decision",
    "GaussianLinear",
    "GaussianNoise",
    "Interval",
    "MilpResult",
    "ReluLayer",
    "METHODS",
    "PRECISIONS",
    "SUPPORTED_PRIMITIVES",
    "UnsafeSet",
    "UnsupportedPrimitiveError",
    "alpha_crown",
    "bab_attack",
    "bab_attack_examples",
    "beta_crown",
    "branch_and_bound",
    "certify",
    "certify_spec",
    "crown",
    "crown_ibp",
    "decide",
    "entropy_lower_bound",
    "falsify",
    "falsify_runs",
    "functional_lagrangian",
    "ibp",
    "lagrangian_dual",
    "linf_ball",
    "margin_bounds",
    "margin_spec",
    "milp_minimum",
    "milp_verify",
    "relu_input_bounds",
    "relu_layers",
    "rounding_allowance",
    "sdp_fo",
    "spec_bounds",
    "specs",
    "vnnlib",
]

# A bound's module is also its function: ``verify.crown(fn, box)`` bounds and
# ``verify.crown.crown_ibp`` is the module's; the name never hides the module.
from robustlib import modules as _modules

globals().update(
    _modules.callable_modules(__name__,
                              ("alpha_crown", "bab_attack", "beta_crown", "crown",
                               "functional_lagrangian", "ibp", "lagrangian_dual", "sdp_fo")))

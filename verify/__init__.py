"""verify: sound bound propagation through any JAX function, certified accuracy.

Depends on ``robustlib`` only.
"""

from verify.alpha_crown import alpha_crown
from verify.certification import METHODS, certify, margin_bounds
from verify.crown import crown, crown_ibp
from verify.graph import UnsupportedPrimitiveError
from verify.ibp import SUPPORTED_PRIMITIVES, ibp, relu_input_bounds
from verify.interval import Interval, linf_ball
from verify.specs import margin_spec

__all__: list[str] = [
    "Interval",
    "METHODS",
    "SUPPORTED_PRIMITIVES",
    "UnsupportedPrimitiveError",
    "alpha_crown",
    "certify",
    "crown",
    "crown_ibp",
    "ibp",
    "linf_ball",
    "margin_bounds",
    "margin_spec",
    "relu_input_bounds",
]

"""verify: sound bound propagation through any JAX function, certified accuracy.

Depends on ``robustlib`` only.
"""

__all__: list[str] = []

"""attacks: white-box and black-box adversarial attacks on any ``logits_fn``.

Depends on ``robustlib`` only. Every attack is built by a factory that closes over
its hyper-parameters and returns a pure ``attack(logits_fn, x, y, key) -> x_adv``.
"""

__all__: list[str] = []

"""Predictor-verifier training (Dvijotham et al. 2018) of an MLP on the embedded 8x8 digits.

The schedule of `digits_mlp` (IBP) with method ``pvt``: the robust loss bounds the margins
by the Lagrangian dual whose multipliers a verifier network of width 32 predicts, trained
jointly with the classifier. The robustness report adds ``verified (pvt)``: the
predicted duals' bound recomputed soundly, beside IBP's and CROWN's on the same model.
"""

from training.configs import default, digits_mlp


def get_config(variant: str = ""):
  default.check_variant(variant)
  config = digits_mlp.get_config(variant)
  config.method = "pvt"
  config.verifier_width = 32
  return config

"""training: the jitted training loop and its configs.

Depends on ``robustlib`` (and, for robust methods, on ``attacks`` and ``verify``).
Run it with ``python -m training.train --config=training/configs/NAME.py --workdir=DIR``
or call :func:`train_and_evaluate`.
"""

from training.trainer import ConfigError, format_report, train_and_evaluate, validate_config

__all__ = ["ConfigError", "format_report", "train_and_evaluate", "validate_config"]

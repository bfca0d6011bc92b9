"""robustlib: adversarial robustness in JAX.

The core package: data sets, the model zoo, functional pipelines (models as pure
``logits_fn(x) -> logits`` functions), batched evaluation, input checks, data
parallelism, checkpoints, compilation (`jit`: `jax.jit` with the compiler
options robustlib's own programs use) and the backend policy (`backend`: which
CPU-tuned fast paths are on). ``attacks``, ``verify`` and ``training``
build on it.
"""

from robustlib import backend, checkpoints, compilation, data, models, parallel, plotting
from robustlib.checks import InputError, check_images, check_labels
from robustlib.compilation import jit
from robustlib.batching import accuracy, batched_apply
from robustlib.pipelines import LogitsFn, as_logits_fn, check_logits_fn, compose, normalize

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "LogitsFn",
    "accuracy",
    "as_logits_fn",
    "backend",
    "batched_apply",
    "check_images",
    "check_labels",
    "check_logits_fn",
    "checkpoints",
    "compilation",
    "compose",
    "data",
    "jit",
    "models",
    "normalize",
    "parallel",
    "plotting",
]

"""The loader's errors, and the install hint of its optional ``onnx`` dependency."""

from robustlib.checks import InputError

_INSTALL_HINT = "pip install robustlib[onnx]"


class OnnxError(InputError):
  """A malformed ONNX model, a shape it cannot run on, or an input of the wrong shape."""


class UnsupportedOperatorError(OnnxError):
  """The model uses an operator (or an operator domain) that has no JAX translation here."""


class _NotBatchable(Exception):
  """A node cannot keep the batch axis first natively; the graph then runs per example."""

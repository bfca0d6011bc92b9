"""ONNX models as pure JAX functions.

`load` reads an ONNX model (a file, its bytes or an ``onnx.ModelProto``) into an
`OnnxModel` whose ``fn(x: [N, *input_shape]) -> [N, *output_shape]`` is an ordinary
``logits_fn``: pure, jittable, vmappable and differentiable, so attacks and bound
propagation take it like any other model. The layout is the file's (NCHW stays NCHW).
``onnx`` is an optional dependency (``pip install robustlib[onnx]``), imported by
`load` only.

How a graph runs:

* Values that do not depend on the input stay numpy arrays: initializers,
  ``Constant`` nodes, the ``Shape`` of any value (shapes are static under ``jit``)
  and the result of every node whose inputs are all such constants. Parameters an
  operator needs statically (a ``Reshape``'s shape, ``Slice`` bounds, ``Pad``
  pads, ``Gather`` indices...) must be constants; an input-dependent one is an
  `OnnxError` naming the node.
* The graph describes one example. A declared leading input dimension that is
  symbolic or 1 is the batch axis, and the graph is read as if it were 1 (a
  ``Shape`` reports 1 there). A batch of N examples runs natively when every
  input-dependent value keeps the batch axis first (a constant ``Reshape`` to
  ``[1, -1]`` becomes ``[N, -1]``), which keeps the batch axis first on every
  nonlinearity as `verify.crown` needs; this is decided once, at load time, by
  tracing shapes. A graph that moves or merges that axis runs through `jax.vmap`
  over single examples instead.
* Operators become the primitives bound propagation follows: ReLU is
  ``max(x, 0)``, LeakyReLU ``max(x, alpha * x)``, pooling ``reduce_window``,
  convolutions ``conv_general_dilated`` in NCHW, BatchNormalization a scale and a
  shift folded with numpy.

Every node is checked at load time: an operator without a translation raises
`UnsupportedOperatorError`, and the graph is traced once (shapes only), so a
malformed model fails in `load` rather than at its first call.

Example::

  model = robustlib.onnx.load("mnist_cnn.onnx")   # input [N, 1, 28, 28] float32
  logits = jax.jit(model.fn)(x)                     # [N, 10]
  bounds = verify.crown(model.fn, verify.linf_ball(x, 0.1))
"""

from robustlib.onnx.errors import OnnxError, UnsupportedOperatorError
from robustlib.onnx.loading import OnnxModel, load
from robustlib.onnx.ops import SUPPORTED_OPERATORS

__all__ = [
    "OnnxError",
    "OnnxModel",
    "SUPPORTED_OPERATORS",
    "UnsupportedOperatorError",
    "load",
]

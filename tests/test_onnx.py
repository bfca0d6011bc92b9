"""Specification of `robustlib.onnx`: ONNX models as pure JAX functions.

Every network and operator is built with ``onnx.helper`` from seeded random
weights and compared with onnxruntime on random inputs. Loaded functions jit,
vmap and differentiate, and IBP and CROWN bounds through them are sound; errors
name the operator, node, input or shape at fault.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="robustlib.onnx needs the onnx package (extra 'onnx')")
ort = pytest.importorskip("onnxruntime", reason="the reference outputs come from onnxruntime (CPU)")

from onnx import TensorProto  # pylint: disable=g-import-not-at-top,wrong-import-position
from onnx import helper  # pylint: disable=g-import-not-at-top,wrong-import-position
from onnx import numpy_helper  # pylint: disable=g-import-not-at-top,wrong-import-position

import bound_testing  # pylint: disable=g-import-not-at-top,wrong-import-position
import robustlib  # pylint: disable=g-import-not-at-top,wrong-import-position
from robustlib import onnx as ronnx  # pylint: disable=g-import-not-at-top,wrong-import-position
from robustlib.checks import InputError  # pylint: disable=wrong-import-position
import verify  # pylint: disable=g-import-not-at-top,wrong-import-position

FLOAT = TensorProto.FLOAT
BATCH = 3


@pytest.fixture(autouse=True)
def full_float32_products():
  """onnxruntime multiplies in full float32; so must JAX on accelerators (no TF32)."""
  with jax.default_matmul_precision("highest"):
    yield


# ---------------------------------------------------------------------------------------- helpers


class Net:
  """Collects nodes and seeded random initializers of one graph."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)
    self.nodes, self.inits = [], []

  def const(self, name, value, dtype=None):
    arr = np.asarray(value, dtype)
    self.inits.append(numpy_helper.from_array(arr, name))
    return name

  def weight(self, name, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = np.sqrt(2.0 / fan_in) if scale is None else scale
    return self.const(name, self.rng.normal(0, scale, shape).astype(np.float32))

  def node(self, op, inputs, outputs=None, name=None, **attrs):
    name = name or f"{op.lower()}{len(self.nodes)}"
    outputs = outputs or [name]
    self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
    return outputs[0]

  def model(self,
            output,
            in_dims,
            out_dims=None,
            opset=13,
            out_type=FLOAT,
            in_name="x",
            inits_as_inputs=False):
    inputs = [helper.make_tensor_value_info(in_name, FLOAT, in_dims)]
    if inits_as_inputs:
      inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in self.inits]
    graph = helper.make_graph(self.nodes,
                              "net",
                              inputs, [helper.make_tensor_value_info(output, out_type, out_dims)],
                              initializer=self.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 9
    return model


def run_ort(model, x):
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run(None, {session.get_inputs()[0].name: x})[0]


def random_input(shape, seed=1, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def declared_dims(model):
  dims = model.graph.input[0].type.tensor_type.shape.dim
  return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def assert_matches_ort(model, n=BATCH, low=-1.0):
  """``load(model)`` on N examples equals onnxruntime: on the whole batch when the file's batch
  is symbolic, else example by example (with the file's leading 1, or without a batch axis)."""
  dims = declared_dims(model)
  symbolic = isinstance(dims[0], str)
  batched = symbolic or dims[0] == 1
  loaded = ronnx.load(model)
  assert loaded.input_shape == tuple(dims[1:] if batched else dims)
  x = random_input((n,) + loaded.input_shape, low=low)
  ours = np.asarray(loaded(x))
  assert ours.shape == (n,) + loaded.output_shape
  if symbolic:
    ref = run_ort(model, x)
  else:
    ref = np.stack([run_ort(model, x[i:i + 1] if batched else x[i]) for i in range(n)])
  np.testing.assert_allclose(ours, ref.reshape(ours.shape), rtol=1e-5, atol=1e-5)
  return loaded


# ---------------------------------------------------------------------------------------- networks


def mlp_model():
  net = Net(0)
  h = net.node("Gemm", ["x", net.weight("w1", (12, 16)), net.weight("b1", (16,), 0.1)])
  h = net.node("Relu", [h])
  h = net.node("Gemm", [h, net.weight("w2", (16, 16)), net.weight("b2", (16,), 0.1)])
  h = net.node("Relu", [h])
  out = net.node("Gemm", [h, net.weight("w3", (16, 5)), net.weight("b3", (5,), 0.1)])
  return net.model(out, ["N", 12], ["N", 5])


def batch_norm_inputs(net, prefix, c):
  return [
      net.const(f"{prefix}_scale",
                net.rng.uniform(0.5, 1.5, c).astype(np.float32)),
      net.const(f"{prefix}_bias",
                net.rng.normal(0, 0.1, c).astype(np.float32)),
      net.const(f"{prefix}_mean",
                net.rng.normal(0, 0.1, c).astype(np.float32)),
      net.const(f"{prefix}_var",
                net.rng.uniform(0.5, 1.5, c).astype(np.float32)),
  ]


def cnn_model():
  net = Net(1)
  h = net.node("Conv", ["x", net.weight("c1", (4, 1, 3, 3)),
                        net.weight("c1b", (4,), 0.1)],
               pads=[1, 1, 1, 1])
  h = net.node("BatchNormalization", [h] + batch_norm_inputs(net, "bn", 4), epsilon=1e-3)
  h = net.node("Relu", [h])
  h = net.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
  h = net.node(
      "Conv",
      [h, net.weight("c2",
                     (6, 4, 3, 3)), net.weight("c2b", (6,), 0.1)], pads=[1, 1, 1, 1])
  h = net.node("Relu", [h])
  h = net.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
  h = net.node("Flatten", [h])
  out = net.node("Gemm", [h, net.weight("fc", (24, 4)), net.weight("fcb", (4,), 0.1)])
  return net.model(out, ["N", 1, 8, 8], ["N", 4])


def residual_model():
  net = Net(2)
  h = net.node("Conv", ["x", net.weight("c1", (2, 2, 3, 3)),
                        net.weight("c1b", (2,), 0.1)],
               pads=[1, 1, 1, 1])
  h = net.node("Relu", [h])
  h = net.node(
      "Conv",
      [h, net.weight("c2",
                     (2, 2, 3, 3)), net.weight("c2b", (2,), 0.1)], pads=[1, 1, 1, 1])
  h = net.node("Add", [h, "x"])
  h = net.node("Relu", [h])
  h = net.node("Flatten", [h])
  out = net.node("Gemm", [h, net.weight("fc", (32, 3)), net.weight("fcb", (3,), 0.1)])
  return net.model(out, ["N", 2, 4, 4], ["N", 3])


def batch_one_reshape_model():
  """Declares batch 1 and flattens with a constant Reshape to [1, -1]."""
  net = Net(3)
  h = net.node("Conv", ["x", net.weight("c", (3, 1, 3, 3))], strides=[2, 2])
  h = net.node("Relu", [h])
  h = net.node("Reshape", [h, net.const("shape", [1, -1], np.int64)])
  out = net.node("MatMul", [h, net.weight("fc", (12, 4))])
  return net.model(out, [1, 1, 5, 5], [1, 4])


def shape_folding_model():
  """Flattens with Shape -> Gather -> Unsqueeze -> Concat -> Reshape (as torch.flatten exports)."""
  net = Net(4)
  h = net.node("Conv", ["x", net.weight("c", (2, 2, 3, 3)), net.weight("cb", (2,), 0.1)])
  h = net.node("Relu", [h])
  shape = net.node("Shape", [h])
  n = net.node("Gather", [shape, net.const("zero", 0, np.int64)], axis=0)
  n = net.node("Unsqueeze", [n, net.const("axes", [0], np.int64)])
  target = net.node("Concat", [n, net.const("minus_one", [-1], np.int64)], axis=0)
  h = net.node("Reshape", [h, target], name="flatten_reshape")
  out = net.node("Gemm", [h, net.weight("fc", (8, 3))])
  return net.model(out, ["batch", 2, 4, 4], ["batch", 3])


def mixed_model():
  """Layers whose bounds take rewrites: LeakyReLU, padded max pooling, Clip, a transposed
  convolution, global pooling and a sigmoid."""
  net = Net(5)
  h = net.node("Conv", ["x", net.weight("c", (3, 1, 3, 3))], pads=[1, 1, 1, 1])
  h = net.node("LeakyRelu", [h], alpha=0.1)
  h = net.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
  h = net.node("ConvTranspose", [h, net.weight("ct", (3, 2, 2, 2))], strides=[2, 2])
  h = net.node("Clip", [h, net.const("lo", -0.5, np.float32), net.const("hi", 0.5, np.float32)])
  h = net.node("GlobalAveragePool", [h])
  h = net.node("Flatten", [h])
  h = net.node("Gemm", [h, net.weight("fc", (2, 3))])
  out = net.node("Sigmoid", [h])
  return net.model(out, ["N", 1, 6, 6], ["N", 3])


NETWORKS = {
    "mlp": mlp_model,
    "cnn": cnn_model,
    "residual": residual_model,
    "batch_one_reshape": batch_one_reshape_model,
    "shape_folding": shape_folding_model,
    "mixed": mixed_model,
}


@functools.cache
def load_network(name):
  return ronnx.load(NETWORKS[name]())


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_networks_match_onnxruntime(name):
  loaded = assert_matches_ort(NETWORKS[name](), n=5)
  assert loaded.input_name == "x"


def test_declared_batch_axes_are_removed_from_the_shapes_of_a_logits_fn():
  shapes = {
      name: (load_network(name).input_shape, load_network(name).output_shape) for name in NETWORKS
  }
  assert shapes == {
      "mlp": ((12,), (5,)),
      "cnn": ((1, 8, 8), (4,)),
      "residual": ((2, 4, 4), (3,)),
      "batch_one_reshape": ((1, 5, 5), (4,)),
      "shape_folding": ((2, 4, 4), (3,)),
      "mixed": ((1, 6, 6), (3,)),
  }
  for name in NETWORKS:
    model = load_network(name)
    assert robustlib.check_logits_fn(model.fn, (2,) + model.input_shape) == model.output_shape[0]


def test_gemm_with_transposed_weights_matches_onnxruntime():
  net = Net(5)
  out = net.node("Gemm", ["x", net.weight("w", (7, 10)), net.weight("b", (7,), 0.1)], transB=1)
  assert_matches_ort(net.model(out, ["N", 10], ["N", 7]))


def test_flatten_after_an_nchw_convolution_keeps_the_channel_major_order():
  net = Net(6)
  h = net.node("Conv", ["x", net.weight("c", (3, 2, 2, 2))])
  out = net.node("Flatten", [h])
  loaded = assert_matches_ort(net.model(out, ["N", 2, 3, 3], ["N", 12]))
  assert loaded.output_shape == (12,)


def test_batch_one_file_with_a_constant_reshape_takes_any_batch():
  model = batch_one_reshape_model()
  for n in (1, 4):
    assert_matches_ort(model, n=n)


def test_a_graph_that_drops_the_batch_axis_runs_example_by_example():
  net = Net(7)
  h = net.node("Reshape", ["x", net.const("shape", [6], np.int64)])
  out = net.node("MatMul", [h, net.weight("w", (6, 3))])
  loaded = assert_matches_ort(net.model(out, [1, 6], [3]), n=4)
  assert loaded.input_shape == (6,) and loaded.output_shape == (3,)


def test_a_fixed_leading_dimension_other_than_1_is_not_a_batch_axis():
  net = Net(8)
  out = net.node("Gemm", ["x", net.weight("w", (6, 2)), net.weight("c", (2,), 0.1)], beta=0.5)
  loaded = assert_matches_ort(net.model(out, [4, 6], [4, 2]), n=2)
  assert loaded.input_shape == (4, 6) and loaded.output_shape == (4, 2)


def test_load_reads_files_bytes_and_protos_alike(tmp_path):
  model = mlp_model()
  path = tmp_path / "mlp.onnx"
  onnx.save(model, str(path))
  x = random_input((2, 12))
  outs = [ronnx.load(m)(x) for m in (model, model.SerializeToString(), path, str(path))]
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])


def test_initializers_listed_as_graph_inputs_are_constants():
  net = Net(0)
  out = net.node("Gemm", ["x", net.weight("w", (4, 2))])
  assert_matches_ort(net.model(out, ["N", 4], ["N", 2], inits_as_inputs=True))


# ------------------------------------------------------------------------------- operator groups


def op(op_type, dims, *consts, opset=13, **attrs):
  """A graph applying ``op_type`` to ``x`` (declared ``dims``) and constants.

  Each constant is a float array, ``(value, dtype)``, or None for an omitted optional input.
  """
  net = Net(9)
  names = []
  for c in consts:
    if c is None:
      names.append("")
    elif isinstance(c, tuple):
      names.append(net.const(f"c{len(names)}", *c))
    else:
      names.append(net.const(f"c{len(names)}", c, np.float32))
  return net.model(net.node(op_type, ["x"] + names, **attrs), dims, opset=opset)


def weights(*shape, seed=10):
  return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


def ints(*values):
  return (list(values), np.int64)


CONV_CASES = {
    "strides_pads_dilations":
        op("Conv", ["N", 2, 9, 8],
           weights(3, 2, 3, 2),
           weights(3, seed=11),
           strides=[2, 1],
           pads=[1, 0, 2, 1],
           dilations=[2, 1]),
    "groups":
        op("Conv", ["N", 4, 5, 5], weights(6, 2, 3, 3), group=2),
    "depthwise":
        op("Conv", ["N", 3, 5, 5], weights(3, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    "conv1d":
        op("Conv", ["N", 2, 9], weights(3, 2, 3), weights(3, seed=11), strides=[2], pads=[1, 2]),
    "conv3d":
        op("Conv", ["N", 2, 4, 5, 4],
           weights(3, 2, 2, 3, 2),
           strides=[1, 2, 1],
           pads=[1, 0, 0, 0, 1, 1]),
    "same_upper":
        op("Conv", ["N", 1, 7, 7], weights(2, 1, 4, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower":
        op("Conv", ["N", 1, 7, 6], weights(2, 1, 4, 3), auto_pad="SAME_LOWER", strides=[2, 1]),
    "valid":
        op("Conv", ["N", 1, 6, 6], weights(2, 1, 3, 3), auto_pad="VALID", strides=[2, 2]),
    "transpose_output_padding":
        op("ConvTranspose", ["N", 2, 4, 4],
           weights(2, 3, 3, 3),
           weights(3, seed=11),
           strides=[2, 2],
           pads=[1, 1, 1, 1],
           output_padding=[1, 0]),
    "transpose_groups_dilations":
        op("ConvTranspose", ["N", 4, 3, 3],
           weights(4, 1, 2, 3),
           group=2,
           dilations=[2, 1],
           strides=[1, 2],
           pads=[0, 1, 1, 0]),
    "transpose_same_upper":
        op("ConvTranspose", ["N", 2, 4, 5],
           weights(2, 3, 3, 2),
           strides=[2, 2],
           auto_pad="SAME_UPPER"),
    "transpose_output_shape":
        op("ConvTranspose", ["N", 2, 4, 5],
           weights(2, 3, 3, 3),
           strides=[2, 2],
           output_shape=[8, 10]),
    "transpose_1d":
        op("ConvTranspose", ["N", 2, 5], weights(2, 2, 3), strides=[3]),
}

POOL_CASES = {
    "max_strides_pads":
        op("MaxPool", ["N", 2, 7, 7], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "max_dilations_opset12":
        op("MaxPool", ["N", 1, 7, 7], kernel_shape=[2, 2], dilations=[2, 2], opset=12),
    "max_1d_same_upper":
        op("MaxPool", ["N", 2, 8], kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER"),
    "average_excluding_pads":
        op("AveragePool", ["N", 2, 5, 5], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "average_including_pads":
        op("AveragePool", ["N", 2, 5, 5],
           kernel_shape=[3, 2],
           pads=[1, 0, 1, 1],
           count_include_pad=1),
    "average_dilations_opset19":
        op("AveragePool", ["N", 2, 7, 7],
           kernel_shape=[2, 2],
           dilations=[2, 2],
           pads=[1, 1, 1, 1],
           opset=19),
    "average_same_lower":
        op("AveragePool", ["N", 2, 7, 7],
           kernel_shape=[3, 2],
           strides=[2, 2],
           auto_pad="SAME_LOWER"),
    "global_average":
        op("GlobalAveragePool", ["N", 3, 4, 5]),
    "global_max":
        op("GlobalMaxPool", ["N", 3, 4, 5]),
    "batch_norm_of_features":
        op("BatchNormalization", ["N", 3], [1.0, 2.0, 0.5], [0.1, 0.2, 0.3], [0.0, 0.5, -1.0],
           [1.0, 0.25, 2.0],
           epsilon=0.01),
}

ACTIVATION_CASES = {
    "relu": op("Relu", ["N", 6]),
    "leaky_relu": op("LeakyRelu", ["N", 6], alpha=0.2),
    "leaky_relu_steep": op("LeakyRelu", ["N", 6], alpha=1.5),
    "sigmoid": op("Sigmoid", ["N", 6]),
    "tanh": op("Tanh", ["N", 6]),
    "softmax_opset11_flattens_from_axis": op("Softmax", ["N", 2, 3, 4], axis=2, opset=11),
    "softmax_opset11_default_axis": op("Softmax", ["N", 2, 5], opset=11),
    "softmax_opset13_one_axis": op("Softmax", ["N", 2, 3, 4], axis=1),
    "softmax_opset13_default_axis": op("Softmax", ["N", 2, 5]),
    "log_softmax": op("LogSoftmax", ["N", 5]),
    "clip_inputs": op("Clip", ["N", 6], -0.3, 0.4),
    "clip_max_only": op("Clip", ["N", 6], None, 0.2),
    "clip_opset6_attributes": op("Clip", ["N", 6], min=-0.5, max=0.5, opset=6),
    "exp": op("Exp", ["N", 6]),
    "neg": op("Neg", ["N", 6]),
}

ARITHMETIC_CASES = {
    "add_broadcast": op("Add", ["N", 2, 3], weights(3)),
    "sub_broadcast": op("Sub", ["N", 2, 3], weights(2, 1)),
    "mul_leading_one": op("Mul", ["N", 2, 3], weights(1, 2, 3)),
    "div": op("Div", ["N", 4], [1.0, 2.0, -4.0, 0.5]),
    "pow_square": op("Pow", ["N", 4], 2.0),
    "pow_cube": op("Pow", ["N", 4], 3.0),
    "min_of_three": op("Min", ["N", 4], weights(4), weights(1, 4, seed=12)),
    "max": op("Max", ["N", 4], weights(4)),
    "matmul_3d": op("MatMul", ["N", 3, 4], weights(4, 5)),
    "matmul_vector": op("MatMul", ["N", 4], weights(4)),
    "gemm_alpha_beta": op("Gemm", ["N", 4], weights(4, 3), weights(1, 3), alpha=0.5, beta=2.0),
    "gemm_transposed_a_without_batch_axis": op("Gemm", [6, 4], weights(6, 5), transA=1, alpha=2.0),
}

POSITIVE_CASES = {
    "sqrt": op("Sqrt", ["N", 6]),
    "log": op("Log", ["N", 6]),
    "pow_fractional": op("Pow", ["N", 6], 1.5),
}


def _composite_cases():
  # Cast to int32 and back truncates toward zero.
  net = Net(9)
  cast = net.model(
      net.node("Cast", [net.node("Cast", ["x"], to=TensorProto.INT32)], to=TensorProto.FLOAT),
      ["N", 5])
  # Shape with start and end (opset 15) feeding a Reshape.
  net = Net(9)
  tail = net.node("Shape", ["x"], start=-2)
  target = net.node("Concat", [net.const("lead", [1, -1], np.int64), tail], axis=0)
  shape = net.model(net.node("Reshape", ["x", target]), ["N", 2, 3, 4], opset=15)
  # ConstantOfShape and Constant.
  net = Net(9)
  filled = net.node("ConstantOfShape", [net.const("s", [1, 3], np.int64)],
                    value=numpy_helper.from_array(np.array([0.25], np.float32)))
  k = net.node("Constant", [], value=numpy_helper.from_array(np.array([2.0], np.float32)))
  constants = net.model(net.node("Mul", [net.node("Add", ["x", filled]), k]), ["N", 3])
  return {"cast_truncates": cast, "shape_start_end": shape, "constant_of_shape": constants}


SHAPE_CASES = {
    "flatten_axis2":
        op("Flatten", ["N", 2, 3, 4], axis=2),
    "flatten_axis0":
        op("Flatten", [1, 2, 3], axis=0),
    "reshape_zero_and_minus_one":
        op("Reshape", ["N", 2, 3, 4], ints(0, -1, 4)),
    "reshape_allowzero":
        op("Reshape", ["N", 2, 6], ints(-1, 3, 4), allowzero=1, opset=14),
    "transpose":
        op("Transpose", ["N", 2, 3, 4], perm=[0, 2, 3, 1]),
    "squeeze_opset11_attribute":
        op("Squeeze", ["N", 1, 3, 1], axes=[1, -1], opset=11),
    "squeeze_opset13_input":
        op("Squeeze", ["N", 1, 3, 1], ints(1, 3)),
    "unsqueeze_opset11_attribute":
        op("Unsqueeze", ["N", 3], axes=[1, -1], opset=11),
    "unsqueeze_opset13_input":
        op("Unsqueeze", ["N", 3], ints(2, 1)),
    "concat_with_a_constant":
        op("Concat", [1, 2, 3], weights(1, 1, 3), axis=1),
    "slice_negative_steps":
        op("Slice", ["N", 5, 6], ints(-1, 4), ints(-100, 0), ints(1, 2), ints(-2, -1)),
    "slice_positive_steps":
        op("Slice", ["N", 5, 6], ints(1, -5), ints(2**62, -1), ints(-1, 1), ints(2, 2)),
    "slice_opset9_attributes":
        op("Slice", ["N", 5, 6], starts=[1], ends=[4], axes=[2], opset=9),
    "gather_axis1":
        op("Gather", ["N", 4, 3], ints(2, 0, -1), axis=1),
    "gather_scalar_on_last_axis":
        op("Gather", ["N", 4, 3], (1, np.int64), axis=2),
    "gather_2d_indices":
        op("Gather", ["N", 4, 3], ([[1, 0], [3, -2]], np.int64), axis=1),
    "pad_constant_and_negative":
        op("Pad", ["N", 2, 3, 3], ints(0, 0, 1, 2, 0, 0, 2, -1), (0.5, np.float32)),
    "pad_opset18_axes":
        op("Pad", ["N", 2, 3, 3], ints(1, 2, 0, 1), None, ints(2, 3), opset=18),
    "pad_opset10_attributes":
        op("Pad", ["N", 2, 3], pads=[0, 1, 0, 0, 0, 2], value=-1.0, opset=10),
    "pad_reflect":
        op("Pad", ["N", 2, 4, 4], ints(0, 0, 2, 1, 0, 0, 1, 2), mode="reflect"),
    "pad_edge":
        op("Pad", ["N", 2, 4], ints(0, 0, 1, 0, 0, 3), mode="edge"),
    "reduce_sum_input_axes":
        op("ReduceSum", ["N", 2, 3, 4], ints(1, -1)),
    "reduce_mean_attribute_axes":
        op("ReduceMean", ["N", 2, 3, 4], axes=[2], keepdims=0),
    "reduce_mean_opset18_input":
        op("ReduceMean", ["N", 2, 3, 4], ints(1, 2), opset=18),
    "reduce_max":
        op("ReduceMax", ["N", 2, 3], axes=[1]),
    "reduce_min_all_axes":
        op("ReduceMin", [1, 2, 3]),
    "expand":
        op("Expand", ["N", 1, 3], ints(2, 1)),
    "identity":
        op("Identity", ["N", 3]),
    "dropout_inference":
        op("Dropout", ["N", 3], (0.5, np.float32)),
    **_composite_cases(),
}

OPERATOR_GROUPS = {
    "convolution": CONV_CASES,
    "pooling": POOL_CASES,
    "activation": ACTIVATION_CASES,
    "arithmetic": ARITHMETIC_CASES,
    "shape": SHAPE_CASES,
}


@pytest.mark.parametrize("group,case",
                         [(g, c) for g, cases in OPERATOR_GROUPS.items() for c in sorted(cases)])
def test_operators_match_onnxruntime(group, case):
  assert_matches_ort(OPERATOR_GROUPS[group][case])


@pytest.mark.parametrize("case", sorted(POSITIVE_CASES))
def test_functions_of_positive_inputs_match_onnxruntime(case):
  assert_matches_ort(POSITIVE_CASES[case], low=0.1)


def test_every_supported_operator_is_tested():
  models = [m for cases in OPERATOR_GROUPS.values() for m in cases.values()]
  models += list(POSITIVE_CASES.values())
  models += [build() for build in NETWORKS.values()]
  used = {node.op_type for m in models for node in m.graph.node}
  assert set(ronnx.SUPPORTED_OPERATORS) <= used, sorted(set(ronnx.SUPPORTED_OPERATORS) - used)
  assert list(ronnx.SUPPORTED_OPERATORS) == sorted(ronnx.SUPPORTED_OPERATORS)


# ------------------------------------------------------------------------ transformations, bounds


@pytest.mark.parametrize("name", ["mlp", "cnn", "shape_folding"])
def test_jit_and_vmap_of_fn_agree_with_calling_it(name):
  loaded = load_network(name)
  shape = loaded.input_shape
  x = random_input((4,) + shape)
  direct = np.asarray(loaded(x))
  np.testing.assert_allclose(jax.jit(loaded.fn)(x), direct, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(loaded.fn)(x[:, None])[:, 0], direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn", "batch_one_reshape"])
def test_gradients_match_finite_differences(name):
  loaded = load_network(name)
  shape = loaded.input_shape
  x = random_input((2,) + shape)
  v = random_input(x.shape, seed=2)
  loss = jax.jit(lambda z: jnp.sum(loaded(z)**2))
  g = jax.jit(jax.grad(loss))(x)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  h = 1e-3
  numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
  np.testing.assert_allclose(np.sum(g * v), numeric, rtol=2e-2, atol=1e-3)


# CROWN on the five networks whose nonlinearities must see the batch axis first; CROWN-IBP (one
# backward pass, cheaper to compile) through the layers whose relaxations come from rewrites.
BOUND_CASES = [("mlp", "crown"), ("cnn", "crown"), ("residual", "crown"),
               ("batch_one_reshape", "crown"), ("shape_folding", "crown"), ("mixed", "crown_ibp")]


@pytest.mark.parametrize("name,method", BOUND_CASES)
def test_ibp_and_linear_bounds_are_sound(name, method):
  loaded = load_network(name)
  shape = loaded.input_shape
  x = random_input((BATCH,) + shape, low=0.0)
  box = verify.linf_ball(x, 0.05)
  ibp = jax.jit(lambda b: verify.ibp(loaded.fn, b))(box)
  linear = jax.jit(lambda b: getattr(verify, method)(loaded.fn, b))(box)
  assert linear.shape == (BATCH,) + loaded.output_shape
  t = np.random.default_rng(3).uniform(0, 1, (200,) + x.shape).astype(np.float32)
  t[:100] = np.round(t[:100])  # corners of the box
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  points = lo + t * (hi - lo)
  for b in (ibp, linear):
    bound_testing.assert_sound(loaded.fn, box, b.lower, b.upper, points=points)
  if method == "crown":  # much tighter than IBP on these networks
    assert np.mean(linear.upper - linear.lower) < np.mean(ibp.upper - ibp.lower)


# ------------------------------------------------------------------------------------------ errors


def test_unsupported_operator_is_named_at_load_time():
  net = Net(0)
  h = net.node("Relu", ["x"])
  out = net.node("Hardmax", [h], name="strange_head")
  with pytest.raises(ronnx.UnsupportedOperatorError) as info:
    ronnx.load(net.model(out, ["N", 4], opset=13))
  message = str(info.value)
  assert "'Hardmax'" in message and "'strange_head'" in message and "opset 13" in message
  assert "Gemm" in message  # the supported operators are listed
  assert isinstance(info.value, InputError)


def test_wrong_input_shape_or_dtype_names_expected_and_got():
  loaded = load_network("cnn")
  with pytest.raises(ronnx.OnnxError, match=r"\[N, 1, 8, 8\].*\(3, 8, 8\)"):
    loaded(np.zeros((3, 8, 8), np.float32))
  with pytest.raises(ronnx.OnnxError, match=r"\[N, 1, 8, 8\].*\(2, 1, 8, 9\)"):
    jax.jit(loaded.fn)(np.zeros((2, 1, 8, 9), np.float32))
  with pytest.raises(ronnx.OnnxError, match="floating dtype.*int32"):
    loaded(np.zeros((2, 1, 8, 8), np.int32))


def test_missing_onnx_gives_the_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)
  with pytest.raises(ImportError, match=r"pip install robustlib\[onnx\]"):
    ronnx.load(b"")


def test_the_module_imports_without_onnx():
  code = ("import sys; sys.modules['onnx'] = None; import robustlib.onnx as m; "
          "assert 'Conv' in m.SUPPORTED_OPERATORS")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_two_non_initializer_inputs_are_rejected():
  net = Net(0)
  out = net.node("Add", ["x", "y"])
  model = net.model(out, ["N", 3])
  model.graph.input.append(helper.make_tensor_value_info("y", FLOAT, ["N", 3]))
  with pytest.raises(ronnx.OnnxError, match="exactly one input.*'x', 'y'"):
    ronnx.load(model)


def test_data_dependent_static_parameter_names_the_node():
  net = Net(0)
  shape = net.node("Cast", ["x"], to=TensorProto.INT64)
  out = net.node("Reshape", ["x", shape], name="bad_reshape")
  with pytest.raises(ronnx.OnnxError, match="'bad_reshape'.*depends on the model's input"):
    ronnx.load(net.model(out, [2]))


def test_undefined_tensor_and_declared_shape_mismatch_are_rejected():
  net = Net(0)
  out = net.node("Add", ["x", "ghost"], name="adder")
  with pytest.raises(ronnx.OnnxError, match="'adder'.*'ghost'"):
    ronnx.load(net.model(out, ["N", 3]))
  net = Net(0)
  out = net.node("Gemm", ["x", net.weight("w", (3, 2))])
  with pytest.raises(ronnx.OnnxError, match=r"declared with shape \[None, 5\]"):
    ronnx.load(net.model(out, ["N", 3], ["N", 5]))


def test_opsets_older_than_6_are_rejected():
  with pytest.raises(ronnx.OnnxError, match="opset 5"):
    ronnx.load(op("Relu", ["N", 3], opset=5))


def test_ceil_mode_pooling_is_rejected_clearly():
  model = op("MaxPool", ["N", 1, 5, 5], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
  with pytest.raises(ronnx.OnnxError, match="ceil_mode"):
    ronnx.load(model)

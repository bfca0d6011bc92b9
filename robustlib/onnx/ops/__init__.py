"""The operator registry: each supported ONNX operator name and its JAX translation.

An operator is ``op(ctx: _Ctx, *inputs) -> output or tuple of outputs``, an omitted
optional input arriving as None.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from robustlib.onnx.ops.constants import _constant, _constant_of_shape, _shape
from robustlib.onnx.ops.conv import (_average_pool, _batch_norm, _conv, _conv_transpose,
                                     _global_average_pool, _global_max_pool, _max_pool)
from robustlib.onnx.ops.elementwise import (_binary, _cast, _clip, _div, _dropout, _leaky_relu,
                                            _log_softmax, _neg, _pow, _relu, _softmax, _unary,
                                            _variadic)
from robustlib.onnx.ops.linear import _gemm, _matmul
from robustlib.onnx.ops.shapes import (_concat, _expand, _flatten, _gather, _pad, _reduce, _reshape,
                                       _slice, _squeeze, _transpose, _unsqueeze)

_OPS: dict[str, Callable] = {
    "Add": _binary("add"),
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Cast": _cast,
    "Clip": _clip,
    "Concat": _concat,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Div": _div,
    "Dropout": _dropout,
    "Exp": _unary(jnp.exp),
    "Expand": _expand,
    "Flatten": _flatten,
    "Gather": _gather,
    "Gemm": _gemm,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "Identity": _unary(lambda x: x),
    "LeakyRelu": _leaky_relu,
    "Log": _unary(jnp.log),
    "LogSoftmax": _log_softmax,
    "MatMul": _matmul,
    "Max": _variadic("maximum"),
    "MaxPool": _max_pool,
    "Min": _variadic("minimum"),
    "Mul": _binary("multiply"),
    "Neg": _neg,
    "Pad": _pad,
    "Pow": _pow,
    "ReduceMax": _reduce("max", 18),
    "ReduceMean": _reduce("mean", 18),
    "ReduceMin": _reduce("min", 18),
    "ReduceSum": _reduce("sum", 13),
    "Relu": _relu,
    "Reshape": _reshape,
    "Shape": _shape,
    "Sigmoid": _unary(jax.nn.sigmoid),
    "Slice": _slice,
    "Softmax": _softmax,
    "Sqrt": _unary(jnp.sqrt),
    "Squeeze": _squeeze,
    "Sub": _binary("subtract"),
    "Tanh": _unary(jnp.tanh),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
}

SUPPORTED_OPERATORS: tuple[str, ...] = tuple(sorted(_OPS))

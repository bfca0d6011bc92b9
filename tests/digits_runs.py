"""Small digits training runs (a few seconds each) and their ONNX exports (built with
onnx.helper), for the tests of the scripts that read runs and ONNX files as users' networks."""

import numpy as np
import pytest

from robustlib import checkpoints, data
from training import trainer
from training.configs import digits_mlp


def train(workdir, method: str = "ibp") -> str:
  """A digits MLP (one hidden layer of 32) trained for 150 steps with ``method`` (IBP and
  the robust methods at L-inf 0.11); returns the run's directory."""
  config = digits_mlp.get_config("tiny")
  config.model_kwargs.hidden = (32,)
  config.num_steps = 150
  config.log_every = config.eval_every = config.checkpoint_every = 150
  config.optimizer.learning_rate = 3e-3
  config.eval_batch_size = 120
  config.method = method
  config.robust.eps, config.robust.warmup_steps, config.robust.ramp_steps = 0.11, 10, 80
  config.report.enabled = False
  trainer.train_and_evaluate(config, str(workdir))
  return str(workdir)


def export_mlp(workdir, path):
  """The run's digits MLP as an ONNX file reading NCHW images, built with onnx.helper."""
  onnx = pytest.importorskip("onnx", reason="exporting to ONNX needs the onnx extra")
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  config, _, variables = checkpoints.load_run(str(workdir))
  info = data.info(config["dataset"])
  dense = [variables["params"][k] for k in sorted(variables["params"], key=lambda k: int(k[6:]))]
  inits = [
      numpy_helper.from_array(np.asarray(info.mean, np.float32).reshape(-1, 1, 1), "mean"),
      numpy_helper.from_array(np.asarray(info.std, np.float32).reshape(-1, 1, 1), "std")
  ]
  nodes = [
      helper.make_node("Sub", ["x", "mean"], ["centred"]),
      helper.make_node("Div", ["centred", "std"], ["scaled"]),
      helper.make_node("Flatten", ["scaled"], ["h0"], axis=1)
  ]
  for i, layer in enumerate(dense):
    inits += [
        numpy_helper.from_array(np.asarray(layer["kernel"], np.float32), f"w{i}"),
        numpy_helper.from_array(np.asarray(layer["bias"], np.float32), f"b{i}")
    ]
    last = i + 1 == len(dense)
    nodes.append(helper.make_node("Gemm", [f"h{i}", f"w{i}", f"b{i}"], ["y" if last else f"z{i}"]))
    if not last:
      nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i + 1}"]))
  h, w, c = info.input_shape
  graph = helper.make_graph(
      nodes, "digits_mlp",
      [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, h, w])],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", info.num_classes])], inits)
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))

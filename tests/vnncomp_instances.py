"""VNN-COMP-style instances with known answers, built with ``onnx.helper``.

Shared by the tests of `verify.instances`; run as a script it writes the suite
(``NAME.onnx``, ``NAME.vnnlib``, ``instances.csv``, ``expected.csv``) into a folder
for ``python -m verify.vnncomp --instances=DIR/instances.csv``::

  python tests/vnncomp_instances.py DIR
"""

import pathlib
import sys

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper


def mlp_onnx(layers, batch="N"):
  """A Gemm/Relu network from ``[(W [out, in], b [out]), ...]`` (Relu between layers)."""
  nodes, inits, x = [], [], "x"
  for i, (w, b) in enumerate(layers):
    inits += [
        numpy_helper.from_array(np.asarray(w, np.float32), f"w{i}"),
        numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}")
    ]
    out = "y" if i + 1 == len(layers) else f"h{i}"
    nodes.append(
        helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out + ("" if out == "y" else "_pre")],
                         transB=1))
    if out != "y":
      nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
    x = out
  n_in, n_out = np.shape(layers[0][0])[1], np.shape(layers[-1][0])[0]
  graph = helper.make_graph(
      nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, n_in])],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, n_out])], inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def box_text(lower, upper, num_outputs):
  lines = [f"(declare-const X_{i} Real)" for i in range(len(lower))]
  lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
  for i, (lo, hi) in enumerate(zip(lower, upper)):
    lines += [f"(assert (>= X_{i} {float(lo)!r}))", f"(assert (<= X_{i} {float(hi)!r}))"]
  return "\n".join(lines) + "\n"


def pocket_onnx(centers, width, height):
  """``y = 1 - height * sum_c relu(1 - |x - c|_1 / width)``: below 1 only near the centres.

  The pockets are disjoint, so ``min y = 1 - height``; interval bounds see every
  pocket at its deepest at once (``1 - len(centers) * height``).
  """
  centers = np.asarray(centers, np.float64)
  k, n = centers.shape
  eye = np.eye(n) / width
  w1 = np.concatenate([np.concatenate([eye, -eye]) for _ in range(k)])  # |x - c| in two halves
  b1 = np.concatenate([np.concatenate([-c / width, c / width]) for c in centers])
  w2 = -np.kron(np.eye(k), np.ones((1, 2 * n)))  # 1 - |x - c|_1 / w, one row per pocket
  b2 = np.ones(k)
  w3, b3 = -height * np.ones((1, k)), np.ones(1)
  return mlp_onnx([(w1, b1), (w2, b2), (w3, b3)])


POCKETS = [[0.61, -0.37], [-0.52, 0.44]]


def cnn_onnx(rng, channels=4, classes=5):
  """``[N, 1, 8, 8]`` -> Conv 3x3 stride 2 -> BatchNorm -> Relu -> MaxPool 2 -> Flatten -> Gemm."""
  w = rng.normal(size=(channels, 1, 3, 3)) / 3
  inits = [
      numpy_helper.from_array(np.asarray(a, np.float32), name)
      for name, a in [("w",
                       w), ("b", 0.1 *
                            rng.normal(size=channels)), ("scale", rng.uniform(0.5, 1.5, channels)),
                      ("shift",
                       0.1 * rng.normal(size=channels)), (
                           "mean",
                           0.1 * rng.normal(size=channels)), ("var",
                                                              rng.uniform(0.5, 1.5, channels)),
                      ("fc", rng.normal(size=(classes, 4 * channels)) /
                       np.sqrt(4 * channels)), ("fc_b", 0.1 * rng.normal(size=classes))]
  ]
  nodes = [
      helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
      helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
      helper.make_node("Relu", ["n"], ["r"]),
      helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
      helper.make_node("Flatten", ["p"], ["f"]),
      helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1),
  ]
  graph = helper.make_graph(
      nodes, "cnn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, classes])], inits)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def random_layers(rng, sizes):
  """Random ``[(W [out, in], b [out]), ...]`` scaled to keep activations of order one."""
  return [(rng.normal(size=(b, a)) / np.sqrt(a), 0.1 * rng.normal(size=b))
          for a, b in zip(sizes, sizes[1:])]


def forward(layers, x):
  for i, (w, b) in enumerate(layers):
    x = w @ x + b
    x = np.maximum(x, 0) if i + 1 < len(layers) else x
  return x


def robustness_text(x, eps, label, num_classes, lower=0.0, upper=1.0):
  text = box_text(np.maximum(x - eps, lower), np.minimum(x + eps, upper), num_classes)
  others = [j for j in range(num_classes) if j != label]
  return text + "(assert (or " + " ".join(f"(and (>= Y_{j} Y_{label}))" for j in others) + "))\n"


def constructed(seed):
  """A random network and a threshold on ``y_0 - y_1`` met at a random point of the box."""
  rng = np.random.default_rng(seed)
  layers = random_layers(rng, (4, 12, 12, 3))
  lo, hi = -np.ones(4), np.ones(4)
  h = forward(layers, rng.uniform(lo, hi))
  threshold = float(h[0] - h[1]) + 1e-4  # y_0 - y_1 <= threshold holds at that point
  return mlp_onnx(layers), box_text(lo, hi, 3) + f"(assert (<= (- Y_0 Y_1) {threshold!r}))\n"


def write_instance(folder, name, model, text):
  folder = pathlib.Path(folder)
  onnx.save(model, str(folder / f"{name}.onnx"))
  (folder / f"{name}.vnnlib").write_text(text)
  return str(folder / f"{name}.onnx"), str(folder / f"{name}.vnnlib")


RELU_HALF = mlp_onnx([(np.array([[0.5]]), np.zeros(1)), (np.eye(1), np.zeros(1))])


def suite():
  """``[(name, model, vnnlib text, expected answer or None)]``."""
  one = box_text([-1.0], [1.0], 1)
  square = box_text([-1, -1], [1, 1], 1)
  out = [
      ("relu_half_unsat", RELU_HALF, one + "(assert (<= Y_0 -1))\n", "unsat"),
      ("relu_half_sat", RELU_HALF, one + "(assert (>= Y_0 0.4))\n", "sat"),
      ("pockets_sat", pocket_onnx(POCKETS, 0.02, 1.5), square + "(assert (<= Y_0 -0.25))\n", "sat"),
      ("pockets_unsat", pocket_onnx(POCKETS, 0.02,
                                    0.75), square + "(assert (<= Y_0 0))\n", "unsat"),
  ]
  out += [(f"constructed{s}", *constructed(s), "sat") for s in range(6)]
  rng = np.random.default_rng(7)
  layers = random_layers(rng, (6, 16, 16, 4))
  for eps in (0.01, 0.05, 0.1, 0.3):
    x = rng.uniform(0.2, 0.8, size=6)
    label = int(np.argmax(forward(layers, x)))
    out.append((f"robust_mlp_eps{eps}", mlp_onnx(layers), robustness_text(x, eps, label, 4), None))
  cnn = cnn_onnx(rng)
  ort = ort_session(cnn)
  for eps in (0.02, 0.1, 0.5):
    x = rng.uniform(0.2, 0.8, size=64)
    label = int(np.argmax(ort(x)))
    out.append((f"robust_cnn_eps{eps}", cnn, robustness_text(x, eps, label, 5), None))
  return out


def ort_session(model):
  """``x [D] -> y [K]`` by onnxruntime."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
  shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
  return lambda x: session.run(None, {"x": np.asarray(x, np.float32).reshape(shape)})[0].reshape(-1)


def write_suite(folder, timeout=60.0):
  """Writes every instance, ``instances.csv`` and ``expected.csv``; returns the first's path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rows, expected = [], []
  for name, model, text, answer in suite():
    write_instance(folder, name, model, text)
    rows.append(f"{name}.onnx,{name}.vnnlib,{timeout:g}\n")
    expected.append(f"{name},{answer or ''}\n")
  (folder / "instances.csv").write_text("".join(rows))
  (folder / "expected.csv").write_text("".join(expected))
  return folder / "instances.csv"


if __name__ == "__main__":
  print(write_suite(sys.argv[1]))

"""Networks exported by PyTorch's ONNX exporters load, match PyTorch and can be bounded."""

import io

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch exports need torch (see the bench extra)")
pytest.importorskip("onnx", reason="reading ONNX needs the onnx extra")

import verify  # pylint: disable=g-import-not-at-top
from robustlib import onnx as ronnx  # pylint: disable=g-import-not-at-top

EXPORTERS = ["torchscript", "dynamo"]


class Residual(torch.nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
    self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def _cnn():
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
                            torch.nn.ReLU(), Residual(8), torch.nn.MaxPool2d(2),
                            torch.nn.AvgPool2d(2, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 2 * 2, 32), torch.nn.LeakyReLU(0.1),
                            torch.nn.Linear(32, 10))
  with torch.no_grad():  # non-trivial running statistics
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
  return net.eval()


def _export(net, x, exporter):
  if exporter == "dynamo":
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
  buf = io.BytesIO()
  torch.onnx.export(net,
                    torch.from_numpy(x[:1]),
                    buf,
                    dynamo=exporter == "dynamo",
                    input_names=["x"],
                    output_names=["y"])
  return ronnx.load(buf.getvalue())


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exported_cnn_matches_pytorch_and_bounds_are_sound(exporter):
  net = _cnn()
  x = np.random.default_rng(0).uniform(size=(4, 1, 12, 12)).astype(np.float32)
  model = _export(net, x, exporter)
  assert model.input_shape == (1, 12, 12) and model.output_shape == (10,)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(jax.jit(model.fn)(x)), expected, rtol=1e-5, atol=1e-5)
  box = verify.linf_ball(x, 0.02)
  bounds = verify.crown(model.fn, box)
  points = np.random.default_rng(1).uniform(box.lower, box.upper, size=(64,) + x.shape)
  with torch.no_grad():
    outputs = np.stack([net(torch.from_numpy(p.astype(np.float32))).numpy() for p in points])
  assert np.all(outputs >= np.asarray(bounds.lower) - 1e-5)
  assert np.all(outputs <= np.asarray(bounds.upper) + 1e-5)

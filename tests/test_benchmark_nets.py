"""The benchmark networks' ONNX export and the families' properties."""

import jax
import numpy as np
import pytest

pytest.importorskip("onnx", reason="the export needs the onnx extra")

from benchmarks import bab_families  # pylint: disable=g-import-not-at-top
from benchmarks import nets  # pylint: disable=g-import-not-at-top
from robustlib import onnx as ronnx  # pylint: disable=g-import-not-at-top
from verify import vnnlib  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("name", ["mlp_4x256", "cnn_small"])
def test_the_onnx_export_computes_the_network(name):
  params = nets.init_params(name, jax.random.key(0))
  model = ronnx.load(nets.to_onnx(name, params))
  x = np.random.default_rng(0).uniform(size=(3, 1, 28, 28)).astype(np.float32)
  assert model.input_shape == (1, 28, 28)
  np.testing.assert_allclose(model.fn(x), nets.logits_fn(name, params)(x), rtol=1e-4, atol=1e-4)


def test_robustness_properties_are_the_ball_in_the_box():
  x = np.array([0.0, 0.5, 0.99], np.float32)
  spec = vnnlib.parse(bab_families.robustness_vnnlib(x, 0.02, 1, 3), num_inputs=3, num_outputs=3)
  (prop,) = spec.properties
  np.testing.assert_allclose(prop.lower, [0.0, 0.48, 0.97], atol=1e-6)
  np.testing.assert_allclose(prop.upper, [0.02, 0.52, 1.0], atol=1e-6)
  assert prop.violated(np.array([0.0, 1.0, 1.0])) and not prop.violated(np.array([0.0, 1.0, 0.9]))


def test_calibration_bounds_fall_with_the_radius(tmp_path, monkeypatch, shared_data_dir):
  monkeypatch.setenv("ROBUSTLIB_DATA_DIR", str(shared_data_dir))
  params = nets.init_params("mlp", jax.random.key(0))
  (tmp_path / "net.onnx").write_bytes(nets.to_onnx("mlp", params))
  table = bab_families.calibrate(tmp_path, 3, [0.0, 0.01, 0.1], "float32").splitlines()
  assert table[0].split()[0] == "radius" and len(table[0].split()) == 4
  bounds = np.array([[float(v) for v in line.split()[1:4]] for line in table[1:]])
  # At radius 0 the bound is the correctly classified points' own margin; it falls with eps.
  assert (bounds[0] > 0).all()
  assert (np.diff(bounds, axis=0) < 0).all()

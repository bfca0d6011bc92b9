"""Specification of robustlib.models: architectures, normalization, registry, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustlib import models

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
DIGITS = (8, 8, 1)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def abstract_variables(model, input_shape):
  """Variable shapes from ``models.init`` without allocating or computing them."""
  return jax.eval_shape(functools.partial(models.init, model, input_shape=input_shape),
                        jax.random.key(0))


def shapes(tree):
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def num_params(variables):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def images(input_shape, n=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, *input_shape))


# ---------------------------------------------------------------------------
# Architectures: exact layer shapes and parameter counts.

# Hand-derived from the layer arithmetic of Gowal et al. 2018; conv kernels are
# [kh, kw, in, out] and dense kernels [in, out]. Flatten sizes:
#   cnn_small  28: 13 -> 10, 10*10*32 = 3200;   32: 15 -> 12, 12*12*32 = 4608
#   cnn_medium 28: 26 -> 12 -> 10 -> 4, 1024;   32: 30 -> 14 -> 12 -> 5, 1600
#   cnn_large  28: 28 -> 28 -> 14 -> 14 -> 14, 25088;  32: ... 16, 32768
IBP_KERNELS = {
    ("cnn_small", MNIST): {
        "Conv_0": (4, 4, 1, 16),
        "Conv_1": (4, 4, 16, 32),
        "Dense_0": (3200, 100),
        "Dense_1": (100, 10)
    },
    ("cnn_small", CIFAR): {
        "Conv_0": (4, 4, 3, 16),
        "Conv_1": (4, 4, 16, 32),
        "Dense_0": (4608, 100),
        "Dense_1": (100, 10)
    },
    ("cnn_medium", MNIST): {
        "Conv_0": (3, 3, 1, 32),
        "Conv_1": (4, 4, 32, 32),
        "Conv_2": (3, 3, 32, 64),
        "Conv_3": (4, 4, 64, 64),
        "Dense_0": (1024, 512),
        "Dense_1": (512, 512),
        "Dense_2": (512, 10)
    },
    ("cnn_medium", CIFAR): {
        "Conv_0": (3, 3, 3, 32),
        "Conv_1": (4, 4, 32, 32),
        "Conv_2": (3, 3, 32, 64),
        "Conv_3": (4, 4, 64, 64),
        "Dense_0": (1600, 512),
        "Dense_1": (512, 512),
        "Dense_2": (512, 10)
    },
    ("cnn_large", MNIST): {
        "Conv_0": (3, 3, 1, 64),
        "Conv_1": (3, 3, 64, 64),
        "Conv_2": (3, 3, 64, 128),
        "Conv_3": (3, 3, 128, 128),
        "Conv_4": (3, 3, 128, 128),
        "Dense_0": (25088, 512),
        "Dense_1": (512, 10)
    },
    ("cnn_large", CIFAR): {
        "Conv_0": (3, 3, 3, 64),
        "Conv_1": (3, 3, 64, 64),
        "Conv_2": (3, 3, 64, 128),
        "Conv_3": (3, 3, 128, 128),
        "Conv_4": (3, 3, 128, 128),
        "Dense_0": (32768, 512),
        "Dense_1": (512, 10)
    },
}


@pytest.mark.parametrize("name, input_shape", sorted(IBP_KERNELS))
def test_ibp_cnn_layers_have_the_paper_shapes(name, input_shape):
  model = models.create(name, num_classes=10, input_shape=input_shape)
  params = shapes(abstract_variables(model, input_shape)["params"])
  kernels = {layer: p["kernel"] for layer, p in params.items()}
  biases = {layer: p["bias"] for layer, p in params.items()}
  expected = IBP_KERNELS[(name, input_shape)]
  assert kernels == expected
  assert biases == {layer: (k[-1],) for layer, k in expected.items()}


@pytest.mark.parametrize("input_shape", [MNIST, CIFAR])
def test_cnn7_is_cnn_large_with_batch_norm_after_each_conv_and_fc512(input_shape):
  large = abstract_variables(models.CNNLarge(10), input_shape)
  cnn7 = abstract_variables(models.CNN7(10), input_shape)
  bn_widths = [64, 64, 128, 128, 128, 512]
  expected_bn = {f"BatchNorm_{i}": {"scale": (w,), "bias": (w,)} for i, w in enumerate(bn_widths)}
  expected_stats = {f"BatchNorm_{i}": {"mean": (w,), "var": (w,)} for i, w in enumerate(bn_widths)}
  assert shapes(cnn7["params"]) == {**shapes(large["params"]), **expected_bn}
  assert shapes(cnn7["batch_stats"]) == expected_stats
  assert "batch_stats" not in large


# Totals with 10 classes. Besides the IBP CNNs (sums of the shapes above):
# PreActResNet-18 is 11,171,146 without the final BN and 11,172,170 with it;
# WRN-28-10 is the 36.5M-parameter model of the RobustBench leaderboards.
PARAM_COUNTS = {
    ("mlp", MNIST): 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10,
    ("cnn_small", MNIST): 329_606,
    ("cnn_small", CIFAR): 470_918,
    ("cnn_medium", MNIST): 893_418,
    ("cnn_medium", CIFAR): 1_188_906,
    ("cnn_large", MNIST): 13_257_290,
    ("cnn_large", CIFAR): 17_190_602,
    ("cnn7", MNIST): 13_257_290 + 2 * (2 * 64 + 3 * 128 + 512),
    ("cnn7", CIFAR): 17_190_602 + 2 * (2 * 64 + 3 * 128 + 512),
    ("preact_resnet18", CIFAR): 11_172_170,
    ("wrn28_10", CIFAR): 36_479_194,
}


@pytest.mark.parametrize("name, input_shape", sorted(PARAM_COUNTS))
def test_parameter_counts(name, input_shape):
  model = models.create(name, num_classes=10, input_shape=input_shape)
  assert num_params(abstract_variables(model, input_shape)) == PARAM_COUNTS[(name, input_shape)]


def test_ibp_cnn_counts_equal_the_sum_of_their_layer_shapes():
  for (name, input_shape), kernels in IBP_KERNELS.items():
    expected = sum(math.prod(k) + k[-1] for k in kernels.values())
    assert PARAM_COUNTS[(name, input_shape)] == expected, name


def test_wide_resnet_stages_have_widths_16k_32k_64k():
  variables = abstract_variables(models.WideResNet(10, depth=16, width=4), CIFAR)
  params = shapes(variables["params"])
  assert params["stem"]["kernel"] == (3, 3, 3, 16)
  blocks = [params[f"PreActBlock_{i}"] for i in range(6)]  # n = 2 per stage
  assert "PreActBlock_6" not in params
  assert [b["conv2"]["kernel"][-1] for b in blocks] == [64, 64, 128, 128, 256, 256]
  # A 1x1 shortcut exactly where the shape changes: the first block of each stage.
  assert ["shortcut" in b for b in blocks] == [True, False, True, False, True, False]
  assert blocks[0]["shortcut"]["kernel"] == (1, 1, 16, 64)
  assert blocks[2]["shortcut"]["kernel"] == (1, 1, 64, 128)
  assert blocks[2]["bn1"]["scale"] == (64,)  # pre-activation of the block's input
  assert params["head"]["dense"]["kernel"] == (256, 10)


def test_preact_resnet18_has_four_stages_of_two_blocks():
  variables = abstract_variables(models.PreActResNet18(10), CIFAR)
  params = shapes(variables["params"])
  blocks = [params[f"PreActBlock_{i}"] for i in range(8)]
  assert "PreActBlock_8" not in params
  assert params["stem"]["kernel"] == (3, 3, 3, 64)
  assert [b["conv2"]["kernel"][-1] for b in blocks] == [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
  assert ["shortcut" in b for b in blocks] == [False, False, True, False, True, False, True, False]
  assert params["head"]["bn"]["scale"] == (512,)
  assert params["head"]["dense"]["kernel"] == (512, 10)


@pytest.mark.parametrize("name", ["cnn_small", "cnn_medium", "cnn_large"])
@pytest.mark.parametrize("size", [16, 17, 23, 31])
def test_spatial_arithmetic_matches_the_feature_maps(name, size):
  model = models.create(name, num_classes=10, input_shape=(size, size, 1))
  side = models.output_size(size, model.spatial_layers())
  params = abstract_variables(model, (size, size, 1))["params"]
  assert params["Dense_0"]["kernel"].shape[0] == side * side * model.convs[-1].features


# ---------------------------------------------------------------------------
# Forward passes.

SMALL_MODELS = [
    ("mlp", MNIST, {}),
    ("cnn_small", MNIST, {}),
    ("cnn_medium", MNIST, {}),
    ("cnn_large", MNIST, {}),
    ("cnn7", MNIST, {}),
    ("preact_resnet18", CIFAR, {
        "width": 8
    }),
    ("wide_resnet", CIFAR, {
        "depth": 10,
        "width": 1
    }),
]
BN_MODELS = [case for case in SMALL_MODELS if case[0] in ("cnn7", "preact_resnet18", "wide_resnet")]
model_ids = [case[0] for case in SMALL_MODELS]


@functools.lru_cache(maxsize=None)
def _build(name, input_shape, options):
  model = models.create(name, num_classes=7, input_shape=input_shape, **dict(options))
  return model, models.init(model, jax.random.key(1), input_shape)


def build(name, input_shape, kwargs):
  """A model with 7 classes and its variables, initialized once per session."""
  return _build(name, input_shape, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
  return jax.jit(model.apply, static_argnames=("train", "mutable"))


@pytest.mark.parametrize("name, input_shape, kwargs", SMALL_MODELS, ids=model_ids)
def test_forward_gives_finite_logits_per_class(name, input_shape, kwargs):
  model, variables = build(name, input_shape, kwargs)
  logits = jitted_apply(model)(variables, images(input_shape))
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert not np.allclose(logits[0], logits[1])


# Eager application runs op by op; PreActResNet-18 shares its blocks with the
# WideResNet and is left to the jitted tests to keep this one fast.
EAGER_MODELS = [case for case in SMALL_MODELS if case[0] != "preact_resnet18"]


@pytest.mark.parametrize("name, input_shape, kwargs",
                         EAGER_MODELS,
                         ids=[case[0] for case in EAGER_MODELS])
def test_eval_mode_is_pure_and_jit_equals_eager(name, input_shape, kwargs):
  model, variables = build(name, input_shape, kwargs)
  x = images(input_shape)
  first = model.apply(variables, x, train=False)  # no mutable collections
  second = model.apply(variables, x, train=False)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_array_equal(first, second)
  np.testing.assert_allclose(jitted, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, input_shape, kwargs", BN_MODELS, ids=[c[0] for c in BN_MODELS])
def test_train_mode_updates_batch_stats_only_when_mutable(name, input_shape, kwargs):
  model, variables = build(name, input_shape, kwargs)
  x = images(input_shape)
  logits, updates = jitted_apply(model)(variables, x, train=True, mutable=("batch_stats",))
  assert logits.shape == (2, 7)
  assert set(updates) == {"batch_stats"}
  assert shapes(updates["batch_stats"]) == shapes(variables["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)


def test_models_without_batch_norm_have_only_params():
  for name in ("mlp", "cnn_small", "cnn_medium", "cnn_large"):
    model = models.create(name, num_classes=10, input_shape=MNIST)
    assert set(abstract_variables(model, MNIST)) == {"params"}, name


@pytest.mark.parametrize("name, kwargs", [
    ("wide_resnet", {
        "depth": 10,
        "width": 1
    }),
    ("preact_resnet18", {
        "width": 8
    }),
    ("mlp", {
        "hidden": (16,)
    }),
])
def test_swish_variant_shares_weights_but_differs_from_relu(name, kwargs):
  relu, variables = build(name, CIFAR, kwargs)
  assert relu.activation == "relu"
  swish = models.create(name, num_classes=7, input_shape=CIFAR, activation="swish", **kwargs)
  silu = models.create(name, num_classes=7, input_shape=CIFAR, activation="silu", **kwargs)
  x = images(CIFAR)
  out_swish = jitted_apply(swish)(variables, x)
  assert not np.allclose(jitted_apply(relu)(variables, x), out_swish)
  np.testing.assert_allclose(jitted_apply(silu)(variables, x), out_swish, rtol=1e-6)


def test_mlp_hidden_widths():
  model = models.create("mlp", num_classes=3, input_shape=DIGITS, hidden=(32, 16, 8))
  params = shapes(abstract_variables(model, DIGITS)["params"])
  assert {
      k: p["kernel"] for k, p in params.items()
  } == {
      "Dense_0": (64, 32),
      "Dense_1": (32, 16),
      "Dense_2": (16, 8),
      "Dense_3": (8, 3)
  }


# ---------------------------------------------------------------------------
# Normalization is part of the model.


def test_normalize_is_per_channel_affine():
  x = images((4, 4, 3))
  out = models.Normalize(CIFAR_MEAN, CIFAR_STD).apply({}, x)
  expected = (np.asarray(x) - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  assert models.Normalize().init(jax.random.key(0), x) == {}


@pytest.mark.parametrize("name, kwargs", [
    ("mlp", {
        "hidden": (16,)
    }),
    ("wide_resnet", {
        "depth": 10,
        "width": 1
    }),
])
def test_model_normalizes_its_input_first(name, kwargs):
  plain, variables = build(name, CIFAR, kwargs)  # mean 0, std 1
  normalized = models.create(name,
                             num_classes=7,
                             input_shape=CIFAR,
                             mean=CIFAR_MEAN,
                             std=CIFAR_STD,
                             **kwargs)
  x = images(CIFAR)
  x_standardized = (x - jnp.asarray(CIFAR_MEAN)) / jnp.asarray(CIFAR_STD)
  out = jitted_apply(normalized)(variables, x)
  np.testing.assert_allclose(out,
                             jitted_apply(plain)(variables, x_standardized),
                             rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(out, jitted_apply(plain)(variables, x), atol=1e-3)


# ---------------------------------------------------------------------------
# Registry and validation.


def test_registry_names_and_is_read_only():
  assert set(models.MODELS) == {
      "mlp", "cnn_small", "cnn_medium", "cnn_large", "cnn7", "preact_resnet18", "wide_resnet",
      "wrn28_10"
  }
  with pytest.raises(TypeError):
    models.MODELS["mine"] = models.MLP


def test_wrn28_10_fixes_depth_and_width():
  model = models.create("wrn28_10", num_classes=10, input_shape=CIFAR, activation="swish")
  assert (model.depth, model.width, model.activation) == (28, 10, "swish")
  with pytest.raises(models.ModelInputError, match="depth"):
    models.create("wrn28_10", num_classes=10, input_shape=CIFAR, depth=34)


def test_create_passes_fields_to_the_model():
  model = models.create("wide_resnet",
                        num_classes=100,
                        input_shape=CIFAR,
                        mean=CIFAR_MEAN,
                        std=CIFAR_STD,
                        depth=34,
                        width=2)
  assert model == models.WideResNet(100, depth=34, width=2, mean=CIFAR_MEAN, std=CIFAR_STD)


@pytest.mark.parametrize("name, smallest", [("cnn_small", 10), ("cnn_medium", 16)])
def test_digits_are_too_small_for_valid_ibp_cnns(name, smallest):
  with pytest.raises(models.ModelInputError) as info:
    models.create(name, num_classes=10, input_shape=DIGITS)
  message = str(info.value)
  assert name in message and "(8, 8, 1)" in message
  assert f"at least {smallest}x{smallest}" in message


@pytest.mark.parametrize("name, smallest", [("cnn_small", 10), ("cnn_medium", 16), ("cnn_large", 1),
                                            ("cnn7", 1), ("mlp", 1), ("preact_resnet18", 1),
                                            ("wide_resnet", 1)])
def test_minimum_input_size_is_exact(name, smallest):
  model = models.create(name, num_classes=10, input_shape=(smallest, smallest, 1))
  assert models.min_input_size(model.spatial_layers()) == smallest
  params = abstract_variables(model, (smallest, smallest, 1))["params"]
  assert num_params({"params": params}) > 0
  if smallest > 1:
    with pytest.raises(models.ModelInputError, match=f"at least {smallest}x{smallest}"):
      models.init(model, jax.random.key(0), (smallest, smallest - 1, 1))
    with pytest.raises(Exception):  # the unchecked model breaks one pixel lower
      jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, smallest - 1, smallest - 1, 1))),
                     jax.random.key(0))


def test_digits_fit_the_models_with_same_padding():
  for name in ("mlp", "cnn_large", "cnn7"):
    model = models.create(name, num_classes=10, input_shape=DIGITS)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model, DIGITS),
                            jax.ShapeDtypeStruct((5, *DIGITS), jnp.float32))
    assert logits.shape == (5, 10), name


@pytest.mark.parametrize("input_shape", [(28, 28), (1, 28, 28, 1), (28, 0, 1)])
def test_create_rejects_input_shapes_that_are_not_hwc(input_shape):
  with pytest.raises(models.ModelInputError, match="input_shape must be"):
    models.create("mlp", num_classes=10, input_shape=input_shape)


@pytest.mark.parametrize("mean, std, match", [
    ((0.5, 0.5), (1.0,), "mean must have 1 or C=3"),
    ((0.5,), (0.2, 0.2, 0.2, 0.2), "std must have 1 or C=3"),
    (CIFAR_MEAN, (0.2, 0.0, 0.2), "std must be nonzero"),
])
def test_create_rejects_statistics_that_do_not_fit(mean, std, match):
  with pytest.raises(models.ModelInputError, match=match):
    models.create("cnn_small", num_classes=10, input_shape=CIFAR, mean=mean, std=std)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match="'resnet50'.*cnn_small.*wrn28_10"):
    models.create("resnet50", num_classes=10, input_shape=CIFAR)


def test_unknown_option_is_rejected_naming_accepted_ones():
  with pytest.raises(models.ModelInputError, match=r"\['dropout'\].*hidden"):
    models.create("mlp", num_classes=10, input_shape=MNIST, dropout=0.5)


@pytest.mark.parametrize("depth", [4, 12, 27, 29])
def test_wide_resnet_rejects_depths_that_are_not_6n_plus_4(depth):
  with pytest.raises(ValueError, match=f"got {depth}"):
    models.WideResNet(10, depth=depth)
  with pytest.raises(ValueError, match="6 n \\+ 4"):
    models.create("wide_resnet", num_classes=10, input_shape=CIFAR, depth=depth)


def test_unknown_activation_lists_valid_names():
  with pytest.raises(ValueError, match=r"'gelu'.*\['relu', 'silu', 'swish'\]"):
    models.activation("gelu")
  with pytest.raises(ValueError, match="gelu"):
    models.create("preact_resnet18", num_classes=10, input_shape=CIFAR, activation="gelu")


def test_activation_lookup():
  x = jnp.array([-2.0, 0.0, 3.0])
  np.testing.assert_allclose(models.activation("relu")(x), [0.0, 0.0, 3.0])
  np.testing.assert_allclose(models.activation("swish")(x), x * jax.nn.sigmoid(x), rtol=1e-6)


def test_models_reject_batches_that_are_not_rank_4():
  model, variables = build("mlp", MNIST, {})
  with pytest.raises(models.ModelInputError, match="rank 4"):
    model.apply(variables, jnp.zeros(MNIST))


# ---------------------------------------------------------------------------
# check_input.


def test_check_input_accepts_a_matching_float_batch():
  assert models.check_input(jnp.zeros((3, *CIFAR)), CIFAR) is None


@pytest.mark.parametrize("x, match", [
    (np.zeros((2, 32, 32, 1), np.float32), r"x must have shape \[N, 32, 32, 3\].*\(2, 32, 32, 1\)"),
    (np.zeros(CIFAR, np.float32), r"rank 4.*got rank 3 with shape \(32, 32, 3\)"),
    (np.zeros((2, *CIFAR), np.uint8), "floating dtype.*uint8"),
])
def test_check_input_names_expected_and_actual(x, match):
  with pytest.raises(models.ModelInputError, match=match):
    models.check_input(x, CIFAR)


def test_check_input_works_on_tracers():

  @jax.jit
  def checked(x):
    models.check_input(x, MNIST, name="batch")
    return x.sum()

  assert float(checked(jnp.ones((2, *MNIST)))) == 2 * 28 * 28
  with pytest.raises(models.ModelInputError, match=r"batch must have shape \[N, 28, 28, 1\]"):
    checked(jnp.ones((2, *CIFAR)))

"""Specification of robustlib.data's augmentation: random crops and flips on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustlib import data


def _images(n=64, h=6, w=5, c=2):
  return jax.random.uniform(jax.random.PRNGKey(0), (n, h, w, c), minval=0.1, maxval=1.0)


def _shifts(image, padding):
  """Every crop of ``image`` padded by ``padding`` zeros, keyed by its offset."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return {
      (dy, dx): padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
      for dx in range(2 * padding + 1)
  }


def test_random_crop_gives_a_shifted_zero_filled_window_per_image():
  images = _images()
  out = np.asarray(data.random_crop(jax.random.PRNGKey(1), images, padding=2))
  assert out.shape == images.shape and out.dtype == images.dtype
  offsets = set()
  for image, crop in zip(np.asarray(images), out):
    matches = [o for o, shifted in _shifts(image, 2).items() if np.array_equal(shifted, crop)]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) >= 10  # 25 offsets are possible; 64 draws reach many of them


def test_random_crop_with_no_padding_is_the_identity():
  images = _images()
  np.testing.assert_array_equal(data.random_crop(jax.random.PRNGKey(1), images, 0), images)


def test_random_flip_mirrors_about_half_of_the_images():
  images = _images(n=200)
  out = np.asarray(data.random_flip(jax.random.PRNGKey(2), images))
  kept = np.all(out == np.asarray(images), axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(kept ^ mirrored)
  assert 60 < mirrored.sum() < 140


def test_make_augment_is_deterministic_in_its_key_and_jits():
  augment = jax.jit(data.make_augment(crop_padding=1, flip=True))
  images = _images()
  a, b = augment(jax.random.PRNGKey(3), images), augment(jax.random.PRNGKey(3), images)
  c = augment(jax.random.PRNGKey(4), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_make_augment_without_anything_to_do_is_none():
  assert data.make_augment(0, False) is None
  assert data.make_augment(2, False) is not None and data.make_augment(0, True) is not None


@pytest.mark.parametrize("padding", [-1, 1.5, True])
def test_bad_crop_padding_is_named(padding):
  with pytest.raises(ValueError, match="crop_padding must be an integer >= 0"):
    data.make_augment(crop_padding=padding)


def test_padding_as_large_as_the_image_is_refused():
  with pytest.raises(ValueError, match="padding 5 must be smaller than the image's"):
    data.random_crop(jax.random.PRNGKey(0), _images(h=6, w=5), 5)


def test_images_must_be_four_dimensional():
  with pytest.raises(ValueError, match=r"random_flip: images must be \[N, H, W, C\]"):
    data.random_flip(jax.random.PRNGKey(0), jnp.zeros((3, 4, 4)))

"""Training-time data augmentation as pure, jittable functions of a PRNG key.

Random crops of a zero-padded image and random horizontal flips: the
augmentation of the CIFAR-10 recipes (Gowal et al. 2018, Zhang et al. 2020,
Shi et al. 2021). Each runs on the device inside the train step, so batches
never come back to the host; values stay in the images' range (padding is 0).

Example:
    >>> augment = make_augment(crop_padding=4, flip=True)
    >>> x = augment(key, images)  # images: [N, 32, 32, 3]
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _check_images(images: jax.Array, name: str) -> None:
  if images.ndim != 4:
    raise ValueError(f"{name}: images must be [N, H, W, C], got shape {images.shape}")


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Shifts each image by up to ``padding`` pixels, filling with zeros.

  The crop of an ``[H, W]`` window from the image padded by ``padding`` zeros on
  every side, at an offset drawn uniformly per image (torchvision's
  ``RandomCrop(H, padding)``).

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]``.
    padding: pixels of zeros on each side, >= 0 and less than ``H`` and ``W``
      (0 returns ``images``).

  Returns:
    ``[N, H, W, C]``, the dtype of ``images``.
  """
  _check_images(images, "random_crop")
  padding = int(padding)
  if padding < 0:
    raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
  n, h, w, c = images.shape
  if padding >= min(h, w):
    raise ValueError(f"random_crop: padding {padding} must be smaller than the image's height "
                     f"and width, {h}x{w}")
  if padding == 0:
    return images
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left to right with probability 1/2.

  Args:
    key: PRNG key.
    images: ``[N, H, W, C]``.

  Returns:
    ``[N, H, W, C]``, the dtype of ``images``.
  """
  _check_images(images, "random_flip")
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def make_augment(crop_padding: int = 0, flip: bool = False) -> Optional[Augment]:
  """Builds ``augment(key, images [N, H, W, C]) -> images``: a random crop, then a flip.

  Args:
    crop_padding: ``random_crop``'s padding (0: no crop).
    flip: whether to apply ``random_flip``.

  Returns:
    The augmentation, or None when it would do nothing.

  Raises:
    ValueError: for a negative or non-integer ``crop_padding``.
  """
  if isinstance(crop_padding, bool) or int(crop_padding) != crop_padding or crop_padding < 0:
    raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
  if not crop_padding and not flip:
    return None

  def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    images = random_crop(crop_key, images, crop_padding)
    return random_flip(flip_key, images) if flip else images

  return augment

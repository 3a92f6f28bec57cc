"""Device-side augmentation, jitted from keys: the epoch permutation, random crop, flip, Cutout and
normalisation of uint8 NHWC batches (`augment_batch`). Training gathers and augments each batch on
the accelerator with these, so no step needs host work."""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp


def epoch_permutation(key: jax.Array, num_examples: int) -> jax.Array:
    """The example order of one epoch."""
    return jax.random.permutation(key, num_examples)


def crop(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
    """Zero-pads by `padding` and crops back to the original size at `offsets` (n, 2) in
    [0, 2 * padding] (torchvision RandomCrop(size, padding) with random offsets)."""
    if padding <= 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    window = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(window)(padded, offsets)


def mirror(images: jax.Array, where: jax.Array) -> jax.Array:
    """Mirrors left-right the images where `where` (n,) is true."""
    return jnp.where(where[:, None, None, None], images[:, :, ::-1], images)


def cutout(images: jax.Array, centres: jax.Array, length: int) -> jax.Array:
    """Zeroes a `length` x `length` square per image around `centres` (n, 2), clipped at the
    borders (DeVries & Taylor's Cutout as the authors used it: after normalisation, so the
    hole is the mean colour; centres uniform over the image)."""
    if length <= 0:
        return images
    _, h, w, _ = images.shape
    cy, cx = centres[:, 0, None, None], centres[:, 1, None, None]
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((ys >= cy - length // 2) & (ys < cy + length // 2)
              & (xs >= cx - length // 2) & (xs < cx + length // 2))
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = jnp.float32) -> jax.Array:
    """uint8 [0, 255] -> (x / 255 - mean) / std per channel, in `dtype`."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def augment_batch(key: jax.Array, images: jax.Array, *, mean: Sequence[float],
                  std: Sequence[float], crop_padding: int = 4, flip: bool = True,
                  cutout_length: int = 0, dtype: Any = jnp.float32) -> jax.Array:
    """The training transform of a uint8 batch, deterministic in `key`: random crop (pad
    `crop_padding`, 0 = off), random flip, normalisation, Cutout (`cutout_length`, 0 = off).

    All random numbers come from one `jax.random.bits` draw: each threefry instance costs
    about a second of XLA:CPU compile time, per candidate."""
    chex.assert_rank(images, 4)  # NHWC (checked when traced: free at run time)
    chex.assert_type(images, jnp.uint8)
    n, h, w, _ = images.shape
    bits = jax.random.bits(key, (n, 5), jnp.uint32)
    images = crop(images, (bits[:, :2] % (2 * crop_padding + 1)).astype(jnp.int32),
                  crop_padding)
    if flip:
        images = mirror(images, (bits[:, 2] & 1) == 1)
    centres = jnp.stack([bits[:, 3] % h, bits[:, 4] % w], axis=1).astype(jnp.int32)
    return cutout(normalize(images, mean, std, dtype), centres, cutout_length)


__all__ = ["augment_batch", "crop", "cutout", "epoch_permutation", "mirror", "normalize"]

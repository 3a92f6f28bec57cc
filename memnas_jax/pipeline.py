"""The host input pipeline of streamed datasets (ImageNet): decode, crop and batch records on the
host, each host its own rows of every global batch (`host_batches`); the device then flips and
normalises them (`memnas_jax.augment`)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamingSplit:
    """A random-access source of records {"image": uint8 HWC, "label": int} (a
    `tfds.data_source`, or any sequence), batched on the host at `image_size`.

    `resize`: "none" (records already have the size), or "imagenet" (train: random-resized crop;
    eval: resize the shorter side to image_size / 0.875, centre crop)."""

    source: Any
    image_size: int
    resize: str = "none"

    def __len__(self) -> int:
        return len(self.source)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 HWC image (scipy, so no imaging library is needed)."""
    import scipy.ndimage
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    out = scipy.ndimage.zoom(image.astype(np.float32), (height / h, width / w, 1), order=1,
                             mode="nearest", grid_mode=True)
    return np.clip(np.rint(out[:height, :width]), 0, 255).astype(np.uint8)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Inception-style crop: area 8-100 %, aspect 3/4-4/3, resized to size x size."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:  # fall back to the central square
        ch = cw = min(h, w)
        y, x = (h - ch) // 2, (w - cw) // 2
    return resize_image(image[y:y + ch, x:x + cw], size, size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to size / 0.875 and takes the centre size x size."""
    h, w = image.shape[:2]
    scale = size / 0.875 / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = resize_image(image, nh, nw)
    y, x = (nh - size) // 2, (nw - size) // 2
    return resized[y:y + size, x:x + size]


def preprocess_record(record: dict, split: StreamingSplit, train: bool,
                      rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A record -> (uint8 image of split.image_size, label)."""
    image = np.asarray(record["image"], np.uint8)
    if split.resize == "imagenet":
        image = (random_resized_crop(image, split.image_size, rng) if train
                 else center_crop(image, split.image_size))
    elif image.shape[0] != split.image_size or image.shape[1] != split.image_size:
        raise ValueError(f"record image {image.shape} is not {split.image_size} px square "
                         "(set resize='imagenet')")
    return image, int(record["label"])


def host_batches(split: StreamingSplit, batch_size: int, *, seed: int, epoch: int, train: bool,
                 rows: Sequence[int] | None = None, num_threads: int = 0
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (uint8 images, int32 labels, bool mask) host batches of a streaming split.

    The split is cut into global batches of `batch_size`: training shuffles by (seed, epoch),
    seeds each random crop by (seed, epoch, example) and drops the last partial batch;
    evaluation keeps the stored order and pads the last batch (zero images, label 0, mask
    False). `rows` are the positions within each global batch that this host feeds (default:
    all of them; in a multi-host job `sharding.process_batch_rows`), so every host yields the
    same number of batches of len(rows) rows, and hosts together cover each global batch once.
    A thread pool (`num_threads`, 0 = up to 8) decodes and crops."""
    n = len(split)
    rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= batch_size:
        raise ValueError(f"rows must be positions in a batch of {batch_size}, got {rows}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if train else np.arange(n)
    num_batches = n // batch_size if train else -(-n // batch_size)
    # This host's examples, batch after batch; -1 marks padding past the end of the split.
    positions = (np.arange(num_batches)[:, None] * batch_size + rows[None, :]).reshape(-1)
    local = np.where(positions < n, order[np.minimum(positions, n - 1)], -1)
    masks = (local >= 0).reshape(num_batches, len(rows))
    padding: list[np.ndarray] = []

    def load(i: int) -> tuple[np.ndarray, int]:
        if i < 0:
            if not padding:  # the shape of a real example (lazily: most batches need none)
                padding.append(np.zeros_like(load(0)[0]))
            return padding[0], 0
        rng = np.random.default_rng([seed, epoch, int(i)])
        return preprocess_record(split.source[int(i)], split, train, rng)

    threads = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for b, mask in enumerate(masks):
            items = list(pool.map(load, local[b * len(rows):(b + 1) * len(rows)]))
            yield (np.stack([im for im, _ in items]),
                   np.asarray([label for _, label in items], np.int32), mask)


__all__ = ["center_crop", "host_batches", "preprocess_record", "random_resized_crop",
           "resize_image"]

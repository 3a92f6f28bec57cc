"""MemNAS search on ImageNet: `--config=experiments/configs/imagenet.py:<preset>`.

The paper's ImageNet search space and training recipe were not published (docs/method.md
§2); these presets are our choices. The skeleton is `space.imagenet_skeleton` (a stride-2 stem
for images >= 128 px, 5 blocks with strides 2,2,2,2,1 and widths w,2w,4w,8w,8w, global average
pooling), and a grown cell goes into one block at a time (the README restricts "the same cell in
all five blocks" to CIFAR-10).

Presets:

* paper: ImageNet 2012 at 224 px from a prepared TFDS `imagenet2012` (array_record; it needs
  TFDS's manual download of the ILSVRC2012 tars, see the error message), width 32, candidates
  trained 5 epochs at batch 256 (a proxy), lambda 0.5, the paper's round structure.
* resized32: TFDS `imagenet_resized/32x32`, width 16, 5 epochs: a cheap proxy search.
* test: synthetic 32 px data on the ImageNet skeleton, seconds per candidate (the test suite).
"""

from __future__ import annotations

import ml_collections

from configs import common  # experiments/configs/common.py
from memnas_jax import search


def _imagenet() -> ml_collections.ConfigDict:
    """What every ImageNet preset shares."""
    config = search.default_config()
    config.skeleton.kind = "imagenet"
    config.skeleton.width_schedule = "1,2,4,8,8"
    config.grow_trim.update(dict(growth="per_block", round0_combine_modes=("add",)))
    config.data.validation_size = 0  # ImageNet has its own validation split
    config.train.update(dict(batch_size=256, eval_batch_size=500, learning_rate=0.1,
                             nesterov=True, weight_decay=5e-5, schedule="cosine",
                             milestones=(), warmup_epochs=1, dtype="bfloat16",
                             checkpoint_every_epochs=1))
    config.search.candidate_checkpoints = True
    config.search.stop_when_no_improvement = False  # as in cifar10.py: grows rarely score > 0
    return config


def paper() -> ml_collections.ConfigDict:
    """Real ImageNet (a prepared TFDS imagenet2012), w = 32, 5-epoch candidates."""
    config = _imagenet()
    config.data.name = "imagenet2012"
    config.skeleton.width = 32
    config.train.epochs = 5
    return config


def resized32() -> ml_collections.ConfigDict:
    """TFDS's imagenet_resized/32x32, w = 16."""
    config = _imagenet()
    config.data.name = "imagenet_resized/32x32"
    config.skeleton.width = 16
    config.train.epochs = 5
    config.search.update(dict(max_rounds=8, full_train_cap=64, top_k=24))
    common.small_controller(config, max_steps=2000)
    return config


def test() -> ml_collections.ConfigDict:
    """Synthetic 32 px data (the test suite)."""
    config = _imagenet()
    config.search.candidate_checkpoints = False
    common.test_preset(config, image_size=32, num_classes=4)
    config.train.dtype = "float32"
    config.train.schedule = "step"
    config.train.warmup_epochs = 0
    return config


# The presets, defined once: --config=experiments/configs/imagenet.py:<name>.
PRESETS = {"paper": paper, "resized32": resized32, "test": test}
PRESET_NAMES = tuple(PRESETS)


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown ImageNet preset {preset!r}; use one of {PRESET_NAMES}")
    return PRESETS[preset]()

"""One candidate's training settings: `default_config`, `check_config`, the skeleton they size,
XLA compile options and the persistent compilation cache."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from memnas_jax import data as data_lib
from memnas_jax import ops
from memnas_jax.space import Skeleton, cifar_skeleton, imagenet_skeleton

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEPTHWISE_IMPLS = ("auto", *ops.DEPTHWISE_IMPLS)  # "auto": resolve_depthwise_impl


def default_config() -> ml_collections.ConfigDict:
    """The authors' search-time protocol (docs/method.md §8): SGD lr 0.01 momentum 0.9, batch
    64, 150 epochs with steps at 60 and 100, width 64, crop + flip; selection on a 5,000-image
    validation split held out of the training set (the authors chose on the test set)."""
    c = ml_collections.ConfigDict()
    c.data = data_lib.default_data_config()
    c.skeleton = ml_collections.ConfigDict(dict(
        kind="cifar",  # "cifar" (cifar_skeleton) or "imagenet" (imagenet_skeleton)
        width=64,
        width_schedule="uniform",  # "uniform", "doubling" or multipliers "1,1,2,2,4"
        removed_op="identity",
        conv_bias=True,
        bn_momentum=0.9,
        bn_epsilon=1e-5,
    ))
    c.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True, cutout=0))
    c.epochs = 150
    c.batch_size = 64  # global, split over the devices
    c.eval_batch_size = 500
    c.optimizer = "sgd"  # "sgd" or "adamw"
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0  # sgd: L2 added to the gradient (PyTorch style); adamw: decoupled
    c.schedule = "step"  # "step" (milestones x gamma) or "cosine"
    c.milestones = (60, 100)  # epochs at whose start the learning rate is multiplied by gamma
    c.gamma = 0.1
    c.warmup_epochs = 0  # linear warmup from 0, both schedules
    c.grad_clip_norm = 0.0  # 0 = off
    c.label_smoothing = 0.0
    c.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    c.depthwise_impl = "auto"  # "auto": "shifted" on CPU (2x faster there), "xla" elsewhere
    c.num_devices = 0  # 0 = all local devices
    c.eval_every_epochs = 1
    c.nan_check_every_steps = 0  # 0 = once per epoch
    c.checkpoint_dir = ""  # "" = no checkpoints
    c.checkpoint_every_epochs = 0  # 0 = only the last epoch (when checkpoint_dir is set)
    c.checkpoints_to_keep = 2
    # JAX's persistent compilation cache ("" = off; the search's "auto" = <workdir>/xla_cache)
    c.compilation_cache_dir = ""
    c.host_threads = 0  # host pipeline threads for streaming data (0 = auto)
    # XLA options of the evaluation program only, "name=value,...": it runs a few batches per
    # epoch, so on a GPU "xla_gpu_autotune_level=0" may cost less than autotuning it (measure
    # with benchmarks/search_throughput.py --eval_compiler_options).
    c.eval_compiler_options = ""
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings no candidate could train with."""
    choices = dict(optimizer=OPTIMIZERS, schedule=SCHEDULES, dtype=tuple(DTYPES),
                   depthwise_impl=DEPTHWISE_IMPLS)
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise ValueError(f"config.{field} = {config[field]!r} is not one of {allowed}")
    for field in ("epochs", "batch_size", "eval_batch_size", "eval_every_epochs"):
        if config[field] < 1:
            raise ValueError(f"config.{field} must be >= 1, got {config[field]}")
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    if list(config.milestones) != sorted(config.milestones):
        raise ValueError(f"config.milestones must be increasing, got {config.milestones}")
    compiler_options(config.get("eval_compiler_options", ""), "eval_compiler_options")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")


def compiler_options(text: str, field: str = "compiler_options") -> dict[str, Any]:
    """"name=value,..." -> XLA compile options (ints, floats and true/false parsed); XLA itself
    rejects an unknown name when the program compiles."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"config.{field}: {item!r} is not name=value")
        value = value.strip()
        for parse in (int, float):
            try:
                options[name.strip()] = parse(value)
                break
            except ValueError:
                continue
        else:
            lowered = value.lower()
            options[name.strip()] = (lowered == "true") if lowered in ("true", "false") else value
    return options


def skeleton_from_config(config: ml_collections.ConfigDict, dataset: data_lib.Dataset
                         ) -> Skeleton:
    """The skeleton of `config.skeleton`, sized to the dataset's images and classes."""
    s = config.skeleton
    schedule = s.width_schedule
    if schedule not in ("uniform", "doubling"):
        schedule = tuple(int(m) for m in str(schedule).split(","))
    size, _, channels = dataset.image_shape
    common = dict(removed_op=s.removed_op, conv_bias=s.conv_bias, bn_momentum=s.bn_momentum,
                  bn_epsilon=s.bn_epsilon)
    if s.kind == "cifar":
        return cifar_skeleton(s.width, schedule, num_classes=dataset.num_classes,
                              **common).replace(image_size=size, in_channels=channels)
    if s.kind == "imagenet":
        return imagenet_skeleton(s.width, size, dataset.num_classes, schedule,
                                 **common).replace(in_channels=channels)
    raise ValueError(f"config.skeleton.kind {s.kind!r} is not 'cifar' or 'imagenet'")


def resolve_depthwise_impl(name: str) -> str:
    """"auto" -> "shifted" on CPU (XLA:CPU's depthwise weight gradient is a dense conv, ~2x
    slower overall), "xla" on GPU/TPU."""
    if name == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    return name


AUTO_CACHE = "auto"  # compilation_cache_dir: the work directory's XLA_CACHE_DIR
XLA_CACHE_DIR = "xla_cache"


def compilation_cache_path(setting: str, workdir: str | os.PathLike) -> str:
    """`compilation_cache_dir` as a path: "auto" is `<workdir>/xla_cache`, "" stays off."""
    return os.path.join(workdir, XLA_CACHE_DIR) if setting == AUTO_CACHE else setting


def configure_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` ("" leaves it as it is).

    Every compiled program is stored there, so a resumed search, a rerun and the same candidate
    in a later round skip XLA. With it JAX also turns on XLA's per-fusion autotune cache
    (`jax_persistent_cache_enable_xla_caches`): on a GPU, the convolution algorithms chosen for
    one candidate's fusions are reused by every later candidate with the same fusion, in this
    process and the next."""
    if not path:
        return
    if path == AUTO_CACHE:
        raise ValueError('compilation_cache_dir "auto" means the work directory\'s cache: '
                         "resolve it with compilation_cache_path(setting, workdir) first")
    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir == path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Candidates compile in 1-50 s and are all worth keeping (JAX's default threshold is 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:  # JAX reads the directory once per process; make a changed directory take effect
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        logging.warning("could not reset JAX's compilation cache: %s may not be used", path)

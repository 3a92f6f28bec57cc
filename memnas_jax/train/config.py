"""One candidate's training settings: the frozen, validated `TrainSettings` every training
function reads (made once from a config by `TrainSettings.from_config`), `default_config`, the
skeleton a config sizes, XLA compile options and the persistent compilation cache."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from memnas_jax import data as data_lib
from memnas_jax import ops
from memnas_jax import settings as settings_lib
from memnas_jax.errors import ConfigError
from memnas_jax.space import (
    REMOVED_OP_STYLES,
    Skeleton,
    block_widths,
    cifar_skeleton,
    imagenet_skeleton,
)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEPTHWISE_IMPLS = ("auto", *ops.DEPTHWISE_IMPLS)  # "auto": resolve_depthwise_impl


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    crop_padding: int = 4  # random crop of the zero-padded image (0 = no crop)
    flip: bool = True  # random horizontal flip
    cutout: int = 0  # side of the Cutout square (0 = off)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How one candidate trains. The defaults are the authors' search-time protocol
    (docs/method.md §8): SGD lr 0.01 momentum 0.9, batch 64, 150 epochs with steps at 60 and
    100, crop + flip."""

    epochs: int = 150
    batch_size: int = 64  # global, split over the devices
    eval_batch_size: int = 500
    optimizer: str = "sgd"  # "sgd" or "adamw"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # sgd: L2 added to the gradient (PyTorch style); adamw: decoupled
    schedule: str = "step"  # "step" (milestones x gamma) or "cosine"
    milestones: tuple[int, ...] = (60, 100)  # epochs whose start multiplies the lr by gamma
    gamma: float = 0.1
    warmup_epochs: int = 0  # linear warmup from 0, both schedules
    grad_clip_norm: float = 0.0  # 0 = off
    label_smoothing: float = 0.0
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    depthwise_impl: str = "auto"  # "auto": "shifted" on CPU (2x faster there), "xla" elsewhere
    num_devices: int = 0  # 0 = all local devices
    eval_every_epochs: int = 1
    nan_check_every_steps: int = 0  # 0 = once per epoch
    checkpoint_dir: str = ""  # "" = no checkpoints
    checkpoint_every_epochs: int = 0  # 0 = only the last epoch (when checkpoint_dir is set)
    checkpoints_to_keep: int = 2
    # JAX's persistent compilation cache ("" = off; the search's "auto" = <workdir>/xla_cache)
    compilation_cache_dir: str = ""
    host_threads: int = 0  # host pipeline threads for streaming data (0 = auto)
    # XLA options of the evaluation program only, "name=value,...": it runs a few batches per
    # epoch, so on a GPU "xla_gpu_autotune_level=0" may cost less than autotuning it (measure
    # with benchmarks/search_throughput.py --eval_compiler_options).
    eval_compiler_options: str = ""
    augment: AugmentSettings = AugmentSettings()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | TrainSettings, where: str = "config"
                    ) -> TrainSettings:
        """The settings of a training config (a ConfigDict or mapping with these fields; its
        `data` and `skeleton` sections, if any, are not training settings and are skipped),
        checked: a wrong field, type or value raises `ConfigError` naming `where`.field."""
        if isinstance(config, TrainSettings):
            return config
        augment = settings_lib.from_config(AugmentSettings, config.get("augment"),
                                           f"{where}.augment")
        settings = settings_lib.from_config(cls, config, where, skip=("data", "skeleton"),
                                            augment=augment)
        settings.check(where)
        return settings

    def check(self, where: str = "config") -> None:
        """Raises ConfigError for settings no candidate could train with."""
        choices = dict(optimizer=OPTIMIZERS, schedule=SCHEDULES, dtype=tuple(DTYPES),
                       depthwise_impl=DEPTHWISE_IMPLS)
        for field, allowed in choices.items():
            settings_lib.check_choice(getattr(self, field), allowed, f"{where}.{field}")
        for field in ("epochs", "batch_size", "eval_batch_size", "eval_every_epochs"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{where}.{field} must be >= 1, got {getattr(self, field)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"{where}.learning_rate must be > 0, got {self.learning_rate}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}.milestones must be increasing, got {self.milestones}")
        compiler_options(self.eval_compiler_options, f"{where}.eval_compiler_options")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 1), got "
                              f"{self.label_smoothing}")


def check_config(config: Mapping[str, Any] | TrainSettings, where: str = "config") -> None:
    """Raises ConfigError for a training config no candidate could train with."""
    TrainSettings.from_config(config, where)


SKELETON_KINDS = ("cifar", "imagenet")


@dataclasses.dataclass(frozen=True)
class SkeletonSettings:
    """config.skeleton: the fixed network around the searched cells (`skeleton_from_config`
    sizes it to the dataset's images and classes)."""

    kind: str = "cifar"  # "cifar" (cifar_skeleton) or "imagenet" (imagenet_skeleton)
    width: int = 64
    width_schedule: str = "uniform"  # "uniform", "doubling" or multipliers "1,1,2,2,4"
    removed_op: str = "identity"
    conv_bias: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @classmethod
    def from_config(cls, config: Any, where: str = "config.skeleton") -> SkeletonSettings:
        if isinstance(config, SkeletonSettings):
            return config
        settings = settings_lib.from_config(cls, config, where)
        settings.check(where)
        return settings

    @property
    def schedule(self) -> str | tuple[int, ...]:
        if self.width_schedule in ("uniform", "doubling"):
            return self.width_schedule
        return tuple(int(m) for m in self.width_schedule.split(","))

    def check(self, where: str = "config.skeleton") -> None:
        settings_lib.check_choice(self.kind, SKELETON_KINDS, f"{where}.kind")
        settings_lib.check_int(self.width, f"{where}.width", 1)
        settings_lib.check_choice(self.removed_op, REMOVED_OP_STYLES, f"{where}.removed_op")
        try:
            block_widths(self.width, self.schedule)
        except ValueError as e:
            raise ConfigError(f"{where}.width_schedule must be 'uniform', 'doubling' or one "
                              f"positive integer per block like '1,1,2,2,4', got "
                              f"{self.width_schedule!r} ({e})") from None
        if not 0 <= self.bn_momentum < 1:
            raise ConfigError(f"{where}.bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if not self.bn_epsilon > 0:
            raise ConfigError(f"{where}.bn_epsilon must be > 0, got {self.bn_epsilon}")


def default_config() -> ml_collections.ConfigDict:
    """`TrainSettings()` as a ConfigDict, with the data (`data.DataSettings`) and the skeleton
    (`SkeletonSettings`): width 64; selection on a 5,000-image validation split held out of the
    training set (the authors chose on the test set)."""
    c = settings_lib.to_config(TrainSettings())
    c.data = data_lib.default_data_config()
    c.skeleton = settings_lib.to_config(SkeletonSettings())
    return c


def compiler_options(text: str, field: str = "compiler_options") -> dict[str, Any]:
    """"name=value,..." -> XLA compile options (ints, floats and true/false parsed); XLA itself
    rejects an unknown name when the program compiles."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{field}: {item!r} is not name=value")
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


def skeleton_from_config(config: ml_collections.ConfigDict | SkeletonSettings,
                         dataset: data_lib.Dataset) -> Skeleton:
    """The skeleton of `config.skeleton` (or of `SkeletonSettings`), sized to the dataset's
    images and classes."""
    if not isinstance(config, SkeletonSettings):
        config = SkeletonSettings.from_config(config.get("skeleton"))
    size, _, channels = dataset.image_shape
    common = dict(removed_op=config.removed_op, conv_bias=config.conv_bias,
                  bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon)
    try:
        if config.kind == "cifar":
            return cifar_skeleton(config.width, config.schedule, num_classes=dataset.num_classes,
                                  **common).replace(image_size=size, in_channels=channels)
        return imagenet_skeleton(config.width, size, dataset.num_classes, config.schedule,
                                 **common).replace(in_channels=channels)
    except ValueError as e:  # e.g. images too small for the skeleton's strides and head
        raise ConfigError(f"config.skeleton does not fit {dataset.describe()}: {e}") from None


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


_CACHE_LOCK = threading.Lock()


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
    with _CACHE_LOCK:  # check, set and reset as one step: compile threads call this too
        if jax.config.jax_compilation_cache_dir == path:
            return
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        # Candidates compile in 1-50 s and are all worth keeping (JAX's default: 1 s).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        try:  # JAX reads the directory once per process; make a changed directory take effect
            from jax._src import compilation_cache
            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            logging.warning("could not reset JAX's compilation cache: %s may not be used", path)

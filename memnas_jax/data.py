"""Datasets and input pipelines (docs/method.md §8, §10).

Two kinds of splits:

* `ArraySplit`: a whole split as uint8 NHWC + int32 arrays (CIFAR-10/100, synthetic data). Training
  copies it to the accelerator once; shuffling, random crop, flip, Cutout and normalisation then run
  as jitted JAX code from an epoch key (`epoch_permutation`, `augment_batch`), with no per-step
  host work.
* `StreamingSplit`: a random-access record source too large for the device (ImageNet through
  `tfds.data_source`). `host_batches` (`memnas_jax.pipeline`) decodes, crops and batches on the
  host with a thread pool; the device then applies the same flip / normalisation code
  (`memnas_jax.augment`) to each batch. Both are re-exported here.

CIFAR comes from `.npz` copies (arrays `image` uint8 NHWC and `label`: `config.npz_dir`, or
`<$MEMNAS_DATA_DIR or ~/.cache/memnas_jax/data>/<name>/{train,test}.npz`), from a prepared TFDS
dataset, or else is downloaded once into that cache (`memnas_jax.download`, `config.download`).
The validation split used for search-time selection is held out of the training set, stratified
and deterministic in `validation_seed`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from memnas_jax import download as download_lib
from memnas_jax import settings as settings_lib
from memnas_jax.augment import (  # re-exported
    augment_batch,
    crop,
    cutout,
    epoch_permutation,
    mirror,
    normalize,
)
from memnas_jax.errors import UserError
from memnas_jax.pipeline import (  # re-exported
    StreamingSplit,
    center_crop,
    host_batches,
    preprocess_record,
    random_resized_crop,
    resize_image,
)

DATA_DIR_ENV = download_lib.DATA_DIR_ENV

# Per-channel statistics on the [0, 1] scale. CIFAR-10: the authors' Normalize
# (mean [125.3, 123.0, 113.9] / 255, std [63.0, 62.1, 66.7] / 255, docs/method.md §8).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_NAMES = {"cifar10": 10, "cifar100": 100}
IMAGENET_NAMES = {"imagenet2012": 224, "imagenet_resized/32x32": 32, "imagenet_resized/64x64": 64}
DATASET_NAMES = (*CIFAR_NAMES, *IMAGENET_NAMES, "synthetic")
SOURCES = ("auto", "npz", "tfds")
SUBSET_MODES = ("stratified", "first")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No local copy of a dataset; the message says every way to provide one."""


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    """config.data.synthetic: random but learnable data (tests, benchmarks)."""

    num_train: int = 512
    num_validation: int = 128
    num_test: int = 128
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    seed: int = 0

    def check(self, where: str) -> None:
        for name, minimum in (("num_train", 1), ("num_validation", 0), ("num_test", 0),
                              ("image_size", 4), ("channels", 1), ("num_classes", 2),
                              ("seed", 0)):
            settings_lib.check_int(getattr(self, name), f"{where}.{name}", minimum)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """config.data: which dataset, from where, and how it is split (`load_dataset`)."""

    name: str = "cifar10"  # one of DATASET_NAMES
    source: str = "auto"  # "auto": npz when a copy is found, else TFDS; or force "npz" / "tfds"
    # folder of train.npz and test.npz ("" = <$MEMNAS_DATA_DIR or ~/.cache/memnas_jax/data>/<name>)
    npz_dir: str = ""
    tfds_data_dir: str = ""  # "" = the TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    # CIFAR-10/100 with no local copy: download the official archive once (memnas_jax.download)
    download: bool = True
    validation_size: int = 5000  # held out of the training set for selection; 0 = none
    validation_seed: int = 0
    train_subset: int = 0  # 0 = whole split; else this many examples (smoke runs)
    validation_subset: int = 0
    test_subset: int = 0
    subset_mode: str = "stratified"  # "stratified" (equal per class) or "first" (as stored)
    synthetic: SyntheticSettings = SyntheticSettings()

    @classmethod
    def from_config(cls, config: Any, where: str = "config.data") -> "DataSettings":
        """The checked settings of a `config.data` section (a DataSettings passes through)."""
        if isinstance(config, DataSettings):
            return config
        synthetic = settings_lib.from_config(
            SyntheticSettings, (config or {}).get("synthetic"), f"{where}.synthetic")
        settings = settings_lib.from_config(cls, config, where, synthetic=synthetic)
        settings.check(where)
        return settings

    def check(self, where: str = "config.data") -> None:
        settings_lib.check_choice(self.name, DATASET_NAMES, f"{where}.name")
        settings_lib.check_choice(self.source, SOURCES, f"{where}.source")
        settings_lib.check_choice(self.subset_mode, SUBSET_MODES, f"{where}.subset_mode")
        for name in ("validation_size", "validation_seed", "train_subset", "validation_subset",
                     "test_subset"):
            settings_lib.check_int(getattr(self, name), f"{where}.{name}", 0)
        self.synthetic.check(f"{where}.synthetic")


class DataError(UserError, ValueError):
    """The data does not fit the config (image size, channels, classes, too few images)."""


def default_data_config() -> ml_collections.ConfigDict:
    """`DataSettings()` as a ConfigDict."""
    return settings_lib.to_config(DataSettings())


# ---------------------------------------------------------------------------------------------
# Splits and datasets


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """A split held in memory: `images` uint8 (N, H, W, C), `labels` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[indices], self.labels[indices])


Split = ArraySplit | StreamingSplit


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: Split
    validation: Split | None
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def on_device(self) -> bool:
        """True when the splits are arrays to keep on the accelerator (CIFAR-size data)."""
        return isinstance(self.train, ArraySplit)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(s)}" for k, s in (("train", self.train),
                          ("validation", self.validation), ("test", self.test)) if s is not None)
        return f"{self.name} ({self.num_classes} classes, {self.image_shape}): {sizes}"


def normalized(images: np.ndarray, dataset: Dataset) -> np.ndarray:
    """uint8 NHWC images as the networks take them: (x / 255 - mean) / std, float32 (numpy:
    `augment.normalize` is the same on the device)."""
    mean = np.asarray(dataset.mean, np.float32)
    std = np.asarray(dataset.std, np.float32)
    return ((np.asarray(images).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Deterministic splitting


def stratified_indices(labels: np.ndarray, count: int, seed: int | None = None) -> np.ndarray:
    """`count` indices spread equally over the classes (the first classes get the remainder):
    within each class the first ones in stored order (seed None) or a seeded random choice.
    Sorted, so the split keeps the stored order."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot take {count} of {len(labels)} examples")
    rng = None if seed is None else np.random.default_rng(seed)
    per_class = [count // len(classes) + (i < count % len(classes)) for i in range(len(classes))]
    chosen = []
    for cls, k in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        if k > len(members):
            raise ValueError(f"class {cls} has {len(members)} examples, {k} requested")
        chosen.append(members[:k] if rng is None else rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def hold_out_validation(split: ArraySplit, size: int, seed: int
                        ) -> tuple[ArraySplit, ArraySplit | None]:
    """(train minus validation, validation): `size` examples, stratified, chosen by `seed`."""
    if size <= 0:
        return split, None
    if size >= len(split):
        raise ValueError(f"validation size {size} leaves no training data out of {len(split)}")
    val = stratified_indices(split.labels, size, seed)
    keep = np.ones(len(split), bool)
    keep[val] = False
    return split.take(np.flatnonzero(keep)), split.take(val)


def subset(split: Split | None, count: int, mode: str = "stratified") -> Split | None:
    """The first `count` examples, or `count` spread equally over the classes (the CIFAR-10
    test .npz is grouped by class, so "first" would be one class only)."""
    if split is None or count <= 0 or count >= len(split):
        return split
    if mode not in SUBSET_MODES:
        raise ValueError(f"subset_mode {mode!r} is not one of {SUBSET_MODES}")
    if isinstance(split, StreamingSplit):
        if mode != "first":
            raise ValueError("a streaming split supports subset_mode 'first' only")
        return dataclasses.replace(split, source=_Prefix(split.source, count))
    if mode == "first":
        return split.take(np.arange(count))
    return split.take(stratified_indices(split.labels, count))


@dataclasses.dataclass(frozen=True)
class _Prefix:
    source: Any
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.source[i]


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(config: ml_collections.ConfigDict | DataSettings) -> Dataset:
    """The dataset named by `config` (a `config.data` section or `DataSettings`), split and
    subset. `ConfigError` for a bad setting, `DataError` for data that does not fit it."""
    config = DataSettings.from_config(config)
    name = config.name
    if name == "synthetic":
        s = config.synthetic
        dataset = synthetic_dataset(s.num_train, s.num_validation, s.num_test,
                                    (s.image_size, s.image_size, s.channels), s.num_classes, s.seed)
        validation_from_train = False
    elif name in CIFAR_NAMES:
        dataset = _load_cifar(name, config)
        validation_from_train = True
    else:
        dataset = _load_imagenet(name, config)
        validation_from_train = False
    if validation_from_train:
        if config.validation_size >= len(dataset.train):
            raise DataError(f"config.data.validation_size = {config.validation_size} leaves no "
                            f"training images: {name} has {len(dataset.train)}")
        train, validation = hold_out_validation(dataset.train, config.validation_size,
                                                config.validation_seed)
        dataset = dataclasses.replace(dataset, train=train, validation=validation)
    for split, field in (("train", "train_subset"), ("validation", "validation_subset"),
                         ("test", "test_subset")):
        available = getattr(dataset, split)
        count = getattr(config, field)
        if count and (available is None or count > len(available)):
            have = "none" if available is None else len(available)
            raise DataError(f"config.data.{field} = {count}, but the {name} {split} split has "
                            f"{have} images{_after_hold_out(config, split)}: ask for at most "
                            f"that many (0 = the whole split)")
    mode = config.subset_mode
    return dataclasses.replace(
        dataset, train=subset(dataset.train, config.train_subset, mode),
        validation=subset(dataset.validation, config.validation_subset, mode),
        test=subset(dataset.test, config.test_subset, mode))


def _after_hold_out(config: DataSettings, split: str) -> str:
    if config.name in CIFAR_NAMES and config.validation_size and split in ("train",
                                                                          "validation"):
        return f" (after config.data.validation_size = {config.validation_size} held out)"
    return ""


def _npz_dir(name: str, config: DataSettings) -> pathlib.Path:
    """config.npz_dir, else <$MEMNAS_DATA_DIR or the user cache folder>/<name>."""
    if config.npz_dir:
        return pathlib.Path(config.npz_dir)
    return download_lib.cache_root() / name


def _not_found(name: str, config: DataSettings, details: Sequence[str]
               ) -> DatasetNotFoundError:
    tfds_dir = config.tfds_data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
    return DatasetNotFoundError(
        f"dataset {name!r} not found ({'; '.join(details)}). Provide it one of two ways "
        "(or rerun where the download works):\n"
        f"  1. .npz copies (arrays 'image' uint8 NHWC and 'label'): set {DATA_DIR_ENV} to a folder "
        f"holding {name}/train.npz and {name}/test.npz, or set config.data.npz_dir to the folder "
        f"holding train.npz and test.npz;\n"
        f"  2. a prepared TFDS dataset in {tfds_dir} (config.data.tfds_data_dir): on a machine "
        f"with internet run `tfds build {name} --file_format=array_record` (preparing image "
        f"datasets needs tensorflow-cpu once) and copy the data_dir here.")


def _load_cifar(name: str, config: DataSettings) -> Dataset:
    npz_dir = _npz_dir(name, config)
    details: list[str] = []
    splits = None
    if config.source in ("auto", "npz"):
        if (npz_dir / "train.npz").exists():
            splits = _npz_splits(npz_dir)
        else:
            details.append(f"no {npz_dir / 'train.npz'}")
    if config.source == "tfds" or (config.source == "auto" and splits is None):
        try:
            splits = load_tfds_arrays(name, ("train", "test"), config.tfds_data_dir)
        except DatasetNotFoundError as e:
            details.append(str(e))
    if splits is None and config.source != "tfds" and config.download:
        try:
            splits = _npz_splits(download_lib.ensure_cifar(name, npz_dir))
        except download_lib.DownloadError as e:
            details.append(f"download failed: {e}")
    if splits is None:
        raise _not_found(name, config, details)
    train, test = splits
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    for split_name, split in (("train", train), ("test", test)):
        if split is not None:
            _check_split(split, CIFAR_NAMES[name], name, split_name, npz_dir)
    return Dataset(name, CIFAR_NAMES[name], train.images.shape[1:], train, None, test, mean, std)


def _npz_splits(folder: pathlib.Path) -> tuple[ArraySplit, ArraySplit | None]:
    test = load_npz(folder / "test.npz") if (folder / "test.npz").exists() else None
    return load_npz(folder / "train.npz"), test


CIFAR_IMAGE_SHAPE = (32, 32, 3)


def _check_split(split: ArraySplit, num_classes: int, name: str, split_name: str,
                 where: pathlib.Path) -> None:
    """The CIFAR layout: 32x32 RGB images, labels 0..num_classes-1, every class present."""
    shape = tuple(split.images.shape[1:])
    fix = (f"point config.data.npz_dir (or ${DATA_DIR_ENV}) at {name}'s own arrays, or set "
           "config.data.name to the dataset these are")
    if shape != CIFAR_IMAGE_SHAPE:
        raise DataError(f"{name} {split_name} images in {where} are "
                        f"{'x'.join(map(str, shape))}, not {name}'s 32x32x3: {fix}")
    if not len(split):
        raise DataError(f"the {name} {split_name} split in {where} is empty: {fix}")
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{name} {split_name} labels in {where} run {low}..{high}, outside "
                        f"0..{num_classes - 1}: {fix}")


def load_npz(path: str | os.PathLike) -> ArraySplit:
    """An `ArraySplit` from an .npz with arrays `image` (uint8 NHWC) and `label`."""
    with np.load(path) as data:
        missing = {"image", "label"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
        return ArraySplit(data["image"], data["label"])


def tfds_builder(name: str, data_dir: str = ""):
    """The TFDS builder of a dataset prepared locally; never downloads. Raises
    `DatasetNotFoundError` (in about a second) when it is not prepared."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetNotFoundError(f"tensorflow_datasets is not importable: {e}") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types
        raise DatasetNotFoundError(f"TFDS builder {name!r}: {type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0]}") from None
    if not builder.is_prepared():
        raise DatasetNotFoundError(f"TFDS has no prepared {name!r} in {builder.data_dir}")
    return builder


def load_tfds_arrays(name: str, splits: Sequence[str] = ("train", "test"), data_dir: str = ""
                     ) -> tuple[ArraySplit | None, ...]:
    """Whole splits of a prepared TFDS image dataset as arrays (None for a missing split).
    array_record data is read with `data_source` (no TensorFlow); tfrecord needs TensorFlow."""
    builder = tfds_builder(name, data_dir)
    out = []
    for split in splits:
        if split not in builder.info.splits:
            out.append(None)
            continue
        if _is_array_record(builder):
            source = builder.as_data_source(split=split)
            records = [source[i] for i in range(len(source))]
            images = np.stack([r["image"] for r in records])
            labels = np.asarray([r["label"] for r in records])
        else:
            import tensorflow_datasets as tfds
            try:
                arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            except ImportError as e:
                raise DatasetNotFoundError(
                    f"TFDS {name!r} is prepared as tfrecord files, which need TensorFlow to "
                    f"read ({e}); install tensorflow-cpu or rebuild it with "
                    f"--file_format=array_record") from None
            images, labels = arrays["image"], arrays["label"]
        out.append(ArraySplit(images, labels))
    return tuple(out)


def _is_array_record(builder) -> bool:
    return "array_record" in str(getattr(builder.info, "file_format", "")).lower()


def tfds_streaming_split(name: str, split: str, data_dir: str = "", image_size: int = 224,
                         resize: str = "imagenet") -> StreamingSplit:
    """A random-access split of a prepared array_record TFDS dataset for the host pipeline."""
    builder = tfds_builder(name, data_dir)
    if not _is_array_record(builder):
        raise DatasetNotFoundError(f"TFDS {name!r} in {builder.data_dir} is not in array_record "
                                   "format, which the random-access host pipeline needs; "
                                   "rebuild it with --file_format=array_record")
    return StreamingSplit(builder.as_data_source(split=split), image_size, resize)


IMAGENET_MANUAL = (
    "ImageNet cannot be downloaded automatically: register at "
    "https://image-net.org/download-images, put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar in <manual_dir>, then run `tfds build imagenet2012 "
    "--manual_dir=<manual_dir> --file_format=array_record` once (needs tensorflow-cpu) and set "
    "config.data.tfds_data_dir to its data_dir.")


def _load_imagenet(name: str, config: DataSettings) -> Dataset:
    size = IMAGENET_NAMES[name]
    resize = "imagenet" if name == "imagenet2012" else "none"
    try:
        train, validation = (tfds_streaming_split(name, s, config.tfds_data_dir, size, resize)
                             for s in ("train", "validation"))
        num_classes = tfds_builder(name, config.tfds_data_dir).info.features["label"].num_classes
    except DatasetNotFoundError as e:
        how = (IMAGENET_MANUAL if name == "imagenet2012" else
               f"Run `tfds build {name} --file_format=array_record` where there is internet and "
               "set config.data.tfds_data_dir to its data_dir.")
        raise DatasetNotFoundError(f"dataset {name!r} not found ({e}). {how}") from None
    return Dataset(name, num_classes, (size, size, 3), train, validation, None, IMAGENET_MEAN,
                   IMAGENET_STD)


def synthetic_dataset(num_train: int = 512, num_validation: int = 128, num_test: int = 128,
                      image_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
                      seed: int = 0) -> Dataset:
    """Random but learnable data of any shape: each class is a fixed random prototype image plus
    per-example noise. The prototypes are 4x4 patterns blown up to the image size, so random
    crops and flips keep them recognisable. Means/stds are the midpoint 0.5 / 0.25."""
    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    coarse = rng.integers(0, 256, (num_classes, 4, 4, c))
    prototypes = coarse[:, (np.arange(h) * 4 // h)][:, :, (np.arange(w) * 4 // w)]

    def make(n):
        if n <= 0:
            return None
        labels = np.arange(n) % num_classes
        labels = labels[rng.permutation(n)]
        noise = rng.normal(0, 48, (n, *image_shape))
        return ArraySplit(np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8), labels)

    return Dataset("synthetic", num_classes, (h, w, c), make(num_train), make(num_validation),
                   make(num_test), (0.5,) * c, (0.25,) * c)


__all__ = [
    "ArraySplit", "CIFAR10_MEAN", "CIFAR10_STD", "DATASET_NAMES", "DATA_DIR_ENV", "DataError",
    "DataSettings", "Dataset", "DatasetNotFoundError", "SyntheticSettings", "IMAGENET_MANUAL",
    "StreamingSplit", "augment_batch", "center_crop",
    "crop", "cutout", "default_data_config", "epoch_permutation", "hold_out_validation",
    "normalized",
    "host_batches", "load_dataset", "load_npz", "load_tfds_arrays", "mirror", "normalize",
    "preprocess_record", "random_resized_crop", "resize_image", "stratified_indices",
    "subset", "synthetic_dataset", "tfds_builder", "tfds_streaming_split",
]

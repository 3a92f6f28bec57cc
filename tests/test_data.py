"""Datasets, splits, the device-side augmentation and the host pipeline (memnas_jax.data)."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memnas_jax import data as data_lib
from memnas_jax.errors import ConfigError


def _config(**overrides):
    config = data_lib.default_data_config()
    config.update(overrides)
    return config


# ---------------------------------------------------------------------------------------------
# Device augmentation


def test_crop_takes_the_window_at_the_offset():
    images = np.random.default_rng(0).integers(1, 256, (3, 8, 8, 3)).astype(np.uint8)
    offsets = np.array([[0, 0], [4, 1], [2, 3]], np.int32)
    out = np.asarray(jax.jit(data_lib.crop, static_argnums=2)(images, offsets, 2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for img, pad, (dy, dx) in zip(out, padded, offsets):
        np.testing.assert_array_equal(img, pad[dy:dy + 8, dx:dx + 8])
    assert np.all(out[0, :2] == 0) and np.all(out[1, -2:] == 0)  # zero padding came in
    np.testing.assert_array_equal(data_lib.crop(images, offsets, 0), images)


def test_mirror_and_cutout_explicit():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    out = np.asarray(data_lib.mirror(images, np.array([True, False])))
    np.testing.assert_array_equal(out[0], images[0, :, ::-1])
    np.testing.assert_array_equal(out[1], images[1])
    holes = np.asarray(data_lib.cutout(jnp.ones((2, 6, 6, 2)), np.array([[3, 3], [0, 5]]), 2))
    np.testing.assert_array_equal(holes[0, 2:4, 2:4], 0)
    assert holes[0].sum() == 2 * (36 - 4)
    np.testing.assert_array_equal(holes[1, 0, 4:], 0)  # clipped at the corner: 1x2 left
    assert holes[1].sum() == 2 * (36 - 2)


def _augment(key, images, **kw):
    """augment_batch with an identity normalisation (mean 0, std 1/255 keeps the pixel
    values), so the output compares with the uint8 input."""
    settings = dict(crop_padding=0, flip=False, cutout_length=0)
    settings.update(kw)
    return np.asarray(jax.jit(lambda k, x: data_lib.augment_batch(
        k, x, mean=(0.0,) * 3, std=(1 / 255,) * 3, **settings))(key, images))


def test_augment_crop_is_a_shift_of_the_padded_image():
    images = np.random.default_rng(0).integers(1, 256, (32, 8, 8, 3)).astype(np.uint8)
    out = _augment(jax.random.PRNGKey(1), images, crop_padding=2)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))).astype(np.float32)
    offsets = []
    for img, pad in zip(out, padded):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.allclose(pad[dy:dy + 8, dx:dx + 8], img, atol=1e-3)]
        assert matches, "crop is not a window of the zero-padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # offsets vary over the 25 possible


def test_augment_flip_mirrors_about_half():
    images = np.random.default_rng(0).integers(0, 256, (200, 4, 4, 3)).astype(np.uint8)
    out = _augment(jax.random.PRNGKey(0), images, flip=True)
    same = np.all(np.isclose(out, images, atol=1e-3), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(out, images[:, :, ::-1], atol=1e-3), axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 70 < mirrored.sum() < 130


def test_augment_cutout_zeroes_one_clipped_square():
    out = _augment(jax.random.PRNGKey(3), np.full((64, 16, 16, 3), 9, np.uint8),
                   cutout_length=6)
    full = 0
    for img in out:
        zero = img[..., 0] == 0
        assert np.all((img == 0) == zero[..., None])  # every channel alike
        ys, xs = np.nonzero(zero)
        assert len(ys) > 0
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert zero.sum() == h * w and h <= 6 and w <= 6  # a filled rectangle
        full += (h, w) == (6, 6)
    assert full > 10  # centres away from the border give the whole 6x6 square


def test_normalize_per_channel():
    images = np.array([[[[0, 255, 51]]]], np.uint8)
    out = data_lib.normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    assert out.dtype == jnp.float32


def test_augment_batch_shapes_and_determinism():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    aug = jax.jit(lambda k, x: data_lib.augment_batch(
        k, x, mean=data_lib.CIFAR10_MEAN, std=data_lib.CIFAR10_STD, crop_padding=4, flip=True,
        cutout_length=16))
    a, b = aug(jax.random.PRNGKey(0), images), aug(jax.random.PRNGKey(0), images)
    c = aug(jax.random.PRNGKey(1), images)
    chex.assert_shape(a, (8, 32, 32, 3))
    chex.assert_type(a, jnp.float32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Off switches: no crop, no flip, no cutout = plain normalisation.
    plain = data_lib.augment_batch(jax.random.PRNGKey(0), images, mean=(0.5,) * 3,
                                   std=(0.25,) * 3, crop_padding=0, flip=False, cutout_length=0)
    np.testing.assert_allclose(plain, (images / 255.0 - 0.5) / 0.25, atol=1e-5)
    assert np.all(np.asarray(data_lib.augment_batch(
        jax.random.PRNGKey(0), images, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=0,
        flip=False, cutout_length=8) == 0).any(axis=(1, 2, 3)))  # cutout holes


class AugmentVariantsTest(chex.TestCase):
    """`augment_batch` gives the same batch traced under jit or run op by op."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_augment_batch_is_the_same_jitted_or_not(self):
        images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)

        def augment(key, x):
            return data_lib.augment_batch(key, x, mean=(0.5,) * 3, std=(0.25,) * 3,
                                          crop_padding=2, flip=True, cutout_length=4)
        out = self.variant(augment)(jax.random.PRNGKey(3), images)
        chex.assert_shape(out, images.shape)
        np.testing.assert_allclose(out, jax.jit(augment)(jax.random.PRNGKey(3), images),
                                   atol=1e-6)


def test_epoch_permutation_is_a_permutation_per_key():
    p = np.asarray(data_lib.epoch_permutation(jax.random.PRNGKey(0), 100))
    np.testing.assert_array_equal(np.sort(p), np.arange(100))
    np.testing.assert_array_equal(p, data_lib.epoch_permutation(jax.random.PRNGKey(0), 100))
    assert not np.array_equal(p, data_lib.epoch_permutation(jax.random.PRNGKey(1), 100))


# ---------------------------------------------------------------------------------------------
# Splits


def test_stratified_indices_counts():
    labels = np.repeat(np.arange(4), 10)
    idx = data_lib.stratified_indices(labels, 10)
    np.testing.assert_array_equal(np.bincount(labels[idx]), [3, 3, 2, 2])
    np.testing.assert_array_equal(idx, [0, 1, 2, 10, 11, 12, 20, 21, 30, 31])  # first per class
    seeded = data_lib.stratified_indices(labels, 10, seed=5)
    np.testing.assert_array_equal(np.bincount(labels[seeded]), [3, 3, 2, 2])
    np.testing.assert_array_equal(seeded, data_lib.stratified_indices(labels, 10, seed=5))
    with pytest.raises(ValueError, match="cannot take 41"):
        data_lib.stratified_indices(labels, 41)


def test_validation_hold_out_is_deterministic_disjoint_and_stratified():
    ds = data_lib.synthetic_dataset(num_train=200, num_validation=0, num_test=0)
    train, val = data_lib.hold_out_validation(ds.train, 50, seed=3)
    train2, val2 = data_lib.hold_out_validation(ds.train, 50, seed=3)
    _, val_other = data_lib.hold_out_validation(ds.train, 50, seed=4)
    assert (len(train), len(val)) == (150, 50)
    np.testing.assert_array_equal(val.images, val2.images)
    np.testing.assert_array_equal(train.labels, train2.labels)
    assert not np.array_equal(val.images, val_other.images)
    np.testing.assert_array_equal(np.bincount(val.labels), [5] * 10)
    train_rows = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in train_rows for im in val.images)


def test_subset_modes():
    split = data_lib.ArraySplit(np.zeros((30, 2, 2, 3), np.uint8), np.repeat(np.arange(3), 10))
    np.testing.assert_array_equal(data_lib.subset(split, 6, "first").labels, [0] * 6)
    np.testing.assert_array_equal(data_lib.subset(split, 6).labels, [0, 0, 1, 1, 2, 2])
    assert data_lib.subset(split, 0) is split
    with pytest.raises(ValueError, match="subset_mode"):
        data_lib.subset(split, 6, "random")


def test_array_split_checks_dtype():
    with pytest.raises(ValueError, match="uint8"):
        data_lib.ArraySplit(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        data_lib.ArraySplit(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))


def test_synthetic_dataset_any_shape():
    ds = data_lib.load_dataset(_config(name="synthetic", synthetic=dict(
        num_train=40, num_validation=20, num_test=10, image_size=12, channels=1,
        num_classes=5, seed=0)))
    assert ds.image_shape == (12, 12, 1) and ds.num_classes == 5
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (40, 20, 10)
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [8] * 5)
    assert ds.on_device


# ---------------------------------------------------------------------------------------------
# Loading


def _write_npz(folder, n_train=40, n_test=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{name}.npz", image=rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                 label=np.arange(n) % 10)


def test_npz_from_config_path_and_env(tmp_path, monkeypatch):
    _write_npz(tmp_path / "mine")
    ds = data_lib.load_dataset(_config(npz_dir=str(tmp_path / "mine"), validation_size=10))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (30, 10, 20)
    assert ds.mean == data_lib.CIFAR10_MEAN and ds.num_classes == 10
    _write_npz(tmp_path / "env" / "cifar10")
    monkeypatch.setenv(data_lib.DATA_DIR_ENV, str(tmp_path / "env"))
    ds = data_lib.load_dataset(_config(validation_size=0, train_subset=20, test_subset=10))
    assert ds.validation is None and (len(ds.train), len(ds.test)) == (20, 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1] * 10)


def test_missing_dataset_names_both_ways_and_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv(data_lib.DATA_DIR_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(data_lib.DatasetNotFoundError) as err:
        data_lib.load_dataset(_config(tfds_data_dir=str(tmp_path / "tfds")))
    assert time.perf_counter() - start < 30  # no download retries
    message = str(err.value)
    assert "MEMNAS_DATA_DIR" in message and "config.data.npz_dir" in message
    assert "tfds build cifar10" in message and str(tmp_path / "tfds") in message
    monkeypatch.setenv(data_lib.DATA_DIR_ENV, str(tmp_path / "nothing"))
    with pytest.raises(data_lib.DatasetNotFoundError, match="nothing/cifar100/train.npz"):
        data_lib.load_dataset(_config(name="cifar100", source="npz"))


def test_imagenet_missing_gives_manual_download_steps(tmp_path):
    with pytest.raises(data_lib.DatasetNotFoundError, match="ILSVRC2012_img_train.tar"):
        data_lib.load_dataset(_config(name="imagenet2012", tfds_data_dir=str(tmp_path)))
    with pytest.raises(data_lib.DatasetNotFoundError, match="tfds build imagenet_resized/32x32"):
        data_lib.load_dataset(_config(name="imagenet_resized/32x32",
                                      tfds_data_dir=str(tmp_path)))


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="config.data.name = 'mnist' is not one of"):
        data_lib.load_dataset(_config(name="mnist"))


@pytest.mark.parametrize("shape, labels, match", [
    ((28, 28, 1), 10, "are 28x28x1, not cifar10's 32x32x3"),
    ((32, 32, 3), 12, "labels in .* run 0..11, outside 0..9"),
])
def test_npz_data_that_does_not_fit_cifar10_is_refused(tmp_path, shape, labels, match):
    for split, n in (("train", 600), ("test", 100)):
        np.savez(tmp_path / f"{split}.npz", image=np.zeros((n, *shape), np.uint8),
                 label=np.arange(n) % labels)
    with pytest.raises(data_lib.DataError, match=match):
        data_lib.load_dataset(_config(name="cifar10", source="npz", npz_dir=str(tmp_path),
                                      validation_size=100))


def test_too_few_images_for_the_subsets_is_refused(tmp_path):
    for split, n in (("train", 600), ("test", 100)):
        np.savez(tmp_path / f"{split}.npz", image=np.zeros((n, 32, 32, 3), np.uint8),
                 label=np.arange(n) % 10)
    config = dict(name="cifar10", source="npz", npz_dir=str(tmp_path))
    with pytest.raises(data_lib.DataError, match="validation_size = 600 leaves no training"):
        data_lib.load_dataset(_config(**config, validation_size=600))
    with pytest.raises(data_lib.DataError, match=r"train_subset = 501, but the cifar10 train "
                       r"split has 500 images \(after config.data.validation_size = 100"):
        data_lib.load_dataset(_config(**config, validation_size=100, train_subset=501))
    with pytest.raises(data_lib.DataError, match="test_subset = 101, .* test split has 100"):
        data_lib.load_dataset(_config(**config, validation_size=100, test_subset=101))
    assert len(data_lib.load_dataset(_config(**config, validation_size=100,
                                             train_subset=500)).train) == 500


def test_real_cifar10_npz(data_dir, monkeypatch):
    if not (data_dir / "cifar10" / "train.npz").exists():
        pytest.skip(f"no CIFAR-10 .npz in {data_dir}/cifar10")
    monkeypatch.setenv(data_lib.DATA_DIR_ENV, str(data_dir))
    ds = data_lib.load_dataset(_config())
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (45000, 5000, 10000)
    assert ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.validation.labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
    # Published CIFAR-10 training statistics (data README), over train + validation.
    sums = sum(s.images.sum(axis=(0, 1, 2), dtype=np.int64) for s in (ds.train, ds.validation))
    np.testing.assert_allclose(sums / (50000 * 32 * 32 * 255),
                               [0.49139968, 0.48215841, 0.44653091], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# TFDS (a tiny array_record dataset prepared offline) and the host pipeline


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    path = tmp_path_factory.mktemp("tfds")

    class MemnasTinyImages(tfds.core.GeneratorBasedBuilder):
        """Constant 10x14 images of value i, label i % 3 (Tensor features need no TensorFlow
        to prepare)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(10, 14, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((10, 14, 3), i, np.uint8), "label": i % 3}

    MemnasTinyImages(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


def test_tfds_streaming_and_host_pipeline(tfds_dir):
    split = data_lib.tfds_streaming_split("memnas_tiny_images", "train", str(tfds_dir),
                                          image_size=8, resize="imagenet")
    assert len(split) == 12
    batches = lambda **kw: list(data_lib.host_batches(split, 5, **kw))
    epoch0 = batches(seed=1, epoch=0, train=True)
    assert [b[0].shape for b in epoch0] == [(5, 8, 8, 3)] * 2  # last partial batch dropped
    again = batches(seed=1, epoch=0, train=True)
    epoch1 = batches(seed=1, epoch=1, train=True)
    np.testing.assert_array_equal(epoch0[0][0], again[0][0])
    assert not np.array_equal(np.concatenate([b[1] for b in epoch0]),
                              np.concatenate([b[1] for b in epoch1]))
    # Each image is constant (value i, label i % 3): crops keep the value.
    for images, labels, _ in epoch0:
        values = images[:, 0, 0, 0]
        assert np.all(images == values[:, None, None, None])
        np.testing.assert_array_equal(values % 3, labels)
    assert all(mask.all() for _, _, mask in epoch0)
    evaluation = batches(seed=0, epoch=0, train=False)
    assert [len(b[1]) for b in evaluation] == [5, 5, 5]  # the last batch padded ...
    assert [int(b[2].sum()) for b in evaluation] == [5, 5, 2]  # ... and masked
    values = np.concatenate([b[0][:, 0, 0, 0] for b in evaluation])
    assert sorted(values[np.concatenate([b[2] for b in evaluation])]) == list(range(12))
    assert not evaluation[-1][0][2:].any() and not evaluation[-1][1][2:].any()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_host_shards_cover_each_global_batch_once(train):
    """Two hosts feeding rows [0, 4) and [4, 8) of each global batch of 8 together give the
    single host's batches: same examples in the same places, same crops, same padding."""
    records = [{"image": np.full((6, 6, 3), i, np.uint8), "label": i % 10} for i in range(19)]
    split = data_lib.StreamingSplit(records, image_size=4, resize="imagenet")
    batches = lambda rows=None: list(data_lib.host_batches(
        split, 8, seed=3, epoch=1, train=train, rows=rows))
    whole = batches()
    hosts = [batches(range(0, 4)), batches(range(4, 8))]
    assert len(whole) == len(hosts[0]) == len(hosts[1]) == (2 if train else 3)
    for b, batch in enumerate(whole):
        for part, joined in zip(batch, zip(*(host[b] for host in hosts))):
            np.testing.assert_array_equal(part, np.concatenate(joined))
    if not train:  # 19 = 8 + 8 + 3: the second host's last batch is padding only
        assert hosts[0][2][2].tolist() == [True, True, True, False]
        assert hosts[1][2][2].tolist() == [False] * 4
    with pytest.raises(ValueError, match="positions in a batch of 8"):
        batches([7, 8])


def test_tfds_arrays_and_missing(tfds_dir):
    train, test, missing = data_lib.load_tfds_arrays("memnas_tiny_images",
                                                     ("train", "test", "validation"),
                                                     str(tfds_dir))
    assert missing is None
    chex.assert_shape(train.images, (12, 10, 14, 3))
    np.testing.assert_array_equal(train.images[:, 0, 0, 0] % 3, train.labels)
    assert sorted(test.images[:, 0, 0, 0]) == list(range(6))
    with pytest.raises(data_lib.DatasetNotFoundError, match="no prepared"):
        data_lib.tfds_builder("cifar10", str(tfds_dir))


def test_center_and_resized_crops():
    image = np.arange(20 * 30 * 3, dtype=np.int64).reshape(20, 30, 3).astype(np.uint8)
    assert data_lib.center_crop(image, 16).shape == (16, 16, 3)
    crop = data_lib.random_resized_crop(image, 12, np.random.default_rng(0))
    assert crop.shape == (12, 12, 3) and crop.dtype == np.uint8
    flat = np.full((7, 9, 3), 77, np.uint8)
    np.testing.assert_array_equal(data_lib.resize_image(flat, 13, 4), np.full((13, 4, 3), 77))

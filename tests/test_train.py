"""Training a candidate (memnas_jax.train): learning, divergence, failure, resume, schedules.

The mechanics tests train a tiny BatchNorm CNN (`train_model`), which compiles in about a second;
the MemNASNetwork itself is trained on synthetic data once and, marked slow, on the real CIFAR-10.
"""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import TinyCNN, cpu_only  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import data as data_lib
from memnas_jax import preemption, train, transfers
from memnas_jax.encoding import uniform_architecture
from memnas_jax.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NET53 = uniform_architecture([(0, 0, "fac_conv_7", "sep_conv_3x3")])

def _config(**overrides):
    config = train.default_config()
    config.update(dict(epochs=3, batch_size=64, eval_batch_size=64, learning_rate=0.05,
                       milestones=(2,), num_devices=1))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def synthetic():
    return data_lib.synthetic_dataset(num_train=512, num_validation=128, num_test=192)


def _max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_tiny_model_learns_synthetic_data(synthetic):
    result = train.train_model(TinyCNN(), _config(), synthetic, jax.random.PRNGKey(0))
    assert result.status == "ok", result.message
    assert result.epochs_done == 3 and result.resumed_from_epoch == 0
    assert result.param_count == 3 * 3 * 3 * 8 + 8 + 2 * 8 + 8 * 8 * 8 * 10 + 10  # 5,370
    assert len(result.loss_curve) == 3 and result.loss_curve[-1] < result.loss_curve[0] / 3
    assert result.best_val_accuracy >= 0.9 and result.test_accuracy >= 0.9
    assert result.final_val_accuracy == result.val_accuracy_curve[-1]
    assert result.val_accuracy_curve[result.best_val_epoch - 1] == result.best_val_accuracy
    assert result.compile_seconds > 0 and result.images_per_second > 0
    assert result.wall_seconds > result.compile_seconds
    assert set(result.variables) == {"params", "batch_stats"}
    json.dumps(result.to_dict())  # JSON-ready
    # Same key, same result; another key, another run.
    again = train.train_model(TinyCNN(), _config(epochs=1), synthetic, jax.random.PRNGKey(0))
    assert again.loss_curve[0] == result.loss_curve[0]


def test_streaming_split_trains_through_the_host_pipeline(synthetic):
    """The ImageNet path: records batched on the host, augmented and normalised on device."""
    records = lambda split: [{"image": im, "label": int(y)}
                             for im, y in zip(split.images, split.labels)]
    streamed = data_lib.Dataset(
        "synthetic-stream", 10, (32, 32, 3), data_lib.StreamingSplit(records(synthetic.train), 32),
        data_lib.StreamingSplit(records(synthetic.validation), 32), None, synthetic.mean,
        synthetic.std)
    assert not streamed.on_device
    result = train.train_model(TinyCNN(), _config(epochs=2, eval_batch_size=48), streamed,
                                   jax.random.PRNGKey(0))
    assert result.status == "ok", result.message
    assert result.epochs_done == 2 and result.best_val_accuracy >= 0.8
    assert result.test_accuracy is None  # no test split given


def test_memnas_network_trains_and_counts_parameters(synthetic):
    from memnas_jax.network import param_count
    config = _config(epochs=1, depthwise_impl="xla")
    config.skeleton.width = 4
    result = train.train_candidate(NET53, config, synthetic, jax.random.PRNGKey(0))
    assert result.status == "ok", result.message
    skeleton = train.skeleton_from_config(config, synthetic)
    assert result.param_count == param_count(NET53, skeleton)
    assert np.isfinite(result.loss_curve[0]) and result.test_accuracy is not None


def test_huge_learning_rate_diverges(synthetic):
    result = train.train_model(TinyCNN(), _config(learning_rate=1e8, nan_check_every_steps=2),
                                   synthetic, jax.random.PRNGKey(0))
    assert result.status == "diverged"
    assert "training loss became" in result.message and "epoch 1" in result.message
    assert result.epochs_done == 0 and result.test_accuracy is None
    assert not np.isfinite(result.loss_curve[-1])


class _Broken(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x.reshape(x.shape[0], -1)) @ np.ones((3, 3))  # shape error


def test_exceptions_become_failed(synthetic):
    result = train.train_model(_Broken(), _config(), synthetic, jax.random.PRNGKey(0))
    assert result.status == "failed" and "TypeError" in result.message
    assert "dot_general" in result.message or "matmul" in result.message
    bad_arch = train.train_candidate([[]], _config(), synthetic, jax.random.PRNGKey(0))
    assert bad_arch.status == "failed" and "EncodingError" in bad_arch.message


def test_programs_compiled_ahead_train_exactly_like_inline_ones(synthetic):
    """compile_candidate (as the search's compile-ahead threads call it) gives the programs
    train_candidate compiles itself: the same losses, accuracies and weights, bit for bit. One
    program evaluates both the validation and the test split."""
    config = _config(epochs=2)
    inline = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(3))
    programs = train.compile_model(TinyCNN(), config, synthetic)
    assert programs.compile_seconds > 0 and programs.flops_per_image > 0
    ahead = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(3),
                              programs=programs)
    assert ahead.status == inline.status == "ok"
    assert ahead.loss_curve == inline.loss_curve
    assert ahead.val_accuracy_curve == inline.val_accuracy_curve
    assert ahead.test_accuracy == inline.test_accuracy
    assert _max_abs_diff(ahead.variables, inline.variables) == 0.0
    assert ahead.compile_seconds == programs.compile_seconds
    assert ahead.compile_wait_seconds < 0.1  # nothing left to compile
    # A future whose compile failed is the candidate's failure, not the caller's exception.
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling"))
    result = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(3), programs=failed)
    assert result.status == "failed" and "RESOURCE_EXHAUSTED" in result.message


def test_the_training_loop_makes_only_its_named_transfers(synthetic, tmp_path):
    """The whole standalone loop (checkpoints, NaN checks, evaluation included) under
    jax.transfer_guard("disallow_explicit"): the training steps move nothing between host and
    device, and every other transfer is one the loop names (memnas_jax.transfers). (On a CPU,
    reads back to the host are free and not guarded; every host-to-device copy is.)"""
    config = _config(epochs=2, batch_size=32, nan_check_every_steps=3,
                     checkpoint_dir=str(tmp_path / "checkpoints"))
    programs = train.compile_candidate(NET53, config, synthetic)
    key = jax.random.PRNGKey(0)
    transfers.SEEN.clear()
    with jax.transfer_guard("disallow_explicit"):
        result = train.train_candidate(NET53, config, synthetic, key, programs=programs)
    assert result.status == "ok", result.message
    assert set(transfers.SEEN) == {
        "initial state", "checkpoint restore", "training data", "epoch order", "epoch metrics",
        "nan check", "epoch counter", "evaluation", "checkpoint save", "final variables"}
    assert transfers.SEEN["epoch order"] == transfers.SEEN["epoch counter"] == 2
    with pytest.raises(ValueError, match="unknown transfer"):
        with transfers.intended("a stray copy"):
            pass


def test_eval_compiler_options_are_parsed_and_passed_to_xla(synthetic):
    assert train.compiler_options("xla_gpu_autotune_level=0, a=1.5,b=true,c=x") == {
        "xla_gpu_autotune_level": 0, "a": 1.5, "b": True, "c": "x"}
    assert train.compiler_options("") == {}
    with pytest.raises(ValueError, match="config.eval_compiler_options: 'oops' is not"):
        train.check_config(_config(eval_compiler_options="oops"))
    # XLA knows the GPU option on every backend; an unknown one fails the candidate, clearly.
    ok = train.compile_model(TinyCNN(), _config(eval_compiler_options="xla_gpu_autotune_level=0"),
                                 synthetic)
    assert ok.eval_step is not None
    bad = train.train_model(TinyCNN(), _config(eval_compiler_options="xla_no_such_option=1"),
                                synthetic, jax.random.PRNGKey(0))
    assert bad.status == "failed" and "No such compile option" in bad.message


def test_a_run_stopped_on_request_resumes_mid_epoch_exactly(synthetic, tmp_path, monkeypatch):
    """preemption: the step after a stop request saves a mid-epoch snapshot (state and running
    metrics) and raises Preempted; the rerun continues from that step, ending bit for bit where
    an uninterrupted run ends, and drops the snapshot."""
    full = train.train_model(TinyCNN(), _config(), synthetic, jax.random.PRNGKey(5))
    config = _config(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_epochs=1)
    calls = {"n": 0}

    def requested():  # 8 steps per epoch: the 12th step is the 4th of epoch 2
        calls["n"] += 1
        return calls["n"] == 12
    monkeypatch.setattr(preemption, "requested", requested)
    with pytest.raises(preemption.Preempted):
        train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(5))
    assert (tmp_path / "ckpt" / train.PREEMPTED_DIR).is_dir()
    monkeypatch.setattr(preemption, "requested", lambda: False)
    resumed = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(5))
    assert "resumed in epoch 2 after step 4 (stopped on request)" in resumed.message
    assert resumed.resumed_from_epoch == 1
    assert resumed.loss_curve == full.loss_curve
    assert resumed.val_accuracy_curve == full.val_accuracy_curve
    assert _max_abs_diff(resumed.variables, full.variables) == 0.0
    assert not (tmp_path / "ckpt" / train.PREEMPTED_DIR).exists()


def test_compilation_cache_auto_is_the_work_directory(tmp_path):
    assert train.compilation_cache_path("auto", tmp_path) == str(tmp_path / "xla_cache")
    assert train.compilation_cache_path("", tmp_path) == ""
    assert train.compilation_cache_path("/cache", tmp_path) == "/cache"
    with pytest.raises(ValueError, match="resolve it with compilation_cache_path"):
        train.configure_compilation_cache("auto")


def test_config_mistakes_raise(synthetic):
    with pytest.raises(ConfigError, match="config.optimizer = 'rmsprop'"):
        train.train_model(TinyCNN(), _config(optimizer="rmsprop"), synthetic,
                          jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="milestones must be increasing"):
        train.check_config(_config(milestones=(5, 2)))
    failed = train.train_model(TinyCNN(), _config(batch_size=4096), synthetic,
                               jax.random.PRNGKey(0))
    assert failed.status == "failed" and "exceeds the 512 training examples" in failed.message


def test_checkpoint_resume_matches_uninterrupted_run(synthetic, tmp_path):
    config = _config(epochs=4, milestones=(3,), checkpoint_dir=str(tmp_path / "ckpt"),
                     checkpoint_every_epochs=1, checkpoints_to_keep=4)
    full = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(0))
    assert full.status == "ok" and sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2", "3", "4"]
    # Killed after epoch 2: only the checkpoints up to 2 exist. The rerun resumes there.
    for epoch in ("3", "4"):
        _rmtree(tmp_path / "ckpt" / epoch)
    resumed = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(0))
    assert resumed.status == "ok" and resumed.resumed_from_epoch == 2
    assert "resumed from the checkpoint at epoch 2" in resumed.message
    assert _max_abs_diff(full.variables, resumed.variables) == 0.0
    assert resumed.loss_curve == full.loss_curve  # history restored with the state
    assert resumed.test_accuracy == full.test_accuracy
    # A corrupt latest checkpoint is reported and the previous one used.
    for path in (tmp_path / "ckpt" / "4").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    recovered = train.train_model(TinyCNN(), config, synthetic, jax.random.PRNGKey(0))
    assert recovered.status == "ok" and recovered.resumed_from_epoch == 3
    assert "checkpoint at epoch 4 is unreadable" in recovered.message
    assert _max_abs_diff(full.variables, recovered.variables) == 0.0


def _rmtree(path: pathlib.Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() or child.is_symlink() else child.rmdir()
    path.rmdir()


MULTI_DEVICE_SCRIPT = '''
import sys
sys.path.insert(0, "tests")
from helpers import TinyCNN
import json, jax, numpy as np
from memnas_jax import data as data_lib, train
assert jax.device_count() == 4, jax.devices()
data = data_lib.synthetic_dataset(num_train=256, num_validation=64, num_test=0)
out = {}
for n in (1, 4):
    config = train.default_config()
    config.update(dict(epochs=2, batch_size=32, eval_batch_size=32, learning_rate=0.05,
                       milestones=(1,), num_devices=n))
    config.augment.cutout = 8
    out[n] = train.train_model(TinyCNN(), config, data, jax.random.PRNGKey(0))
    assert out[n].status == "ok", out[n].message
diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), out[1].variables, out[4].variables)
print(json.dumps(dict(max_diff=max(jax.tree.leaves(diff)),
                      scale=max(float(np.max(np.abs(x)))
                                for x in jax.tree.leaves(out[1].variables)),
                      loss=[out[1].loss_curve, out[4].loss_curve],
                      val=[out[1].val_accuracy_curve, out[4].val_accuracy_curve])))
'''


@cpu_only
def test_one_and_four_devices_give_the_same_training():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Global-batch BatchNorm and gradients: only float reduction order differs.
    assert result["max_diff"] < 1e-4 * max(1.0, result["scale"]), result
    np.testing.assert_allclose(*result["loss"], rtol=1e-5)
    assert result["val"][0] == result["val"][1]


def test_step_schedule_matches_pytorch_multisteplr():
    config = _config(learning_rate=0.01, milestones=(60, 180, 240), gamma=0.1, epochs=300)
    schedule = train.make_schedule(config, steps_per_epoch=391)
    for epoch, lr in ((0, 0.01), (59, 0.01), (60, 0.001), (179, 0.001), (180, 1e-4),
                      (240, 1e-5), (299, 1e-5)):
        np.testing.assert_allclose(schedule(epoch * 391), lr, rtol=1e-5)
        np.testing.assert_allclose(schedule(epoch * 391 + 390), lr, rtol=1e-5)


def test_cosine_schedule_with_warmup():
    config = _config(schedule="cosine", learning_rate=0.1, epochs=10, warmup_epochs=2)
    schedule = train.make_schedule(config, steps_per_epoch=10)
    np.testing.assert_allclose([schedule(0), schedule(10), schedule(20), schedule(60),
                                schedule(100)], [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)


def test_train_settings_are_the_config_checked_once():
    config = train.default_config()
    settings = train.TrainSettings.from_config(config)
    assert settings == train.TrainSettings()  # default_config is made from the settings
    assert train.TrainSettings.from_config(settings) is settings
    config.augment.cutout = 8
    config.milestones = [3, 5]
    settings = train.TrainSettings.from_config(config)
    assert settings.augment == train.AugmentSettings(cutout=8) and settings.milestones == (3, 5)
    assert isinstance(train.TrainSettings.from_config(dict(learning_rate=1)).learning_rate, float)
    for change, message in (
            (dict(batch_size="64"), r"config.train.batch_size must be int, got '64'"),
            (dict(nesterov=1), r"config.train.nesterov must be bool, got 1"),
            (dict(milestones=(1.5,)), r"config.train.milestones must be a sequence of ints"),
            (dict(batch_szie=64), r"config.train.batch_szie is not a setting; the settings are "),
            (dict(augment=dict(flip="yes")), r"config.train.augment.flip must be bool"),
            (dict(label_smoothing=1.0), r"config.train.label_smoothing must be in \[0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            train.TrainSettings.from_config(dict(change), "config.train")
    with pytest.raises(ConfigError, match="TrainSettings have no skeleton: pass skeleton="):
        train.candidate_network(NET53, train.TrainSettings(), None)


def test_skeleton_from_config_follows_the_data(synthetic):
    config = _config()
    config.skeleton.update(dict(width=16, width_schedule="1,1,2,2,4"))
    skeleton = train.skeleton_from_config(config, data_lib.synthetic_dataset(
        8, 0, 0, image_shape=(16, 16, 1), num_classes=5))
    assert skeleton.widths == (16, 16, 32, 32, 64)
    assert (skeleton.image_size, skeleton.in_channels, skeleton.num_classes) == (16, 1, 5)
    assert train.resolve_depthwise_impl("auto") == (
        "shifted" if jax.default_backend() == "cpu" else "xla")


@pytest.mark.slow
def test_small_candidate_reaches_50_percent_on_real_cifar10(data_dir, monkeypatch):
    """A w=32 conv_3x3 candidate, 4 epochs of 10,240 images: 54 % test accuracy, ~2 min."""
    if not (data_dir / "cifar10" / "train.npz").exists():
        pytest.skip(f"no CIFAR-10 .npz in {data_dir}/cifar10")
    monkeypatch.setenv(data_lib.DATA_DIR_ENV, str(data_dir))
    config = _config(epochs=4, batch_size=128, eval_batch_size=500, learning_rate=0.03,
                     schedule="cosine", warmup_epochs=1, nesterov=True, num_devices=0)
    config.data.update(dict(validation_size=1000, train_subset=10240, test_subset=2000))
    config.skeleton.width = 32
    dataset = data_lib.load_dataset(config.data)
    arch = uniform_architecture([(0, 0, "conv_3x3", "conv_3x3")])
    result = train.train_candidate(arch, config, dataset, jax.random.PRNGKey(0))
    assert result.status == "ok", result.message
    assert result.test_accuracy >= 0.5, result
    assert result.best_val_accuracy >= 0.45, result


LONG_EPOCH_SCRIPT = """
import sys
sys.path.insert(0, "tests")
from helpers import TinyCNN
import jax
from memnas_jax import data as data_lib, train
assert jax.device_count() == 2, jax.devices()
data = data_lib.synthetic_dataset(num_train=8000, num_validation=0, num_test=64)
config = train.default_config()
config.update(dict(epochs=1, batch_size=16, eval_batch_size=32, learning_rate=0.05,
                   milestones=(), num_devices=2))
result = train.train_model(TinyCNN(), config, data, jax.random.PRNGKey(0))
print(result.status, result.epochs_done, result.message)
"""


@cpu_only
def test_a_long_epoch_on_two_host_devices_does_not_hang():
    """500 steps in one epoch on 2 XLA:CPU devices. Unbounded asynchronous dispatch deadlocked
    XLA:CPU's collectives here (the first epoch of a 20,000-image training never ended);
    `memnas_jax.dispatch` bounds it. A short collective timeout turns a regression into a
    crash within a minute instead of a hang."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_cpu_collective_call_terminate_timeout_seconds=30")
    proc = subprocess.run([sys.executable, "-c", LONG_EPOCH_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ok 1"), proc.stdout

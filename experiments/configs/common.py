"""What the presets of experiments/configs/ (cifar10.py, imagenet.py) share: the accelerator the
"auto" preset looks for, the small-controller settings and the test preset. Imported as
`from configs import common`: experiments/ is on the path of the scripts there (their folder), of
the tests (pytest's `pythonpath`) and of the benchmarks that load a preset."""

from __future__ import annotations

import glob
import importlib.util
import os

import ml_collections

# JAX's accelerator plugins, by platform.
_GPU_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")
_TPU_PLUGINS = ("libtpu",)


def detect_accelerator() -> tuple[str, str]:
    """("cpu" | "gpu" | "tpu", why), read without starting JAX's backends: a preset is chosen while
    the flags are parsed, before the job's distributed setup and XLA flags, which must come
    first. JAX_PLATFORMS decides when set; else a platform needs both JAX's plugin for it and
    the device files (a plugin on a machine without the device falls back to the CPU)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        first = platforms.split(",")[0].strip().lower()
        kind = "gpu" if first in ("cuda", "rocm", "gpu") else first
        return kind, f"JAX_PLATFORMS={platforms}"
    installed = lambda names: [n for n in names if importlib.util.find_spec(n)]  # noqa: E731
    gpu_plugins = installed(_GPU_PLUGINS)
    if gpu_plugins and (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return "gpu", f"{gpu_plugins[0]} is installed and a GPU device is present"
    tpu_plugins = installed(_TPU_PLUGINS)
    if tpu_plugins and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu", f"{tpu_plugins[0]} is installed and a TPU device is present"
    return "cpu", "no GPU or TPU found (a JAX accelerator plugin and its device)"


def small_controller(config: ml_collections.ConfigDict, max_steps: int) -> None:
    """A controller sized for a few dozen trained candidates: small LSTMs, short fits."""
    config.controller.update(dict(
        embed_dim=16, encoder_hidden=32, ranker_hidden=32, max_steps=max_steps,
        eval_every=max(max_steps // 4, 1), patience=2, set_size=8, sets_per_batch=4,
        predict_batch=512))


def test_preset(config: ml_collections.ConfigDict, image_size: int, num_classes: int) -> None:
    """Seconds per candidate, for the tests: tiny synthetic images, width 4, two epochs of four
    steps, three cheap ops, rounds 0 and 1 sampled to 2 candidates, round 2 ranked by the
    controller (top 2), then the round cap."""
    config.data.name = "synthetic"
    config.data.synthetic.update(dict(num_train=128, num_validation=64, num_test=0,
                                      image_size=image_size, channels=3,
                                      num_classes=num_classes, seed=0))
    config.skeleton.width = 4
    config.train.update(dict(epochs=2, batch_size=32, eval_batch_size=64, learning_rate=0.05,
                             milestones=(), depthwise_impl="xla"))
    config.grow_trim.update(dict(round0_combine_modes=("add",), ops=(0, 1, 6)))
    # Three rounds whatever the (noisy) accuracies: a round without improvement still advances.
    config.search.update(dict(max_rounds=3, max_cells=3, full_train_rounds=2, full_train_cap=2,
                              top_k=2, stop_when_no_improvement=False))
    config.controller.update(dict(
        embed_dim=8, encoder_hidden=16, ranker_hidden=16, max_steps=40, eval_every=20,
        patience=1, set_size=4, sets_per_batch=2, holdout_fraction=0.0, predict_batch=64))
    config.output.update(dict(plots=True, tensorboard=True))

"""MemNAS search on CIFAR-10: `--config=experiments/configs/cifar10.py:<preset>`.

Presets (override any field on the command line, e.g. `--config.reward.lam=0.8`):

* auto (the default): smoke on a CPU-only machine, gpu where JAX has a GPU or TPU, so that a bare
  `python experiments/cifar10_search.py --workdir=DIR` runs a search one can watch finish.

* paper: the authors' settings as far as known (docs/method.md §1, §8): width 64 during the
  search, candidates trained 150 epochs at batch 64 (SGD lr 0.01, momentum 0.9, x0.1 at epochs 60
  and 100), lambda 0.5, rounds 0 and 1 fully trained (98 and ~200 candidates), then the controller's
  top 100 per round, 13 rounds, at most 14 cells per block; each round's best candidate is the
  next base even when its reward is <= 0 (see below). Selection on a 5,000-image validation
  split held out of the training set (the authors selected on the test set). Weeks of GPU time.
* gpu: a practical search on one GPU: width 32, 15 epochs at batch 256 with a cosine schedule in
  bfloat16, round 0 all 49 add cells, round 1 sampled to 64 candidates, then the controller's top
  24 per round, 8 rounds (about 260 candidates; its duration was not measured, no GPU here).
* gpu_quick: the gpu preset cut to a short GPU window (8 epochs, 24 then top-12 candidates per
  round, stopping after 5 minutes at a round boundary), the first step of the README's results.
* cpu: the search of results/cifar10_cpu, sized for a 2-core CPU (about an hour): 10,000
  training and 2,000 validation images, width 8, 4 epochs with a cosine schedule, rounds 0 and 1
  sampled to 8 candidates, then the controller's top 5, 4 rounds (26 candidates). The proxy's
  seed spread and cost: results/cifar10_cpu/ and the README.
* smoke: a real search on a 2-core CPU in under 15 minutes: a CIFAR-10 subset (2,500 training
  and 500 validation images, from $MEMNAS_DATA_DIR/cifar10/*.npz), width 8, 2 epochs, rounds 0
  and 1 sampled to 5 candidates, rounds 2 and 3 ranked by the controller (top 3): 16 candidates.
* test: synthetic 16 px data, width 4, seconds per candidate (the test suite).
"""

from __future__ import annotations

import ml_collections

from configs import common  # experiments/configs/common.py
from memnas_jax import search


def paper() -> ml_collections.ConfigDict:
    """The authors' settings as far as known."""
    config = search.default_config()
    config.data.name = "cifar10"
    config.skeleton.kind = "cifar"
    config.train.checkpoint_every_epochs = 10  # with candidate_checkpoints: lose <= 10 epochs
    config.search.candidate_checkpoints = True
    # Always continue from the round's best candidate, as the authors did: their 13-round
    # trajectory grows a cell almost every round, although against its base every grow has a
    # negative reward at lambda 0.5 (e.g. net179 -> net254: +1.3 % accuracy, +85 % working
    # memory), so "stop when no reward > 0" would end their search after round 1.
    config.search.stop_when_no_improvement = False
    return config


def gpu() -> ml_collections.ConfigDict:
    """A practical search on one GPU."""
    config = paper()
    config.skeleton.width = 32
    config.train.update(dict(epochs=15, batch_size=256, eval_batch_size=1000,
                             learning_rate=0.1, nesterov=True, weight_decay=5e-4,
                             schedule="cosine", warmup_epochs=1, milestones=(),
                             dtype="bfloat16", checkpoint_every_epochs=5))
    config.grow_trim.round0_combine_modes = ("add",)
    config.search.update(dict(max_rounds=8, full_train_cap=64, top_k=24))
    common.small_controller(config, max_steps=2000)
    return config


def gpu_quick() -> ml_collections.ConfigDict:
    """The gpu preset cut to a short GPU window: an 8-epoch proxy, 24 candidates per early
    round, the controller's top 12 after, stopping at the first round boundary after 5
    minutes; then train_final.py:quick trains its answer and ResNet-20."""
    config = gpu()
    config.train.update(dict(epochs=8, checkpoint_every_epochs=0))
    config.search.update(dict(max_rounds=6, full_train_cap=24, top_k=12,
                              candidate_checkpoints=False, time_budget_minutes=5.0))
    common.small_controller(config, max_steps=1000)
    return config


def cpu() -> ml_collections.ConfigDict:
    """The search of results/cifar10_cpu: about an hour on 2 CPU cores."""
    config = paper()
    config.host_device_count = 0  # one XLA device: the search's path as on any machine
    config.data.update(dict(source="npz", validation_size=5000, train_subset=10000,
                            validation_subset=2000))
    config.skeleton.width = 8
    config.train.update(dict(epochs=4, batch_size=64, eval_batch_size=500,
                             learning_rate=0.05, nesterov=True, weight_decay=5e-4,
                             schedule="cosine", warmup_epochs=0, milestones=(),
                             checkpoint_every_epochs=0))
    config.grow_trim.round0_combine_modes = ("add",)
    config.search.update(dict(max_rounds=4, full_train_cap=8, top_k=5,
                              candidate_checkpoints=False))
    common.small_controller(config, max_steps=600)
    return config


def smoke() -> ml_collections.ConfigDict:
    """A real search on a 2-core CPU in under 15 minutes."""
    config = paper()
    # One XLA device. Two host devices (--config.host_device_count=2) ran this preset in
    # 9.0 min against 9.7, but change the float summation order and so the search's path.
    config.host_device_count = 0
    config.data.update(dict(source="npz", validation_size=5000, train_subset=2500,
                            validation_subset=500))
    config.skeleton.width = 8
    config.train.update(dict(epochs=2, batch_size=64, eval_batch_size=250,
                             learning_rate=0.05, milestones=(), checkpoint_every_epochs=0))
    config.grow_trim.round0_combine_modes = ("add",)
    config.search.update(dict(max_rounds=4, full_train_cap=5, top_k=3,
                              candidate_checkpoints=False))
    common.small_controller(config, max_steps=400)
    return config


def test() -> ml_collections.ConfigDict:
    """Synthetic 16 px data, width 4, seconds per candidate (the test suite)."""
    config = paper()
    config.search.candidate_checkpoints = False
    common.test_preset(config, image_size=16, num_classes=4)
    return config


# The presets, defined once: --config=experiments/configs/cifar10.py:<name>; "auto" picks one.
PRESETS = {"paper": paper, "gpu": gpu, "gpu_quick": gpu_quick, "cpu": cpu, "smoke": smoke,
           "test": test}
PRESET_NAMES = ("auto", *PRESETS)


def auto_preset() -> tuple[str, str]:
    """The preset "auto" stands for on this machine, and why: smoke on a CPU, gpu elsewhere."""
    kind, why = common.detect_accelerator()
    return ("smoke" if kind == "cpu" else "gpu"), why


def get_config(preset: str = "auto") -> ml_collections.ConfigDict:
    if preset == "auto":
        preset = auto_preset()[0]
    if preset not in PRESETS:
        raise ValueError(f"unknown CIFAR-10 preset {preset!r}; use one of {PRESET_NAMES}")
    return PRESETS[preset]()

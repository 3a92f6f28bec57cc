"""Final training of a searched architecture: the authors' recipe (docs/method.md §8).

    python experiments/train_final.py --config=experiments/configs/train_final.py:paper \
        --arch=arch.json --workdir=/tmp/final

Presets: "quick" (30 epochs, cosine, SGD 0.1 Nesterov, weight decay 5e-4, batch 256 in bfloat16,
w = 32: the final training of the `gpu_quick` chain, minutes on one GPU), "cpu" (the recipe of
results/cifar10_cpu: 10 epochs of all 50,000 images, cosine after one warm-up epoch, SGD 0.1
Nesterov, weight decay 5e-4, batch 128, crop + flip, float32, w = 16; about an hour per network
on 2 CPU cores), "paper" (300 epochs, SGD
lr 0.01 momentum 0.9, steps at 60/180/240 x0.1, batch 128, crop + flip + Cutout 16, w = 32, the
whole training set, test accuracy at the end) and "smoke"
(the same code on a few thousand images for two epochs at w = 8, a couple of minutes on a CPU).
Override any field: --config.epochs=600 --config.skeleton.width=64.
"""

from memnas_jax import train


def paper():
    """The authors' recipe: 300 epochs, steps at 60/180/240, Cutout 16, w = 32."""
    config = train.default_config()
    config.epochs = 300
    config.batch_size = 128
    config.eval_batch_size = 500
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 0.0  # the authors' --weight-decay was parsed but never passed to SGD
    config.schedule = "step"
    config.milestones = (60, 180, 240)
    config.gamma = 0.1
    config.augment.update(dict(crop_padding=4, flip=True, cutout=16))
    config.skeleton.width = 32
    config.data.validation_size = 0  # final training uses all 50,000 training images
    config.checkpoint_every_epochs = 10
    config.eval_every_epochs = 10
    config.compilation_cache_dir = train.AUTO_CACHE  # <workdir>/xla_cache: a rerun skips XLA
    return config


def quick():
    """30 epochs, cosine, bfloat16, w = 32: minutes on one GPU."""
    config = paper()
    config.update(dict(epochs=30, batch_size=256, eval_batch_size=1000, learning_rate=0.1,
                       nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_epochs=1,
                       milestones=(), dtype="bfloat16", checkpoint_every_epochs=5,
                       eval_every_epochs=5))
    return config


def cpu():
    """The recipe of results/cifar10_cpu: 10 epochs of all 50,000 images, w = 16."""
    config = paper()
    config.update(dict(epochs=10, batch_size=128, eval_batch_size=500, learning_rate=0.1,
                       nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_epochs=1,
                       milestones=(), dtype="float32", checkpoint_every_epochs=1,
                       eval_every_epochs=10))
    config.augment.cutout = 0  # too strong a regulariser for 10 epochs
    config.skeleton.width = 16
    return config


def smoke():
    """The same code on a few thousand images for two epochs at w = 8."""
    config = paper()
    config.epochs = 2
    config.milestones = (1,)
    config.skeleton.width = 8
    config.data.train_subset = 2000
    config.data.test_subset = 1000
    config.checkpoint_every_epochs = 1
    config.eval_every_epochs = 1
    return config


# The presets, defined once: --config=experiments/configs/train_final.py:<name>.
PRESETS = {"paper": paper, "quick": quick, "cpu": cpu, "smoke": smoke}
PRESET_NAMES = tuple(PRESETS)


def get_config(preset: str = "paper"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESET_NAMES}")
    return PRESETS[preset]()

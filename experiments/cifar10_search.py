r"""MemNAS search on CIFAR-10.

    python experiments/cifar10_search.py --config=experiments/configs/cifar10.py:smoke \
        --workdir=/tmp/memnas_smoke [--config.reward.lam=0.8] [--config.memory.budget_mb=6]

Rerunning the same command on the same --workdir resumes the search where it stopped. A workdir
made with another config is refused unless --allow_config_change is given. Outputs (in --workdir):
candidates.jsonl, best.json, best_architecture.json (for experiments/train_final.py --arch),
leaderboard.md, pareto.png, trajectory.png, tensorboard/.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run without installing

from memnas_jax import search  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parent / "configs" / "cifar10.py") + ":paper",
    "Search config file and preset (path:preset; presets paper, gpu, smoke, test).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of the search (created or "
                               "resumed).", required=True)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir made with a different config.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    search.run_experiment(_CONFIG.value, _WORKDIR.value,
                          allow_config_change=_ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
    app.run(main)

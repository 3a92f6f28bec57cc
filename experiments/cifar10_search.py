r"""MemNAS search on CIFAR-10.

    python experiments/cifar10_search.py --workdir=/tmp/first     # the "auto" preset
    python experiments/cifar10_search.py --config=experiments/configs/cifar10.py:paper \
        --workdir=/tmp/memnas_paper [--config.reward.lam=0.8] [--config.memory.budget_mb=6]

Rerunning the same command on the same --workdir resumes the search where it stopped. A workdir
made with another config is refused unless --allow_config_change is given. Outputs (in --workdir):
candidates.jsonl, best.json, best_architecture.json (for experiments/train_final.py --arch),
leaderboard.md, pareto.png, trajectory.png, tensorboard/.

One process of a multi-process job: add --coordinator_address=host:port --num_processes=N
--process_id=i (or nothing where JAX detects the cluster itself: README, "Running on a pod").
"""

import search_main  # experiments/search_main.py, beside this script

from configs import cifar10  # experiments/configs/cifar10.py

if __name__ == "__main__":
    search_main.run(cifar10)

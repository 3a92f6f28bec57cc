r"""MemNAS search on ImageNet (or a downsampled ImageNet, or synthetic data).

    python experiments/imagenet_search.py --config=experiments/configs/imagenet.py:resized32 \
        --workdir=/tmp/memnas_smoke [--config.reward.lam=0.8] [--config.memory.budget_mb=6]

Real ImageNet (preset paper) is read with TFDS from a prepared `imagenet2012` in array_record
format, which needs TFDS's manual download (the error message says how); preset resized32 uses
TFDS's `imagenet_resized/32x32`; preset test runs on synthetic data.

Rerunning the same command on the same --workdir resumes the search where it stopped. A workdir
made with another config is refused unless --allow_config_change is given. Outputs (in --workdir):
candidates.jsonl, best.json, best_architecture.json (for experiments/train_final.py --arch),
leaderboard.md, pareto.png, trajectory.png, tensorboard/.

One process of a multi-process job: add --coordinator_address=host:port --num_processes=N
--process_id=i (or nothing where JAX detects the cluster itself: README, "Running on a pod").
"""

import search_main  # experiments/search_main.py, beside this script

from configs import imagenet  # experiments/configs/imagenet.py

if __name__ == "__main__":
    search_main.run(imagenet)

"""The absl main of the search experiments (cifar10_search.py, imagenet_search.py): flags, then
`memnas_jax.search.run_experiment`."""

from __future__ import annotations

import pathlib
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run without installing

from memnas_jax import search  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def run(config_file: str, presets: Sequence[str]) -> None:
    """Defines the flags and runs the search; `config_file` (in experiments/configs) is the
    default config, with its first preset."""
    config = config_flags.DEFINE_config_file(
        "config", f"{CONFIG_DIR / config_file}:{presets[0]}",
        f"Search config file and preset (path:preset; presets {', '.join(presets)}).",
        lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Work directory of the search (created or "
                                  "resumed).", required=True)
    allow_config_change = flags.DEFINE_bool(
        "allow_config_change", False, "Resume a workdir made with a different config.")
    # Multi-process jobs: the same as --config.distributed.* (empty: environment / auto-detect).
    layout = dict(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0, for a multi-process job."),
        num_processes=flags.DEFINE_integer("num_processes", None,
                                           "Number of processes of the job."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index in the job."))

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        search_config = config.value
        for field, flag in layout.items():
            if flag.value is not None:
                search_config.distributed[field] = flag.value
        search.run_experiment(search_config, workdir.value,
                              allow_config_change=allow_config_change.value)

    app.run(main)

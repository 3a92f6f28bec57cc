"""The absl main of the search experiments (cifar10_search.py, imagenet_search.py): flags, then
`memnas_jax.search.run_experiment`."""

from __future__ import annotations

import pathlib
import re
import sys
from types import ModuleType
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from memnas_jax import errors, search

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def run(config_module: ModuleType) -> None:
    """Defines the flags and runs the search; `config_module` (a file of experiments/configs) is
    the default config, with its first preset name. Its PRESET_NAMES lists the presets; its
    auto_preset() -> (preset, why), when it has one, tells what the "auto" preset chose (logged)."""
    config_file = pathlib.Path(config_module.__file__).name
    presets = config_module.PRESET_NAMES
    auto_preset = getattr(config_module, "auto_preset", None)
    try:  # config_flags applies the --config.* overrides of sys.argv here already
        config = config_flags.DEFINE_config_file(
            "config", f"{CONFIG_DIR / config_file}:{presets[0]}",
            f"Search config file and preset (path:preset; presets {', '.join(presets)}).",
            lock_config=True)
    except _FLAG_ERRORS as e:
        _exit_flag_error(e, sys.argv)
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
        chosen = config_flags.get_config_filename(flags.FLAGS["config"])
        if auto_preset is not None and chosen.endswith(":auto"):
            preset, why = auto_preset()
            logging.info("preset auto: %s (%s); choose another with --config=%s:<preset>, "
                         "presets %s", preset, why, chosen.rsplit(":", 1)[0], ", ".join(presets))
        for field, flag in layout.items():
            if flag.value is not None:
                search_config.distributed[field] = flag.value
        errors.exit_on_user_error(search.run_experiment, search_config, workdir.value,
                                  allow_config_change=allow_config_change.value)

    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad preset or config field reported in one line (exit 2)
    instead of a traceback inside the flags library."""
    try:
        return flags.FLAGS(argv)
    except _FLAG_ERRORS as e:
        _exit_flag_error(e, argv)


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _exit_flag_error(error: Exception, argv: Sequence[str]) -> None:
    sys.stderr.write(f"error: {_flag_error(error, argv)}\n")
    sys.exit(errors.EXIT_USER_ERROR)


def _flag_error(error: Exception, argv: Sequence[str]) -> str:
    text = str(error).strip()
    if isinstance(error, (AttributeError, KeyError)):  # an override of a field that is not there
        names = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text)
        name = names[0] if names else text
        given = [a for a in argv if a.startswith("--config.") and name in a]
        guess = re.search(r'Did you mean "([^"]+)"', text)
        hint = (f"did you mean {guess.group(1)!r}?" if guess else
                "the fields and their defaults: the config file's get_config and the README")
        return f"{given[0] if given else name}: the config has no field {name!r} ({hint})"
    if "Traceback" in text:  # the flags library embeds the config file's traceback: keep its
        lines = [line.strip() for line in text.splitlines() if line.strip()]  # last line
        return f"{lines[0].rstrip(':')}: {lines[-1].split(': ', 1)[-1]}"
    return text.splitlines()[0] if text else type(error).__name__

"""Trains one architecture with the final recipe and reports its accuracy and memory.

    python experiments/train_final.py --arch=arch.json --workdir=/tmp/final \
        [--config=experiments/configs/train_final.py:smoke] [--config.epochs=10]

--arch is an `Architecture.to_json()` file. Checkpoints go to <workdir>/checkpoints (rerunning
the same command resumes), compiled programs to <workdir>/xla_cache, the result to
<workdir>/result.json. On a CPU host the run uses
`--host_devices` XLA devices (default: one per core, up to 8) with the batch split over them.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from memnas_jax import sharding  # noqa: E402  (imports jax, starts no backend)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "train_final.py"),
    "Training config file, optionally with :preset.")
_ARCH = flags.DEFINE_string("arch", None, "Path to an architecture JSON (Architecture.to_json).",
                            required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and result.json.",
                               required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the initialisation and the data order.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "CPU only: XLA host devices to split the batch over (0 = one per core, "
    "at most 8). Ignored when XLA_FLAGS already sets a count.")


def _format_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} B)"


def main(argv):
    del argv
    from memnas_jax import errors  # pylint: disable=import-outside-toplevel
    return errors.exit_on_user_error(_main)


def _read_architecture(path: str):
    from memnas_jax.encoding import Architecture, EncodingError  # pylint: disable=import-outside-toplevel
    from memnas_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    try:
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read --arch={path} ({e.strerror or e})") from None
    try:
        return Architecture.from_json(text)
    except EncodingError as e:
        raise UserError(f"--arch={path} is not a valid architecture JSON "
                        f"(Architecture.to_json, e.g. a search's best_architecture.json): {e}"
                        ) from None


def _main():
    sharding.set_host_device_count(_HOST_DEVICES.value or min(os.cpu_count() or 1, 8))
    sharding.disable_cpu_ynn_fusions()  # ~6x faster CPU convolutions (jaxlib 0.10)
    import jax  # pylint: disable=import-outside-toplevel
    from memnas_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    from memnas_jax import train  # pylint: disable=import-outside-toplevel
    from memnas_jax.errors import WorkdirError  # pylint: disable=import-outside-toplevel
    from memnas_jax.io import atomic_write  # pylint: disable=import-outside-toplevel

    sharding.initialize_distributed()
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    arch = _read_architecture(_ARCH.value)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ".write_test").write_bytes(b"")
        (workdir / ".write_test").unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write the work directory {workdir} ({e.strerror or e}); "
                           "choose another --workdir") from None
    if not config.checkpoint_dir:
        config.checkpoint_dir = str(workdir / "checkpoints")
    config.compilation_cache_dir = train.compilation_cache_path(config.compilation_cache_dir,
                                                                workdir)

    dataset = data_lib.load_dataset(config.data)
    skeleton = train.skeleton_from_config(config, dataset)
    logging.info("data: %s", dataset.describe())
    logging.info("architecture:\n%s", arch)
    logging.info("devices: %s", jax.devices())
    result = train.train_candidate(arch, config, dataset, jax.random.PRNGKey(_SEED.value),
                                   skeleton=skeleton)

    report = {"config": config.to_dict(), "architecture": json.loads(arch.to_json()),
              "skeleton": skeleton.to_dict(), "result": result.to_dict()}
    lines = [f"status: {result.status}" + (f" ({result.message})" if result.message else ""),
             f"test accuracy: {result.test_accuracy}",
             f"parameters: {result.param_count:,}",
             f"epochs: {result.epochs_done}, {result.images_per_second:.0f} images/s, "
             f"compile {result.compile_seconds:.1f} s, wall {result.wall_seconds:.1f} s"]
    try:
        from memnas_jax.memory import memory_report  # pylint: disable=import-outside-toplevel
    except ImportError:
        memory_report = None
    if memory_report is not None:
        memory = memory_report(arch, skeleton)
        report["memory"] = memory.to_dict()
        lines += [f"parameter memory: {_format_bytes(memory.param_bytes)}",
                  f"working memory: {_format_bytes(memory.working_bytes)}",
                  f"total memory: {_format_bytes(memory.total_bytes)}"]
    atomic_write(workdir / "result.json", json.dumps(report, indent=2, default=str))
    print("\n".join(lines))
    return 0 if result.ok else 1


if __name__ == "__main__":
    app.run(main)

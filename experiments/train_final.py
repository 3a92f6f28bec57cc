"""Trains one architecture with the final recipe and reports its accuracy and memory.

    python experiments/train_final.py --arch=arch.json --workdir=/tmp/final \
        [--config=experiments/configs/train_final.py:smoke] [--config.epochs=10]
    python experiments/train_final.py --baseline=resnet20 --workdir=/tmp/resnet20   # same recipe

--arch is an `Architecture.to_json()` file; --baseline names a hand-designed network
(`memnas_jax.baselines`), trained with the same recipe and data and measured the same way: float32
parameters plus the peak of live activations at batch 1 (`memnas_jax.accounting`). Checkpoints go
to <workdir>/checkpoints (rerunning the same command resumes), compiled programs to
<workdir>/xla_cache, the result to <workdir>/result.json. On a CPU host the run uses
`--host_devices` XLA devices (default: one per core, up to 8) with the batch split over them.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from memnas_jax import xla_flags  # imports jax, starts no backend
from memnas_jax.errors import UserError, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "train_final.py"),
    "Training config file, optionally with :preset.")
_ARCH = flags.DEFINE_string("arch", None, "Path to an architecture JSON (Architecture.to_json, "
                            "e.g. a search's best_architecture.json).")
_BASELINE = flags.DEFINE_string("baseline", None, "Or a hand-designed baseline: resnet20, "
                                "resnet56, resnet110 or mobilenetv2 (memnas_jax.baselines).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and result.json.",
                               required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the initialisation and the data order.")
_DETERMINISTIC = flags.DEFINE_bool(
    "gpu_deterministic", False, "GPU: XLA's deterministic ops, so that a resumed or repeated "
    "run gives the same numbers (docs/reliability.md).")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "CPU only: XLA host devices to split the batch over (0 = one per core, "
    "at most 8). Ignored when XLA_FLAGS already sets a count.")


def _format_bytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB ({n:,} B)"


def main(argv):
    del argv
    return exit_on_user_error(_main)


def _main():
    if bool(_ARCH.value) == bool(_BASELINE.value):
        raise UserError("give exactly one of --arch=FILE (a searched architecture) and "
                        "--baseline=NAME (resnet20, resnet56, resnet110, mobilenetv2)")
    xla_flags.set_host_device_count(_HOST_DEVICES.value or min(os.cpu_count() or 1, 8))
    xla_flags.disable_cpu_ynn_fusions()  # ~6x faster CPU convolutions (jaxlib 0.10)
    if _DETERMINISTIC.value:
        xla_flags.enable_gpu_determinism()
    from memnas_jax import baselines, distributed, workdir_lock
    from memnas_jax.encoding import read_architecture

    distributed.initialize()
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    arch = read_architecture(_ARCH.value) if _ARCH.value else None
    if _BASELINE.value and _BASELINE.value not in baselines.BASELINES:
        raise UserError(f"--baseline={_BASELINE.value} is not one of {baselines.BASELINES}")
    import jax  # after the XLA flags above
    if jax.process_index() != 0:  # process 0 writes the work directory and owns it
        return _train_and_report(config, workdir, arch)
    workdir_lock.prepare_workdir(workdir)
    with workdir_lock.WorkdirLock(workdir, "final training"):  # one owner per work directory
        return _train_and_report(config, workdir, arch)


def _train_and_report(config, workdir: pathlib.Path, arch) -> int:
    import jax

    from memnas_jax import accounting, baselines, train
    from memnas_jax import data as data_lib
    from memnas_jax.io import atomic_write
    from memnas_jax.network import MemNASNetwork
    if not config.checkpoint_dir:
        config.checkpoint_dir = str(workdir / "checkpoints")
    config.compilation_cache_dir = train.compilation_cache_path(config.compilation_cache_dir,
                                                                workdir)

    dataset = data_lib.load_dataset(config.data)
    logging.info("data: %s", dataset.describe())
    logging.info("devices: %s", jax.devices())
    dtype = train.DTYPES[config.dtype]
    if arch is not None:
        skeleton = train.skeleton_from_config(config, dataset)
        logging.info("architecture:\n%s", arch)
        model = train.candidate_network(arch, config, dataset, skeleton)
        # The memory accounting at float32 with XLA's own depthwise op, as for the baselines.
        measured = MemNASNetwork(arch, skeleton, depthwise_impl="xla")
        name, kind = f"searched {arch.canonical_hash()[:10]}", "searched"
    else:
        model = baselines.baseline_model(_BASELINE.value, dataset.num_classes, dtype)
        measured = baselines.baseline_model(_BASELINE.value, dataset.num_classes)
        name, kind = _BASELINE.value, "baseline"
    result = train.train_model(model, config, dataset, jax.random.PRNGKey(_SEED.value))
    mem = dict(accounting.measure(measured, dataset.image_shape).to_dict(), batch_size=1)

    report = {"name": name, "kind": kind, "config": config.to_dict(), "seed": _SEED.value,
              "data": {"train_images": len(dataset.train),
                       "test_images": len(dataset.test) if dataset.test is not None else 0},
              "architecture": json.loads(arch.to_json()) if arch is not None else None,
              "baseline": _BASELINE.value or None, "result": result.to_dict(), "memory": mem}
    lines = [f"{name}: status {result.status}" + (f" ({result.message})" if result.message
                                                  else ""),
             f"test accuracy: {result.test_accuracy}",
             f"parameters: {result.param_count:,}",
             f"epochs: {result.epochs_done}, {result.images_per_second:.0f} images/s, "
             f"compile {result.compile_seconds:.1f} s, wall {result.wall_seconds:.1f} s",
             f"parameter memory: {_format_bytes(mem['param_bytes'])}",
             f"working memory: {_format_bytes(mem['working_bytes'])} (peak live activations, "
             "batch 1)",
             f"total memory: {_format_bytes(mem['total_bytes'])}"]
    atomic_write(workdir / "result.json", json.dumps(report, indent=2, default=str))
    print("\n".join(lines))
    return 0 if result.ok else 1


if __name__ == "__main__":
    app.run(main)

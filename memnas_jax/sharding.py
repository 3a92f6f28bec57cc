"""Device meshes and shardings for data-parallel training (docs/method.md §8).

All mesh and sharding code of the project lives here. Training is plain data parallelism with
`jax.jit` + `NamedSharding`: parameters, optimizer state and the device-resident dataset are
replicated, each batch is split along its leading axis over the mesh axis "data". Under jit, XLA
inserts the collectives itself, so BatchNorm statistics and gradients are computed over the global
batch without any hand-written `pmean`.

Multi-host (TPU pods, multi-node GPU): call `memnas_jax.distributed.initialize()` first in every
process;
the mesh then spans all global devices and `host_batch_to_global` assembles the per-host batches.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
_HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU aborts the process when a device thread waits at a collective longer than this; on a
# busy host a starved device thread can exceed a short limit, so allow an hour.
_CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
CPU_COLLECTIVE_TIMEOUT_SECONDS = 3600


def set_host_device_count(count: int) -> bool:
    """Asks XLA for `count` CPU devices (a 2-core host trains faster with 2 devices and the batch
    sharded: benchmarks/README.md), with a long collective timeout. Effective only
    before JAX initialises its backends (importing jax is fine; the first `jax.devices()` is
    not); returns False, changing nothing, when it is too late or XLA_FLAGS already names a
    count."""
    if count < 1:
        raise ValueError(f"host device count must be >= 1, got {count}")
    flags = os.environ.get("XLA_FLAGS", "")
    if _HOST_DEVICE_FLAG in flags or _backends_initialized():
        return False
    os.environ["XLA_FLAGS"] = _with_flag(_with_flag(flags, _HOST_DEVICE_FLAG, count),
                                         _CPU_COLLECTIVE_TIMEOUT_FLAG,
                                         CPU_COLLECTIVE_TIMEOUT_SECONDS)
    return True


def _with_flag(flags: str, name: str, value: Any) -> str:
    """XLA_FLAGS text `flags` with `name=value` appended, unless it already sets `name`."""
    return flags if name in flags else f"{flags} {name}={value}".strip()


_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def disable_cpu_ynn_fusions() -> bool:
    """Turns off XLA:CPU's experimental YNNPACK fusions (`--xla_cpu_experimental_ynn_fusion_type=`
    in XLA_FLAGS): with them jaxlib 0.10's CPU convolutions run several times slower on this
    project's machines (benchmarks/README.md). Like
    `set_host_device_count`, effective only before JAX starts its backends; returns False,
    changing nothing, when it is too late, XLA_FLAGS already sets the flag, or this jaxlib does
    not know it (XLA aborts on unknown flags)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (_YNN_FUSION_FLAG in flags or _backends_initialized()
            or not _xla_knows_flag(_YNN_FUSION_FLAG[2:])):
        return False
    os.environ["XLA_FLAGS"] = _with_flag(flags, _YNN_FUSION_FLAG, "")
    return True


def _xla_knows_flag(name: str) -> bool:
    """Whether the installed jaxlib defines the XLA flag `name` (its libraries hold the name)."""
    import mmap

    import jaxlib
    needle = name.encode()
    for path in sorted(pathlib.Path(jaxlib.__file__).parent.glob("*.so"),
                       key=lambda f: -f.stat().st_size):  # the big library holds XLA
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def host_device_count_flag() -> int | None:
    """The CPU device count requested in XLA_FLAGS, or None."""
    match = re.search(_HOST_DEVICE_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else None


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def make_data_mesh(num_devices: int = 0, devices: Sequence[jax.Device] | None = None
                   ) -> Mesh:
    """A 1-D mesh over the first `num_devices` (0 = all) of `devices` (default: all of
    `jax.devices()`), axis "data". Made once and passed down: training takes `mesh=`, and
    candidate groups (`memnas_jax.candidate_parallel`) pass each group's own.

    Built with `Mesh` rather than `jax.make_mesh`, whose axes now default to Explicit
    sharding-in-types; the classic Auto axes let jit propagate shardings by itself."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices but {len(devices)} are available "
                         f"({jax.default_backend()}); on CPU set XLA_FLAGS="
                         f"{_HOST_DEVICE_FLAG}=N before JAX starts")
    return Mesh(np.asarray(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def mesh_size(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    if batch_size < 1 or batch_size % mesh_size(mesh):
        raise ValueError(f"{what} {batch_size} must be a positive multiple of the "
                         f"{mesh_size(mesh)} devices of the mesh")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree (host or device arrays) onto every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a global batch (a pytree of arrays with a common leading axis) split over the mesh."""
    return jax.device_put(tree, batch_sharded(mesh))


def process_batch_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """The rows of a global batch of `batch_size` that this process feeds, in the order
    `host_batch_to_global` expects them (its devices' slices, ascending): all rows for a single
    process; rows [p * b, (p + 1) * b) for process p of a 1-D mesh over all processes."""
    check_batch_size(batch_size, mesh)
    slices = batch_sharded(mesh).addressable_devices_indices_map((batch_size,)).values()
    bounds = sorted({index[0].indices(batch_size)[:2] for index in slices})
    return np.concatenate([np.arange(start, stop) for start, stop in bounds])


def host_batch_to_global(tree: Any, mesh: Mesh, batch_size: int) -> Any:
    """Assembles each process's rows (`process_batch_rows`) of a global batch of `batch_size`
    into one global array split over the mesh. With a single process this is `shard_batch`."""
    if jax.process_count() == 1:
        return shard_batch(tree, mesh)
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, x, (batch_size, *x.shape[1:])), tree)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside jit: marks arrays as batch-sharded, so the work after a gather from a replicated
    dataset is split over the devices instead of repeated on each."""
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


__all__ = [
    "CPU_COLLECTIVE_TIMEOUT_SECONDS", "DATA_AXIS", "batch_sharded",
    "check_batch_size", "constrain_batch",
    "disable_cpu_ynn_fusions", "host_batch_to_global",
    "host_device_count_flag", "make_data_mesh", "mesh_size",
    "process_batch_rows",
    "replicate", "replicated", "set_host_device_count", "shard_batch",
]

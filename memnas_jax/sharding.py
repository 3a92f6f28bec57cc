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

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memnas_jax import xla_flags

DATA_AXIS = "data"
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
                         f"{xla_flags.HOST_DEVICE_FLAG}=N before JAX starts")
    return Mesh(np.asarray(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_batch_sharded(mesh: Mesh) -> NamedSharding:
    """Batches stacked on a leading axis (evaluation batches, a pack's candidates): the second
    (batch) axis split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


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
    "DATA_AXIS", "batch_sharded", "check_batch_size", "constrain_batch", "host_batch_to_global",
    "make_data_mesh", "mesh_size", "process_batch_rows", "replicate", "replicated",
    "shard_batch", "stacked_batch_sharded",
]

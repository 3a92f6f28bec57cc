"""Candidate-level parallelism: several candidates trained at once on disjoint device groups.

A small CIFAR candidate (batch 64) data-parallel over many devices leaves each device a few
images per step: the step is all collectives and launch overhead. Here the devices are split
into G groups (the "candidate" axis), each group trains its own candidate data-parallel (the
"data" axis), and the G candidates run concurrently: one Python thread per group dispatches to
its own sub-mesh, and JAX's asynchronous dispatch and XLA's thread pools overlap the groups.

Results are those of training the candidates one after another on a mesh of the group size:
a candidate's result depends only on its architecture, its key and the number of devices it is
split over (`test_candidate_parallel.py` checks that to float tolerance).

Multi-host: a group takes the same slice of every process's local devices, so each group spans
all processes (a candidate's data parallelism crosses hosts, the candidates split the local
devices). Work is assigned statically (item i to group i mod G, each group in item order), so
every process launches the same computations on the same groups in the same order.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Sequence, TypeVar

import jax
from jax.sharding import Mesh

from memnas_jax import sharding

Item = TypeVar("Item")
Result = TypeVar("Result")


def device_groups(num_groups: int, devices: Sequence[jax.Device] | None = None
                  ) -> list[tuple[jax.Device, ...]]:
    """`devices` (default: all) split into `num_groups` equal, disjoint groups. Each group has
    the same number of devices from every process (group g = the g-th slice of each process's
    devices, in device order)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_groups < 1:
        raise ValueError(f"candidate groups must be >= 1, got {num_groups}")
    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    counts = {p: len(ds) for p, ds in by_process.items()}
    if len(set(counts.values())) != 1 or next(iter(counts.values())) % num_groups:
        raise ValueError(f"cannot split the devices into {num_groups} equal groups: "
                         f"{len(devices)} devices, per process {counts}; candidate_groups must "
                         "divide every process's device count")
    per_group = next(iter(counts.values())) // num_groups
    return [tuple(d for p in sorted(by_process)
                  for d in by_process[p][g * per_group:(g + 1) * per_group])
            for g in range(num_groups)]


def map_on_device_groups(fn: Callable[[Item, Mesh], Result], items: Sequence[Item],
                         num_groups: int, devices: Sequence[jax.Device] | None = None
                         ) -> list[Result]:
    """[fn(item, mesh) for item in items], item i run with the data mesh of device group
    i mod `num_groups` (`sharding.make_data_mesh` over the group), the groups concurrently.

    `fn` should not raise (`train.train_candidate` never does for a candidate's own failure);
    if it does, the first exception is re-raised after all groups have finished."""
    items = list(items)
    meshes = [sharding.make_data_mesh(devices=group)
              for group in device_groups(num_groups, devices)]
    if num_groups == 1 or len(items) <= 1:  # no threads needed; same devices as group 0
        return [fn(item, meshes[0]) for item in items]

    def run_group(g: int) -> list[tuple[int, Result]]:
        return [(i, fn(items[i], meshes[g])) for i in range(g, len(items), num_groups)]

    results: list = [None] * len(items)
    busy = min(num_groups, len(items))
    with concurrent.futures.ThreadPoolExecutor(busy, thread_name_prefix="group") as pool:
        futures = [pool.submit(run_group, g) for g in range(busy)]
        concurrent.futures.wait(futures)
        for future in futures:
            for i, result in future.result():
                results[i] = result
    return results


__all__ = ["device_groups", "map_on_device_groups"]

"""Joining a multi-process (multi-host) JAX job (docs/method.md §8-9).

Every process of a job runs the same deterministic search: the same candidates, the same seeds,
the same global batches. Each process drives its own local devices; jit over a mesh of all the
global devices makes XLA insert the cross-host collectives. Only process 0 writes the search's
state, logs, plots, reports and controller (`is_writer`); the orbax checkpoints of candidate
training are written by every process together (orbax coordinates them, so all processes call
save/restore). The work directory must be on a filesystem that every process sees (NFS,
Lustre, a FUSE-mounted bucket): on a resume every process reads the search state from it.

Where the job's layout comes from, first match wins:

1. explicit values (flags `--coordinator_address`, `--num_processes`, `--process_id`, or
   `config.distributed`),
2. the environment variables `MEMNAS_COORDINATOR_ADDRESS`, `MEMNAS_NUM_PROCESSES`,
   `MEMNAS_PROCESS_ID` (or JAX's own `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID`),
3. JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU pods, GKE): then
   `jax.distributed.initialize()` needs no arguments at all.

With none of these, the process is alone and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import ml_collections

from memnas_jax import settings as settings_lib
from memnas_jax.errors import ConfigError

# Variables whose presence means a cluster manager launched this process as one of several
# (what JAX's auto-detection reads).
_CLUSTER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")
_ENV_PREFIXES = ("MEMNAS_", "JAX_")


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """Where a process sits in its job. Fields left None are auto-detected by JAX."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return all(v is not None for v in dataclasses.astuple(self))

    def check(self) -> None:
        """Raises ValueError for an incomplete or inconsistent explicit layout."""
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if given and not self.explicit and self.coordinator_address is None:
            raise ValueError(f"{', '.join(given)} given without a coordinator address: pass "
                             "coordinator_address (host:port of process 0) as well")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None and not (
                0 <= self.process_id < self.num_processes):
            raise ValueError(f"process_id {self.process_id} is not in "
                             f"[0, {self.num_processes})")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address {self.coordinator_address!r} is not "
                             "host:port")


def _env_value(environ: Mapping[str, str], name: str) -> str | None:
    for prefix in _ENV_PREFIXES:
        value = environ.get(prefix + name)
        if value:
            return value
    return None


def _int_or_none(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve_layout(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None,
                   environ: Mapping[str, str] | None = None) -> ProcessLayout | None:
    """The job layout from explicit values, else the environment; None for a lone process.

    A layout whose fields are all None means "let JAX auto-detect" (a cluster manager's
    variables are set). num_processes == 1 is a lone process too."""
    environ = os.environ if environ is None else environ
    layout = ProcessLayout(
        coordinator_address=coordinator_address or _env_value(environ, "COORDINATOR_ADDRESS"),
        num_processes=_int_or_none(num_processes if num_processes is not None else
                                   _env_value(environ, "NUM_PROCESSES"), "num_processes"),
        process_id=_int_or_none(process_id if process_id is not None else
                                _env_value(environ, "PROCESS_ID"), "process_id"))
    layout.check()
    if layout.num_processes == 1:
        return None
    if layout.coordinator_address or any(environ.get(v) for v in _CLUSTER_VARIABLES):
        return layout
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when this process is one of several; returns whether
    it did. Must run before anything touches a device (`jax.devices()`, any array op).

    A second call, or a call after `jax.distributed.initialize` elsewhere, does nothing."""
    layout = resolve_layout(coordinator_address, num_processes, process_id, environ)
    if layout is None or is_initialized():
        return False
    jax.distributed.initialize(coordinator_address=layout.coordinator_address,
                               num_processes=layout.num_processes,
                               process_id=layout.process_id)
    return True


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """`config.distributed`: empty values mean "from the environment or auto-detected"."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1

    @classmethod
    def from_config(cls, config: Any, where: str = "config.distributed"
                    ) -> DistributedSettings:
        if isinstance(config, DistributedSettings):
            return config
        settings = settings_lib.from_config(cls, config, where)
        settings_lib.check_int(settings.num_processes, f"{where}.num_processes", 0)
        settings_lib.check_int(settings.process_id, f"{where}.process_id", -1)
        if settings.num_processes and settings.process_id >= settings.num_processes:
            raise ConfigError(f"{where}.process_id = {settings.process_id} must be below "
                              f"num_processes = {settings.num_processes}")
        return settings


def default_config() -> ml_collections.ConfigDict:
    """`DistributedSettings()` as a ConfigDict."""
    return settings_lib.to_config(DistributedSettings())


def initialize_from_config(config: ml_collections.ConfigDict | DistributedSettings) -> bool:
    """`initialize` with `config.distributed` (or its settings; empty fields: environment /
    auto)."""
    d = (config if isinstance(config, DistributedSettings)
         else DistributedSettings.from_config(config.get("distributed")))
    return initialize(d.coordinator_address or None, d.num_processes or None,
                      None if d.process_id < 0 else d.process_id)


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def sync_processes(name: str) -> None:
    """A barrier across the processes of the job (nothing for a lone process). Raises when a
    process has died, so the survivors stop instead of going on alone: a candidate whose
    collectives failed because a peer is gone must not be recorded as a failed candidate."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def same_on_all_processes(tree: Any) -> Any:
    """Process 0's value of a pytree of arrays, on every process (`tree` itself for a lone
    process)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(tree)


def is_writer() -> bool:
    """Whether this process writes files (process 0; any lone process)."""
    return jax.process_index() == 0


__all__ = ["ProcessLayout", "default_config", "initialize", "initialize_from_config",
           "is_initialized", "is_writer", "resolve_layout", "same_on_all_processes",
           "sync_processes"]

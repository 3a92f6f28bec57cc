"""XLA flags that must be set before JAX starts its backends: the number of CPU devices, the
collective timeout that goes with them, and XLA:CPU's YNNPACK fusions (off: benchmarks/README.md).
The experiment mains set them first, with `memnas_jax.distributed` (joining a multi-process job),
before any computation."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU aborts the process when a device thread waits at a collective longer than this; on a
# busy host a starved device thread can exceed a very short limit; five minutes is ~300
# training steps here, and a stuck collective then ends as an error the run resumes from.
_CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
CPU_COLLECTIVE_TIMEOUT_SECONDS = 300


def set_host_device_count(count: int) -> bool:
    """Asks XLA for `count` CPU devices (a 2-core host trains faster with 2 devices and the batch
    sharded: benchmarks/README.md), with a long collective timeout. Effective only
    before JAX initialises its backends (importing jax is fine; the first `jax.devices()` is
    not); returns False, changing nothing, when it is too late or XLA_FLAGS already names a
    count."""
    if count < 1:
        raise ValueError(f"host device count must be >= 1, got {count}")
    flags = os.environ.get("XLA_FLAGS", "")
    if HOST_DEVICE_FLAG in flags or _backends_initialized():
        return False
    os.environ["XLA_FLAGS"] = _with_flag(_with_flag(flags, HOST_DEVICE_FLAG, count),
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


_GPU_DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops", "--xla_gpu_exclude_nondeterministic_ops")


def enable_gpu_determinism() -> bool:
    """Asks XLA:GPU for deterministic ops (scatter-adds, max-pool backward and convolution
    algorithms that reproduce bit for bit; autotuning keeps to deterministic ones), so that a
    resumed or repeated training on a GPU gives the same numbers. No effect on a CPU, where
    runs already reproduce. Like the others, effective only before JAX starts its backends;
    returns False, changing nothing, when it is too late or this jaxlib lacks the flags."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _backends_initialized() or not all(_xla_knows_flag(f[2:]) for f in
                                          _GPU_DETERMINISM_FLAGS):
        return False
    for name in _GPU_DETERMINISM_FLAGS:
        flags = _with_flag(flags, name, "true")
    os.environ["XLA_FLAGS"] = flags
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
    match = re.search(HOST_DEVICE_FLAG + r"=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else None


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


__all__ = ["CPU_COLLECTIVE_TIMEOUT_SECONDS", "HOST_DEVICE_FLAG", "disable_cpu_ynn_fusions",
           "enable_gpu_determinism",
           "host_device_count_flag", "set_host_device_count"]

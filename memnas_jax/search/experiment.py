"""What the experiment mains run: `run_experiment(config, workdir)`."""

from __future__ import annotations

import os
import shlex
import sys
import time

import jax
import ml_collections
from absl import logging

from memnas_jax import distributed, preemption
from memnas_jax.memory import MB
from memnas_jax.search.loop import run_search
from memnas_jax.search.state import SearchResult


def _quiet_orbax_info() -> None:
    """orbax logs a dozen INFO lines per checkpoint save through absl: keep its warnings only."""
    import logging as py_logging

    class _DropOrbaxInfo(py_logging.Filter):
        def filter(self, record: py_logging.LogRecord) -> bool:
            return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                   allow_config_change: bool = False) -> SearchResult:
    """What the experiment mains run: joins a multi-process job when launched as one
    (`jax.distributed`), asks for `config.host_device_count` CPU devices and, unless
    `config.cpu_ynn_fusions`, turns XLA:CPU's slow YNNPACK fusions off (both before JAX starts its
    backends), then `run_search` and a closing log line."""
    from memnas_jax import xla_flags
    from memnas_jax.search.config import check_config
    if allow_config_change:
        with config.unlocked():
            config.resume_with_changed_config = True
    settings = check_config(config)  # every section checked before anything starts
    run = settings.run
    _quiet_orbax_info()
    distributed.initialize_from_config(settings.distributed)
    if not run.cpu_ynn_fusions:
        xla_flags.disable_cpu_ynn_fusions()
    if run.gpu_deterministic and not xla_flags.enable_gpu_determinism():
        logging.warning("could not turn on XLA's deterministic GPU ops (JAX has started, or "
                        "this jaxlib lacks the flags)")
    if run.host_device_count:
        if not xla_flags.set_host_device_count(run.host_device_count):
            logging.warning("could not set %d host devices (XLA_FLAGS already names a count, "
                            "or JAX has started)", run.host_device_count)
    logging.info("JAX %s on %s: %d process(es), %d local device(s)", jax.__version__,
                 jax.default_backend(), jax.process_count(), jax.local_device_count())
    start = time.perf_counter()
    preemption.install(run.preemption_grace_seconds)
    try:
        result = run_search(config, workdir)
    except preemption.Preempted:
        command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        logging.warning("search stopped on request after %.1f s; its state is saved. Resume "
                        "it with the same command:\n  %s", time.perf_counter() - start, command)
        raise SystemExit(preemption.EXIT_PREEMPTED) from None
    if result.architecture is None:
        logging.info("search stopped without a result: %s", result.stop_reason)
    else:
        logging.info("search %s in %.1f s (%d candidates trained, %d rounds): %s; best %s, "
                     "accuracy %.2f %%, total memory %.3f MB (params %.3f + working %.3f)\n%s",
                     "finished" if result.finished else "stopped",
                     time.perf_counter() - start, result.num_trained, result.num_rounds,
                     result.stop_reason, result.arch_hash[:12], 100 * result.accuracy,
                     result.total_bytes / MB, result.param_bytes / MB,
                     result.working_bytes / MB, result.architecture)
    return result

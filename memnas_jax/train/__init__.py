"""Training one candidate network (docs/method.md §8): `train_candidate(arch, config, data, rng)`,
or any linen model with `train_model(model, config, data, rng)`.

* One jitted train step, data parallel with `jit` + `NamedSharding` over a 1-D device mesh
  (`memnas_jax.sharding`): parameters replicated, the global batch split over the devices, so
  gradients and BatchNorm statistics are over the global batch with no hand-written collectives.
* CIFAR-size data lives on the device as uint8; the step gathers its batch from the epoch's
  permutation and augments it there (`memnas_jax.augment`). The step index is read from the
  on-device metrics, so the host only dispatches: no per-step transfers or syncs.
* Loss sums accumulate on the device and are read once per epoch (or every
  `nan_check_every_steps`): a non-finite sum stops the candidate as "diverged". Any exception (a
  compile error, an out-of-memory) ends it as "failed" with the message: nothing escapes to kill a
  search. Config mistakes (`check_config`) still raise, since they would fail every candidate.
* orbax checkpoints of the whole train state every N epochs make a long run resumable; the
  resumed run ends with the same parameters as an uninterrupted one. An unreadable latest
  checkpoint is reported, removed, and the previous one used.

The package, one job per module:

* `config`: `TrainSettings` (frozen, validated once from a config by `from_config`; every
  function here reads them), `default_config`, the skeleton, compile options, compilation cache;
* `optimizer`: the optax optimizer and schedule;
* `steps`: `TrainState` and the jitted train / evaluation steps and initialiser;
* `programs`: a candidate's compiled programs (`compile_candidate`, `compile_model`);
* `evaluate`: accuracy on a split, resident or streamed;
* `checkpoints`: orbax epoch checkpoints and the mid-epoch snapshot of a stopped run;
* `result`: `TrainResult` and failed results;
* `loop`: `train_candidate` and `train_model`, the epochs.
"""

from memnas_jax.train.checkpoints import PREEMPTED_DIR
from memnas_jax.train.config import (
    AUTO_CACHE,
    DEPTHWISE_IMPLS,
    DTYPES,
    OPTIMIZERS,
    SCHEDULES,
    XLA_CACHE_DIR,
    AugmentSettings,
    SkeletonSettings,
    TrainSettings,
    check_config,
    compilation_cache_path,
    compiler_options,
    configure_compilation_cache,
    default_config,
    resolve_depthwise_impl,
    skeleton_from_config,
)
from memnas_jax.train.loop import train_candidate, train_model
from memnas_jax.train.optimizer import make_optimizer, make_schedule
from memnas_jax.train.programs import (
    CandidatePrograms,
    candidate_network,
    compile_candidate,
    compile_model,
    data_layout,
)
from memnas_jax.train.result import (
    STATUSES,
    TrainResult,
    failed_result,
    from_history,
    is_out_of_memory,
)
from memnas_jax.train.steps import TrainState, cross_entropy

__all__ = [
    "AUTO_CACHE", "DEPTHWISE_IMPLS", "DTYPES", "OPTIMIZERS", "PREEMPTED_DIR", "SCHEDULES",
    "STATUSES", "XLA_CACHE_DIR", "AugmentSettings", "CandidatePrograms", "SkeletonSettings",
    "TrainResult",
    "TrainSettings", "TrainState",
    "candidate_network", "check_config", "compilation_cache_path", "compile_candidate",
    "compile_model", "compiler_options", "configure_compilation_cache", "cross_entropy",
    "data_layout", "default_config", "failed_result", "from_history", "is_out_of_memory",
    "make_optimizer",
    "make_schedule", "resolve_depthwise_impl", "skeleton_from_config", "train_candidate",
    "train_model",
]

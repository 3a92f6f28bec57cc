"""The search's candidate trainer: standalone (`train.train_candidate`) and packed
(`memnas_jax.packed`) training with `config.train` on the dataset."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax

from memnas_jax import data as data_lib
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.encoding import Architecture
from memnas_jax.search.settings import SearchSettings
from memnas_jax.space import Skeleton
from memnas_jax.template import RoundTemplate

CANDIDATE_CHECKPOINT_DIR = "candidate_checkpoints"


# A plain training function: (architecture, skeleton, key) -> TrainResult (`FunctionTrainer`).
TrainFn = Callable[[Architecture, Skeleton, jax.Array], train_lib.TrainResult]


@runtime_checkable
class Trainer(Protocol):
    """What the search trains candidates with (`CandidateTrainer`; `FunctionTrainer` makes one
    of a plain `TrainFn`). The abilities beyond training one candidate are declared, not
    probed: `compiles_ahead` says whether `compile` works (the search then compiles the next
    candidates in threads and passes their programs back), `why_not_packed()` whether packs
    do (None: `compile_pack` and `train_pack` work)."""

    compiles_ahead: bool

    def __call__(self, arch: Architecture, skeleton: Skeleton, key: jax.Array, *,
                 programs: Any = None, mesh: Any = None) -> train_lib.TrainResult:
        """Trains one candidate; `programs`: its programs (or a future of them) compiled
        ahead; `mesh`: its candidate group's data mesh (parallel.candidate_groups > 1)."""
        ...

    def compile(self, arch: Architecture, skeleton: Skeleton) -> Any:
        """The candidate's programs, without training it."""
        ...

    def why_not_packed(self) -> str | None:
        """Why this trainer cannot train packs (None: it can)."""
        ...

    def compile_pack(self, template: RoundTemplate, pack_size: int, selection: str) -> Any:
        """The programs of a pack of `pack_size` candidates of `template` (`pack_size` and
        `compile_seconds` attributes; a smaller pack size when the device memory is short)."""
        ...

    def train_pack(self, archs: Sequence[Architecture], skeleton: Skeleton,
                   keys: Sequence[jax.Array], programs: Any) -> list[train_lib.TrainResult]:
        """Trains a pack with programs from `compile_pack`: one result per candidate."""
        ...


class FunctionTrainer:
    """A plain `TrainFn` as a `Trainer`: no compiling ahead, no packs. With candidate groups
    the function is called with `mesh=`."""

    compiles_ahead = False

    def __init__(self, fn: TrainFn):
        self.fn = fn

    def __call__(self, arch: Architecture, skeleton: Skeleton, key: jax.Array, *,
                 programs: Any = None, mesh: Any = None) -> train_lib.TrainResult:
        del programs  # never compiled ahead
        if mesh is None:
            return self.fn(arch, skeleton, key)
        return self.fn(arch, skeleton, key, mesh=mesh)

    def compile(self, arch: Architecture, skeleton: Skeleton) -> Any:
        raise TypeError("a FunctionTrainer does not compile ahead")

    def why_not_packed(self) -> str | None:
        return "the search's train_fn trains one candidate at a time"

    def compile_pack(self, template: RoundTemplate, pack_size: int, selection: str) -> Any:
        raise TypeError(self.why_not_packed())

    def train_pack(self, archs, skeleton, keys, programs) -> list[train_lib.TrainResult]:
        raise TypeError(self.why_not_packed())


def as_trainer(train_fn: Trainer | TrainFn) -> Trainer:
    """A `Trainer` as it is; a plain function as a `FunctionTrainer`."""
    return train_fn if isinstance(train_fn, Trainer) else FunctionTrainer(train_fn)


AUTO_MAX_PACK = 16  # packing "auto" on an accelerator: the largest pack before memory sizing


class CandidateTrainer:
    """The search's `Trainer`: `train.train_candidate` with `config.train` on the dataset.
    `compile` makes a candidate's programs without training it, so that the search can compile
    the next candidates while one trains (`memnas_jax.compile_ahead`)."""

    def __init__(self, settings: SearchSettings, dataset: data_lib.Dataset,
                 workdir: pathlib.Path):
        self.settings = dataclasses.replace(
            settings.train, compilation_cache_dir=train_lib.compilation_cache_path(
                settings.train.compilation_cache_dir, workdir))
        self.dataset, self.workdir = dataset, workdir
        self.candidate_checkpoints = settings.search.candidate_checkpoints
        # Once, here on the main thread, before any compile-ahead thread starts.
        train_lib.configure_compilation_cache(self.settings.compilation_cache_dir)

    compiles_ahead = True

    def compile(self, arch: Architecture, skeleton: Skeleton) -> train_lib.CandidatePrograms:
        return train_lib.compile_candidate(arch, self.settings, self.dataset,
                                           skeleton=skeleton)

    def why_not_packed(self) -> str | None:
        """Why this trainer cannot train packs (None: it can)."""
        if not self.dataset.on_device:
            return f"the {self.dataset.name} data streams from the host (packs need it resident)"
        return None

    def compile_pack(self, template: RoundTemplate, pack_size: int, selection: str
                     ) -> packed_lib.PackedPrograms:
        return packed_lib.compile_fitting_pack(template, self.settings, self.dataset,
                                               pack_size, selection)

    def train_pack(self, archs: Sequence[Architecture], skeleton: Skeleton,
                   keys: Sequence[jax.Array], programs: packed_lib.PackedPrograms
                   ) -> list[train_lib.TrainResult]:
        del skeleton  # the programs' template has it
        return packed_lib.train_packed(archs, self.settings, self.dataset, keys,
                                       programs=programs)

    def __call__(self, arch: Architecture, skeleton: Skeleton, key: jax.Array, *,
                 programs=None, mesh=None) -> train_lib.TrainResult:
        settings, checkpoint_dir = self.settings, None
        if self.candidate_checkpoints:
            checkpoint_dir = self.workdir / CANDIDATE_CHECKPOINT_DIR / arch.canonical_hash()[:16]
            settings = dataclasses.replace(settings, checkpoint_dir=str(checkpoint_dir))
        result = train_lib.train_candidate(arch, settings, self.dataset, key,
                                           skeleton=skeleton, programs=programs, mesh=mesh)
        if checkpoint_dir is not None and jax.process_index() == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return result

"""The search's candidate trainer: standalone (`train.train_candidate`) and packed
(`memnas_jax.packed`) training with `config.train` on the dataset."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Callable, Sequence

import jax

from memnas_jax import data as data_lib
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.encoding import Architecture
from memnas_jax.search.settings import SearchSettings
from memnas_jax.space import Skeleton
from memnas_jax.template import RoundTemplate

CANDIDATE_CHECKPOINT_DIR = "candidate_checkpoints"


TrainFn = Callable[[Architecture, Skeleton, jax.Array], train_lib.TrainResult]


AUTO_MAX_PACK = 16  # packing "auto" on an accelerator: the largest pack before memory sizing


class CandidateTrainer:
    """The search's trainer: `train.train_candidate` with `config.train` on the dataset.
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

    def __call__(self, arch: Architecture, skeleton: Skeleton, key: jax.Array,
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

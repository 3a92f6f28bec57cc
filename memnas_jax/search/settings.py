"""The search's settings, frozen and checked once (`SearchSettings.from_config(config)`): every
module of the search reads them, never the ConfigDict. The dataclass defaults are the defaults of
`default_config`; a missing section or field keeps its default."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from memnas_jax import controller as controller_lib
from memnas_jax import data as data_lib
from memnas_jax import distributed as distributed_lib
from memnas_jax import packed as packed_lib
from memnas_jax import preemption
from memnas_jax import settings as settings_lib
from memnas_jax import train as train_lib
from memnas_jax.encoding import NUM_OPS
from memnas_jax.errors import ConfigError
from memnas_jax.grow_trim import GrowTrimOptions
from memnas_jax.memory import CONVENTIONS
from memnas_jax.reward import RewardConfig
from memnas_jax.search.seeds import derive_seed
from memnas_jax.settings import check_choice, check_int

ROUND0_SELECTIONS = ("accuracy", "median_reward")
# The config's sections; its other top-level fields are the seed and `RunSettings`.
SECTIONS = ("search", "memory", "reward", "grow_trim", "controller", "train", "parallel",
            "output", "data", "skeleton", "distributed")
CONTROLLER_TARGETS = ("reward", "accuracy")
ACCURACY_METRICS = ("best_val_accuracy", "final_val_accuracy", "test_accuracy")
PACKING_MODES = ("auto", "packed", "standalone")
RANKINGS = ("controller", "random")


@dataclasses.dataclass(frozen=True)
class SearchRules:
    """config.search: the rounds, what they train, how they select and when the search stops."""

    max_rounds: int = 13  # rounds, round 0 included (the paper's lambda=0.5 search ran 13)
    max_cells: int = 14  # cell cap per block: stop once the base has it in every block
    full_train_rounds: int = 2  # rounds that train every candidate (the controller's first data)
    full_train_cap: int = 0  # > 0: train a seeded sample of at most this many in those rounds
    top_k: int = 100  # candidates the controller picks for training in later rounds
    round0_selection: str = "accuracy"  # or "median_reward" (search package docstring)
    controller_target: str = "reward"  # or "accuracy"
    stop_when_no_improvement: bool = True
    # Stop when this many candidates in a row ran out of device memory (0 = never): the batch,
    # not the candidates, is too large for the device.
    max_consecutive_oom: int = 5
    # > 0: stop at the first round boundary after this much wall time (all runs of the search
    # together); rerun with a larger budget to continue exactly where it stopped.
    time_budget_minutes: float = 0.0
    accuracy_metric: str = "best_val_accuracy"  # or "final_val_accuracy", "test_accuracy"
    evaluate_test: bool = False  # also evaluate each candidate on the test split
    reuse_trained: bool = True  # a candidate met again in a later round keeps its results
    candidate_checkpoints: bool = False  # checkpoint candidates (train.checkpoint_every_epochs)
    # Which top_k candidates later rounds train: "controller" (its ranking, the method) or
    # "random" (a seeded sample of the same grow-trim candidates, the same number: the
    # random-search control of Li and Talwalkar 2019 / Yang et al. 2020).
    ranking: str = "controller"

    @property
    def time_budget_seconds(self) -> float:
        return 60.0 * self.time_budget_minutes

    def check(self) -> None:
        check_choice(self.ranking, RANKINGS, "config.search.ranking")
        for name, minimum in (("max_rounds", 1), ("max_cells", 1), ("full_train_rounds", 0),
                              ("full_train_cap", 0), ("top_k", 1), ("max_consecutive_oom", 0)):
            check_int(getattr(self, name), f"config.search.{name}", minimum)
        if not self.time_budget_minutes >= 0:
            raise ConfigError("config.search.time_budget_minutes must be >= 0 (0 = no budget), "
                              f"got {self.time_budget_minutes!r}")
        check_choice(self.round0_selection, ROUND0_SELECTIONS, "config.search.round0_selection")
        check_choice(self.controller_target, CONTROLLER_TARGETS, "config.search.controller_target")
        check_choice(self.accuracy_metric, ACCURACY_METRICS, "config.search.accuracy_metric")
        if self.accuracy_metric == "test_accuracy" and not self.evaluate_test:
            raise ConfigError("config.search.accuracy_metric = 'test_accuracy' needs "
                              "config.search.evaluate_test = True")


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    # The working memory the reward and the budget use: "paper" (the lifetime figure's liveness
    # peak, the default: faithful), "strict" or "deployed" (TFLite Micro's planned arena of
    # the exported network: what a device allocates). Records keep paper and deployed.
    convention: str = "paper"
    budget_mb: float = 0.0  # > 0: drop candidates whose total memory exceeds this (1 MB = 1e6 B)

    def check(self) -> None:
        check_choice(self.convention, CONVENTIONS, "config.memory.convention")
        if not self.budget_mb >= 0:
            raise ConfigError(f"config.memory.budget_mb must be >= 0 (0 = no budget), got "
                              f"{self.budget_mb!r}")


@dataclasses.dataclass(frozen=True)
class GrowTrimSettings:
    """config.grow_trim: `grow_trim.GrowTrimOptions` with the combines of round 0 apart."""

    round0_combine_modes: tuple[str, ...] = ("add", "concat")  # the authors' 98 round-0 networks
    combine_modes: tuple[str, ...] = ("add",)  # later rounds (the authors' round 2 on)
    growth: str = "all_blocks"  # or "per_block"
    trim_ops: bool = True
    trim_edges: bool = True
    ops: tuple[int | str, ...] = tuple(range(NUM_OPS))  # op indices or names
    merge_mirrored_cells: bool = False


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """How the work is spread; results do not depend on it (a work directory resumes with
    other values)."""

    candidate_groups: int = 1  # > 1: train this many candidates at once on disjoint device groups
    # Candidates compiled in background threads while one trains (candidate_groups = 1):
    # -1 = auto (compile_ahead.auto_depth: one per 4 host cores, 1 to 4), 0 = off.
    compile_ahead: int = -1
    # Train a round's candidates packed into one compiled program (memnas_jax.packed): "auto"
    # (standalone on every backend until a measurement shows packing winning on one:
    # search.training.PACKING_WINS_ON), "packed" or "standalone". Packed candidates start
    # from other draws of the same initialisers, so the choice is recorded in each round and
    # kept when it resumes.
    packing: str = "auto"
    pack_size: int = 0  # candidates per pack; 0 = auto (1 on a CPU, else sized to device memory)
    pack_selection: str = "auto"  # "select" (vmap), "switch" (pack size 1) or "auto"

    def check(self) -> None:
        check_int(self.candidate_groups, "config.parallel.candidate_groups", 1)
        check_int(self.compile_ahead, "config.parallel.compile_ahead", -1)
        check_choice(self.packing, PACKING_MODES, "config.parallel.packing")
        check_int(self.pack_size, "config.parallel.pack_size", 0)
        check_choice(self.pack_selection, ("auto", *packed_lib.SELECTIONS),
                     "config.parallel.pack_selection")
        if self.packing == "packed" and self.candidate_groups > 1:
            raise ConfigError("config.parallel.packing = 'packed' trains one pack on all "
                              "devices: set parallel.candidate_groups = 1, or packing = "
                              "'standalone'")
        if self.pack_selection == "switch" and self.pack_size > 1:
            raise ConfigError("config.parallel.pack_selection = 'switch' runs one candidate at "
                              "a time: set parallel.pack_size = 1 (or 0), or pack_selection = "
                              "'select'")


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    progress_bar: bool = True
    plots: bool = True
    tensorboard: bool = True
    leaderboard_rows: int = 20


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The config's top-level fields other than the seed: how this process runs the search."""

    resume_with_changed_config: bool = False  # resume a workdir made with another config anyway
    host_device_count: int = 0  # > 0: this many XLA CPU devices (set before JAX starts)
    cpu_ynn_fusions: bool = False  # keep XLA:CPU's YNNPACK fusions (~6x slower convs here)
    # GPU: XLA's deterministic ops, so that exact resume holds on a GPU too (docs/reliability.md)
    gpu_deterministic: bool = False
    # SIGTERM / Ctrl-C: stop after the current step, save, exit 75; at the latest after this
    preemption_grace_seconds: float = preemption.DEFAULT_GRACE_SECONDS

    def check(self) -> None:
        check_int(self.host_device_count, "config.host_device_count", 0)
        if not self.preemption_grace_seconds > 0:
            raise ConfigError("config.preemption_grace_seconds must be > 0, got "
                              f"{self.preemption_grace_seconds!r}")


def controller_vocab_sizes(num_blocks: int, max_cells: int) -> tuple[int, ...]:
    """Vocabulary of each `Architecture.to_tokens()` field up to the cell cap (fixed, so that a
    warm start never meets a token it has no embedding for): block, position, input1, input2,
    op1, op2 (7 = removed), linked, concat."""
    return (num_blocks, max_cells, max_cells + 1, max_cells + 1, NUM_OPS + 1, NUM_OPS + 1, 2, 2)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Everything the search reads, made once from the config at its entry (`from_config`)."""

    seed: int
    search: SearchRules
    memory: MemorySettings
    reward: RewardConfig
    grow_trim: GrowTrimSettings
    controller: controller_lib.ControllerConfig  # seed and vocabulary set per fit
    train: train_lib.TrainSettings
    parallel: ParallelSettings
    output: OutputSettings
    data: data_lib.DataSettings = data_lib.DataSettings()
    skeleton: train_lib.SkeletonSettings = train_lib.SkeletonSettings()
    distributed: distributed_lib.DistributedSettings = distributed_lib.DistributedSettings()
    run: RunSettings = RunSettings()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> SearchSettings:
        """The settings of a search config, checked: a wrong field, type or value raises
        `ConfigError` naming the field."""
        get = config.get
        sections = dict(
            search=settings_lib.from_config(SearchRules, get("search"), "config.search"),
            memory=settings_lib.from_config(MemorySettings, get("memory"), "config.memory"),
            grow_trim=settings_lib.from_config(GrowTrimSettings, get("grow_trim"),
                                               "config.grow_trim"),
            parallel=settings_lib.from_config(ParallelSettings, get("parallel"),
                                              "config.parallel"),
            output=settings_lib.from_config(OutputSettings, get("output"), "config.output"))
        for section in ("search", "memory", "parallel"):
            sections[section].check()
        try:
            reward = RewardConfig(**dict(get("reward") or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.reward: {e}") from None
        try:
            controller = controller_lib.ControllerConfig(**dict(get("controller") or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.controller: {e}") from None
        seed = get("seed", 0)
        check_int(seed, "config.seed", 0)
        top_level = {k: v for k, v in config.items() if k not in SECTIONS}
        run = settings_lib.from_config(RunSettings, top_level, "config", skip=("seed",))
        run.check()
        settings = cls(seed=seed, reward=reward, controller=controller,
                       train=train_lib.TrainSettings.from_config(get("train") or {},
                                                                 "config.train"),
                       data=data_lib.DataSettings.from_config(get("data")),
                       skeleton=train_lib.SkeletonSettings.from_config(get("skeleton")),
                       distributed=distributed_lib.DistributedSettings.from_config(
                           get("distributed")),
                       run=run, **sections)
        settings.grow_trim_options(0)
        settings.grow_trim_options(1)
        settings.controller_config(0)
        return settings

    def grow_trim_options(self, round_index: int) -> GrowTrimOptions:
        g = self.grow_trim
        try:
            return GrowTrimOptions(
                combine_modes=g.round0_combine_modes if round_index == 0 else g.combine_modes,
                growth=g.growth, trim_ops=g.trim_ops, trim_edges=g.trim_edges,
                max_cells=self.search.max_cells, ops=g.ops,
                merge_mirrored_cells=g.merge_mirrored_cells)
        except ValueError as e:
            raise ConfigError(f"config.grow_trim: {e}") from None

    def controller_config(self, round_index: int, num_blocks: int = 5
                          ) -> controller_lib.ControllerConfig:
        """The controller settings of the fit after `round_index`, its seed derived from it."""
        try:
            return dataclasses.replace(
                self.controller, seed=derive_seed(self.seed, "controller", round_index),
                vocab_sizes=controller_vocab_sizes(num_blocks, self.search.max_cells))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.controller: {e}") from None


def search_defaults() -> dict[str, Any]:
    """The sections of `default_config` that are settings here, from the dataclass defaults."""
    controller = controller_lib.ControllerConfig().to_dict()
    del controller["seed"], controller["vocab_sizes"]  # derived from seed / search.max_cells
    return dict(search=settings_lib.to_config(SearchRules()),
                memory=settings_lib.to_config(MemorySettings()),
                reward=settings_lib.to_config(RewardConfig()),
                grow_trim=settings_lib.to_config(GrowTrimSettings()),
                controller=ml_collections.ConfigDict(controller),
                parallel=settings_lib.to_config(ParallelSettings()),
                output=settings_lib.to_config(OutputSettings()))

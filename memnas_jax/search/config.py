"""The search's configuration: defaults, validation, accessors and the resume fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import ml_collections

from memnas_jax import controller as controller_lib
from memnas_jax import distributed, preemption
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.encoding import NUM_OPS
from memnas_jax.errors import UserError
from memnas_jax.grow_trim import GrowTrimOptions
from memnas_jax.memory import CONVENTIONS
from memnas_jax.reward import RewardConfig
from memnas_jax.search.seeds import derive_seed

ROUND0_SELECTIONS = ("accuracy", "median_reward")


CONTROLLER_TARGETS = ("reward", "accuracy")


ACCURACY_METRICS = ("best_val_accuracy", "final_val_accuracy", "test_accuracy")


# Config fields that change no result, so a workdir may be resumed with other values.
RUN_ONLY_FIELDS = ("resume_with_changed_config", "preemption_grace_seconds", "output",
                   "data.download",
                   "search.time_budget_minutes", "search.max_consecutive_oom",
                   "train.compilation_cache_dir",
                   "train.eval_compiler_options", "train.host_threads", "parallel",
                   "distributed")


class ConfigMismatchError(UserError, ValueError):
    """The work directory holds a search made with another config."""


def default_config() -> ml_collections.ConfigDict:
    """The authors' CIFAR-10 search as far as known (docs/method.md §1, §7, §8): 13 rounds, the
    first two fully trained, top-100 from the controller after, lambda 0.5, 150-epoch candidates
    (train.default_config). Presets live in experiments/configs/."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resume_with_changed_config = False  # resume a workdir made with another config anyway
    c.host_device_count = 0  # > 0: this many XLA CPU devices (set by the experiment mains)
    c.cpu_ynn_fusions = False  # keep XLA:CPU's YNNPACK fusions (~6x slower convs on our CPUs)
    # SIGTERM / Ctrl-C: stop after the current step, save, exit 75; at the latest after this
    c.preemption_grace_seconds = preemption.DEFAULT_GRACE_SECONDS
    trainer = train_lib.default_config()
    c.data = trainer.data
    c.skeleton = trainer.skeleton
    del trainer["data"], trainer["skeleton"]
    trainer.compilation_cache_dir = train_lib.AUTO_CACHE  # <workdir>/xla_cache
    c.train = trainer
    c.grow_trim = ml_collections.ConfigDict(dict(
        round0_combine_modes=("add", "concat"),  # the authors' 98 round-0 networks
        combine_modes=("add",),  # later rounds (the authors' round 2 on)
        growth="all_blocks",  # or "per_block"
        trim_ops=True,
        trim_edges=True,
        ops=tuple(range(NUM_OPS)),
        merge_mirrored_cells=False,
    ))
    c.reward = ml_collections.ConfigDict(dict(lam=0.5, param_weight=0.3, working_weight=0.7))
    c.memory = ml_collections.ConfigDict(dict(
        convention="paper",  # working-memory liveness convention: "paper" or "strict"
        budget_mb=0.0,  # > 0: drop candidates whose total memory exceeds this (1 MB = 1e6 B)
    ))
    c.search = ml_collections.ConfigDict(dict(
        max_rounds=13,  # rounds, round 0 included (the paper's lambda=0.5 search ran 13)
        max_cells=14,  # cell cap per block: stop once the base has it in every block
        full_train_rounds=2,  # rounds that train every candidate (the controller's first data)
        full_train_cap=0,  # > 0: train a seeded sample of at most this many in those rounds
        top_k=100,  # candidates the controller picks for training in later rounds
        round0_selection="accuracy",  # or "median_reward" (module docstring)
        controller_target="reward",  # or "accuracy"
        stop_when_no_improvement=True,
        # Stop when this many candidates in a row ran out of device memory (0 = never): the
        # batch, not the candidates, is too large for the device.
        max_consecutive_oom=5,
        # > 0: stop at the first round boundary after this much wall time (all runs of the
        # search together); rerun with a larger budget to continue exactly where it stopped.
        time_budget_minutes=0.0,
        accuracy_metric="best_val_accuracy",  # or "final_val_accuracy", "test_accuracy"
        evaluate_test=False,  # also evaluate each candidate on the test split
        reuse_trained=True,  # a candidate met again in a later round keeps its results
        candidate_checkpoints=False,  # checkpoint candidates (train.checkpoint_every_epochs)
    ))
    ctrl = controller_lib.ControllerConfig().to_dict()
    del ctrl["seed"], ctrl["vocab_sizes"]  # derived from config.seed / search.max_cells
    c.controller = ml_collections.ConfigDict(ctrl)
    c.output = ml_collections.ConfigDict(dict(
        progress_bar=True, plots=True, tensorboard=True, leaderboard_rows=20))
    # How the work is spread; results do not depend on it (so resuming with other values is fine).
    c.parallel = ml_collections.ConfigDict(dict(
        candidate_groups=1,  # > 1: train this many candidates at once on disjoint device groups
        # Candidates compiled in background threads while one trains (candidate_groups = 1):
        # -1 = auto (compile_ahead.auto_depth: one per 4 host cores, 1 to 4), 0 = off.
        compile_ahead=-1,
        # Train a round's candidates packed into one compiled program (memnas_jax.packed):
        # "auto" (packed on GPU/TPU, standalone on a CPU: README, "Packed training"),
        # "packed" or "standalone". Packed candidates start from other draws of the same
        # initialisers, so the choice is recorded in each round and kept when it resumes.
        packing="auto",
        pack_size=0,  # candidates per pack; 0 = auto (1 on a CPU, else sized to device memory)
        pack_selection="auto",  # "select" (vmap), "switch" (pack size 1) or "auto"
    ))
    c.distributed = distributed.default_config()  # multi-process job layout ("" = auto)
    return c


def _check_choice(value: Any, allowed: Sequence[Any], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name} = {value!r} is not one of {tuple(allowed)}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}")


def candidate_groups(config: ml_collections.ConfigDict) -> int:
    """config.parallel.candidate_groups (1 in configs made before the field existed)."""
    return (config.get("parallel") or {}).get("candidate_groups", 1)


def compile_ahead(config: ml_collections.ConfigDict) -> int:
    """config.parallel.compile_ahead (0 in configs made before the field existed)."""
    return (config.get("parallel") or {}).get("compile_ahead", 0)


PACKING_MODES = ("auto", "packed", "standalone")


def packing_options(config: ml_collections.ConfigDict) -> tuple[str, int, str]:
    """(packing, pack_size, pack_selection) of config.parallel (standalone in configs made
    before the fields existed)."""
    parallel = config.get("parallel") or {}
    return (parallel.get("packing", "standalone"), parallel.get("pack_size", 0),
            parallel.get("pack_selection", "auto"))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for settings no search could run with."""
    s = config.search
    for name, minimum in (("max_rounds", 1), ("max_cells", 1), ("full_train_rounds", 0),
                          ("full_train_cap", 0), ("top_k", 1)):
        _check_int(s[name], f"search.{name}", minimum)
    _check_int(config.seed, "seed", 0)
    if not time_budget_seconds(config) >= 0:
        raise ValueError("config.search.time_budget_minutes must be >= 0 (0 = no budget), got "
                         f"{config.search.time_budget_minutes!r}")
    _check_int(candidate_groups(config), "parallel.candidate_groups", 1)
    _check_int(compile_ahead(config), "parallel.compile_ahead", -1)
    mode, pack_size, selection = packing_options(config)
    _check_choice(mode, PACKING_MODES, "parallel.packing")
    _check_int(pack_size, "parallel.pack_size", 0)
    _check_choice(selection, ("auto", *packed_lib.SELECTIONS), "parallel.pack_selection")
    if mode == "packed" and candidate_groups(config) > 1:
        raise ValueError("config.parallel.packing = 'packed' trains one pack on all devices: "
                         "set parallel.candidate_groups = 1, or packing = 'standalone'")
    if selection == "switch" and pack_size > 1:
        raise ValueError("config.parallel.pack_selection = 'switch' runs one candidate at a "
                         "time: set parallel.pack_size = 1 (or 0), or pack_selection = 'select'")
    _check_choice(s.round0_selection, ROUND0_SELECTIONS, "search.round0_selection")
    _check_choice(s.controller_target, CONTROLLER_TARGETS, "search.controller_target")
    _check_choice(s.accuracy_metric, ACCURACY_METRICS, "search.accuracy_metric")
    if s.accuracy_metric == "test_accuracy" and not s.evaluate_test:
        raise ValueError("config.search.accuracy_metric = 'test_accuracy' needs "
                         "config.search.evaluate_test = True")
    _check_choice(config.memory.convention, CONVENTIONS, "memory.convention")
    if not config.memory.budget_mb >= 0:
        raise ValueError(f"config.memory.budget_mb must be >= 0 (0 = no budget), got "
                         f"{config.memory.budget_mb!r}")
    reward_config_of(config)
    grow_trim_options(config, 0)
    grow_trim_options(config, 1)
    controller_config(config, 0)
    train_lib.check_config(config.train, "config.train")


def reward_config_of(config: ml_collections.ConfigDict) -> RewardConfig:
    """config.reward as the reward's frozen settings (validated there)."""
    return RewardConfig(**config.reward)


def grow_trim_options(config: ml_collections.ConfigDict, round_index: int) -> GrowTrimOptions:
    g = config.grow_trim
    modes = g.round0_combine_modes if round_index == 0 else g.combine_modes
    try:
        return GrowTrimOptions(combine_modes=tuple(modes), growth=g.growth,
                               trim_ops=g.trim_ops, trim_edges=g.trim_edges,
                               max_cells=config.search.max_cells, ops=tuple(g.ops),
                               merge_mirrored_cells=g.merge_mirrored_cells)
    except ValueError as e:
        raise ValueError(f"config.grow_trim: {e}") from None


def controller_vocab_sizes(num_blocks: int, max_cells: int) -> tuple[int, ...]:
    """Vocabulary of each `Architecture.to_tokens()` field up to the cell cap (fixed, so that a
    warm start never meets a token it has no embedding for): block, position, input1, input2,
    op1, op2 (7 = removed), linked, concat."""
    return (num_blocks, max_cells, max_cells + 1, max_cells + 1, NUM_OPS + 1, NUM_OPS + 1, 2, 2)


def controller_config(config: ml_collections.ConfigDict, round_index: int,
                      num_blocks: int = 5) -> controller_lib.ControllerConfig:
    """The controller settings of the fit after `round_index`, its seed derived from it."""
    values = dict(config.controller.to_dict())
    try:
        return controller_lib.ControllerConfig(
            **values, seed=derive_seed(config.seed, "controller", round_index),
            vocab_sizes=controller_vocab_sizes(num_blocks, config.search.max_cells))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.controller: {e}") from None


def to_plain(value: Any) -> Any:
    """JSON-ready copy of a config value (ConfigDicts and tuples become dicts and lists)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_fingerprint(config: ml_collections.ConfigDict) -> tuple[dict, str]:
    """(the config's result-relevant fields flattened, their SHA-256): what a workdir is bound
    to. `RUN_ONLY_FIELDS` (output options, caches) are left out."""
    flat = _flatten(to_plain(config))
    relevant = {k: v for k, v in flat.items()
                if not any(k == f or k.startswith(f + ".") for f in RUN_ONLY_FIELDS)}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return relevant, hashlib.sha256(text.encode()).hexdigest()


def config_diff(old: dict, new: dict, limit: int = 12) -> str:
    keys = sorted(set(old) | set(new))
    changes = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def time_budget_seconds(config: ml_collections.ConfigDict) -> float:
    return 60.0 * float(config.search.get("time_budget_minutes", 0.0) or 0.0)

"""The search's config: `default_config`, the fingerprint that binds a work directory to it, and
`check_config` (its `SearchSettings`, memnas_jax/search/settings.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from memnas_jax import distributed
from memnas_jax import train as train_lib
from memnas_jax.errors import UserError
from memnas_jax.search.settings import RunSettings, SearchSettings, search_defaults

# Config fields that change no result, so a workdir may be resumed with other values.
# Fields added after work directories existed, with their defaults: left out of the fingerprint
# while at the default, so that those work directories still resume as they are.
ADDED_FIELDS = {"search.ranking": "controller", "gpu_deterministic": False}
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
    (train.default_config). The sections' fields and defaults are those of `SearchSettings`'
    dataclasses (memnas_jax/search/settings.py); presets live in experiments/configs/."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.update(dataclasses.asdict(RunSettings()))  # the top-level fields (search/settings.py)
    trainer = train_lib.default_config()
    c.data = trainer.data
    c.skeleton = trainer.skeleton
    del trainer["data"], trainer["skeleton"]
    trainer.compilation_cache_dir = train_lib.AUTO_CACHE  # <workdir>/xla_cache
    c.train = trainer
    c.update(search_defaults())
    c.distributed = distributed.default_config()  # multi-process job layout ("" = auto)
    return c


def check_config(config: ml_collections.ConfigDict) -> SearchSettings:
    """The config's `SearchSettings` (ConfigError naming the field for settings no search could
    run with)."""
    return SearchSettings.from_config(config)


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
                if not any(k == f or k.startswith(f + ".") for f in RUN_ONLY_FIELDS)
                and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return relevant, hashlib.sha256(text.encode()).hexdigest()


def config_diff(old: dict, new: dict, limit: int = 12) -> str:
    keys = sorted(set(old) | set(new))
    changes = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more

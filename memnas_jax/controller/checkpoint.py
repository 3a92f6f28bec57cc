"""A controller's files: its config and vocabulary as JSON, its parameters as msgpack, both
checksummed and written atomically."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from memnas_jax.controller.config import ControllerConfig, ControllerState
from memnas_jax.controller.programs import programs_for
from memnas_jax.io import atomic_write

CHECKPOINT_FORMAT = "memnas_jax.controller/v2"
META_FILE = "controller.json"
PARAMS_FILE = "params.msgpack"


def save(state: ControllerState, path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Writes `params.msgpack` (flax serialization of the parameters) and `controller.json`
    (config, vocabulary, target scaling), each atomically.

    Plain host files rather than an orbax checkpoint: the controller is small and replicated
    on every process, and orbax refuses host-local arrays in a multi-process job. In a
    multi-process search only process 0 calls this."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    params = serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(
        state.params)))
    meta = {"format": CHECKPOINT_FORMAT, "config": state.config.to_dict(),
            "vocab_sizes": list(state.vocab_sizes), "target_mean": state.target_mean,
            "target_scale": state.target_scale, "steps": state.steps,
            "holdout_tau": None if np.isnan(state.holdout_tau) else state.holdout_tau,
            "params_sha256": hashlib.sha256(params).hexdigest()}
    atomic_write(path / PARAMS_FILE, params)
    atomic_write(path / META_FILE, json.dumps(meta, indent=1))
    return path


def restore(path: str | pathlib.Path) -> ControllerState:
    """Reads a controller written by `save`. Raises ValueError naming the file for a missing,
    truncated or mismatched checkpoint."""
    path = pathlib.Path(path).absolute()
    meta_path, params_path = path / META_FILE, path / PARAMS_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: not a controller saved by "
                                "memnas_jax.controller.save")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")
    config = ControllerConfig.from_dict(meta["config"])
    vocab_sizes = tuple(meta["vocab_sizes"])
    data = params_path.read_bytes() if params_path.exists() else b""
    if hashlib.sha256(data).hexdigest() != meta.get("params_sha256"):
        raise ValueError(f"{params_path} is missing or corrupt (checksum mismatch)")
    abstract = jax.eval_shape(programs_for(config, vocab_sizes).init_params, jax.random.key(0))
    loaded = serialization.msgpack_restore(data)
    if jax.tree.structure(loaded) != jax.tree.structure(abstract) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(loaded),
                                                   jax.tree.leaves(abstract))):
        raise ValueError(f"{params_path} does not hold the parameters of its controller.json")
    params = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), loaded, abstract)
    holdout_tau = meta["holdout_tau"]
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=params,
                           target_mean=meta["target_mean"], target_scale=meta["target_scale"],
                           steps=meta["steps"],
                           holdout_tau=float("nan") if holdout_tau is None else holdout_tau)

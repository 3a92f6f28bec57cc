"""Checkpoints of a training run with orbax: the whole train state every N epochs
(`save_checkpoint`; `restore_latest` deletes an unreadable newest one and falls back to the one
before) and the mid-epoch snapshot a run stopped on request resumes from step for step
(`save_snapshot`, `restore_snapshot`). States are any flax struct of arrays (`train.TrainState`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from memnas_jax import sharding
from memnas_jax.errors import UserError, first_line


def checkpoint_manager(directory: str, keep: int):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager, state: Any, history: list[dict]) -> None:
    import orbax.checkpoint as ocp
    epoch = int(jax.device_get(state.epoch))
    if epoch in manager.all_steps():  # a rerun of a finished run; orbax refuses to overwrite
        return
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_dict(state)),
        history=ocp.args.JsonSave({"epochs": history})))
    # The next train step donates (frees) the state's buffers: let the save finish reading them.
    manager.wait_until_finished()


def state_dict(state: Any) -> dict:
    """The state as a plain dict: what the checkpoint holds."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def restore_latest(manager, template: Any) -> tuple[Any | None, list, str]:
    """The newest readable checkpoint (state, history, message). Unreadable ones are reported in
    the message and deleted, so the rerun can save that epoch again."""
    import orbax.checkpoint as ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_dict(template))
    notes = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
            state = type(template)(**restored["state"])
            history = list(restored["history"]["epochs"])
            if int(jax.device_get(state.epoch)) != step or len(history) != step:
                raise ValueError(f"holds epoch {int(state.epoch)} and {len(history)} history "
                                 "entries")
        except Exception as e:  # orbax/tensorstore raise many
            notes.append(f"checkpoint at epoch {step} is unreadable "
                         f"({type(e).__name__}: {first_line(e)}); deleted it")
            logging.warning("%s", notes[-1])
            manager.delete(step)
            continue
        notes.append(f"resumed from the checkpoint at epoch {step}")
        return state, history, "; ".join(notes)
    return None, [], "; ".join(notes)


def restore_variables(checkpoint_dir: str | os.PathLike) -> tuple[dict, int]:
    """({"params", "batch_stats"}, epoch) of the newest checkpoint in `checkpoint_dir`, on one
    device whatever mesh saved it (for export and inference). A missing or unreadable
    checkpoint raises a one-line `UserError`."""
    import pathlib

    import orbax.checkpoint as ocp
    folder = pathlib.Path(checkpoint_dir)
    steps = sorted((int(p.name) for p in folder.glob("*") if p.name.isdigit()), reverse=True)
    if not steps:
        raise UserError(f"no checkpoint in {folder} (train with experiments/train_final.py "
                        "first; its checkpoints are in <workdir>/checkpoints)")
    path = folder / str(steps[0]) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        checkpointer = ocp.StandardCheckpointer()
        tree = checkpointer.metadata(path).item_metadata
        tree = getattr(tree, "tree", tree)
        abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                  sharding=device), tree)
        state = checkpointer.restore(path, abstract)
    except Exception as e:  # orbax/tensorstore raise many
        raise UserError(f"the checkpoint {path} is unreadable ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, int(
        state["epoch"])


PREEMPTED_DIR = "preempted"  # inside checkpoint_dir: the mid-epoch snapshot of a stopped run


def save_snapshot(directory: str, state: Any, metrics: dict, history: list[dict]
                   ) -> None:
    """The state in the middle of an epoch, with the epoch's running metrics: what a run stopped
    on request (`memnas_jax.preemption`) resumes from, step for step."""
    import orbax.checkpoint as ocp
    manager = checkpoint_manager(directory, 1)
    try:
        step = int(jax.device_get(state.step))
        if step not in manager.all_steps():
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_dict(state)),
                running=ocp.args.StandardSave(metrics),
                history=ocp.args.JsonSave({"epochs": history})))
        manager.wait_until_finished()
    finally:
        manager.close()


def restore_snapshot(directory: str, template: Any, mesh
                      ) -> tuple[Any, dict, list] | None:
    """The mid-epoch snapshot, if there is a readable one (an unreadable one is deleted)."""
    import orbax.checkpoint as ocp
    if not os.path.isdir(directory):
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_dict(template))
    metrics = {"loss_sum": jax.ShapeDtypeStruct((), jnp.float32),
               "steps": jax.ShapeDtypeStruct((), jnp.int32)}
    manager = checkpoint_manager(directory, 1)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    running=ocp.args.StandardRestore(metrics), history=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many
                logging.warning("the mid-epoch snapshot at step %d is unreadable (%s); using the "
                                "epoch checkpoints", step, first_line(e))
                manager.delete(step)
                continue
            return (type(template)(**restored["state"]),
                    sharding.replicate(jax.device_get(restored["running"]), mesh),
                    list(restored["history"]["epochs"]))
        return None
    finally:
        manager.close()


__all__ = ["PREEMPTED_DIR", "checkpoint_manager", "restore_latest", "restore_snapshot",
           "restore_variables",
           "save_checkpoint", "save_snapshot", "state_dict"]

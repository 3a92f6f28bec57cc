"""Accuracy of a train state on a split: the validation and test splits stacked on the device, or
streamed from the host."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from memnas_jax import data as data_lib
from memnas_jax import dispatch, sharding
from memnas_jax.train.steps import TrainState


def eval_splits(data: data_lib.Dataset) -> list[data_lib.ArraySplit]:
    return [s for s in (data.validation, data.test) if isinstance(s, data_lib.ArraySplit)]


@dataclasses.dataclass(frozen=True)
class EvalArrays:
    """The validation and test splits, each padded to whole batches and stacked into one
    (batches, B, ...) batch-sharded array, so one compiled program evaluates both."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    batches: Mapping[int, tuple[int, int]]  # id(split) -> (first batch, number of batches)


def eval_arrays(splits: list[data_lib.ArraySplit], batch_size: int, mesh) -> EvalArrays:
    images, labels, masks, batches, first = [], [], [], {}, 0
    for split in splits:
        n = len(split)
        count = -(-n // batch_size)
        pad = count * batch_size - n
        images.append(np.concatenate([split.images,
                                      np.zeros((pad, *split.images.shape[1:]), np.uint8)]))
        labels.append(np.concatenate([split.labels, np.zeros(pad, np.int32)]))
        masks.append(np.arange(count * batch_size) < n)
        batches[id(split)] = (first, count)
        first += count

    def stacked(parts):
        return np.concatenate(parts).reshape(first, batch_size, *parts[0].shape[1:])
    arrays = jax.device_put((stacked(images), stacked(labels), stacked(masks)),
                            sharding.stacked_batch_sharded(mesh))
    return EvalArrays(*arrays, batches=batches)


def scalars(mesh, **values: Any) -> dict:
    """Replicated scalar accumulators, made on the host (no compile)."""
    return sharding.replicate({k: np.asarray(v) for k, v in values.items()}, mesh)


class Evaluator:
    """Accuracy of the current state on a split (device-resident or streamed), with the
    candidate's one compiled evaluation program. For a pack (`memnas_jax.packed`), the program
    also takes the pack's codes and counts per candidate: `pack_size` and `codes`."""

    def __init__(self, eval_step, data: data_lib.Dataset, config, mesh, *,
                 pack_size: int | None = None, codes: Any = None):
        self._step, self._data, self._mesh = eval_step, data, mesh
        self._batch, self._threads = config.eval_batch_size, config.host_threads
        self._rows = sharding.process_batch_rows(mesh, config.eval_batch_size)  # streamed splits
        self._arrays: EvalArrays | None = None
        self._pack_size, self._codes = pack_size, codes

    def accuracy(self, state: TrainState, split: data_lib.Split) -> float:
        return float(self._correct(state, split)) / len(split)

    def pack_accuracies(self, state: TrainState, split: data_lib.ArraySplit) -> list[float]:
        """Each packed candidate's accuracy on a resident split."""
        return [int(x) / len(split) for x in self._correct(state, split)]

    def _correct(self, state: TrainState, split: data_lib.Split) -> np.ndarray:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        resident = isinstance(split, data_lib.ArraySplit)
        if resident and self._arrays is None:
            self._arrays = eval_arrays(eval_splits(self._data), self._batch, self._mesh)
        # Resident splits: the program reads batch `batches` of the stacked arrays.
        first, count = self._arrays.batches[id(split)] if resident else (0, 0)
        shape = () if self._pack_size is None else (self._pack_size,)
        totals = scalars(self._mesh, correct=np.zeros(shape, np.int32),
                         loss_sum=np.zeros(shape, np.float32), batches=np.int32(first))
        codes = () if self._codes is None else (self._codes,)
        in_flight = dispatch.InFlight()
        if resident:
            a = self._arrays
            for _ in range(count):
                totals = in_flight.add(self._step(variables, totals, *codes, a.images, a.labels,
                                                  a.mask))
        else:
            for batch in data_lib.host_batches(split, self._batch, seed=0, epoch=0, train=False,
                                               rows=self._rows, num_threads=self._threads):
                totals = in_flight.add(self._step(
                    variables, totals, *codes,
                    *sharding.host_batch_to_global(batch, self._mesh, self._batch)))
        return np.asarray(jax.device_get(totals["correct"]))

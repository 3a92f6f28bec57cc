"""What training one candidate gives: `TrainResult`, and the failed result of an error."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

from memnas_jax.errors import first_line

STATUSES = ("ok", "diverged", "failed")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training one candidate gave. Accuracies are fractions in [0, 1]; None when the split
    was not given (validation, test) or the run stopped before evaluating."""

    status: str  # "ok" | "diverged" | "failed"
    message: str
    best_val_accuracy: float | None
    best_val_epoch: int | None  # 1-based
    final_val_accuracy: float | None
    test_accuracy: float | None
    loss_curve: tuple[float, ...]  # mean training loss of each epoch
    val_accuracy_curve: tuple[float | None, ...]
    epochs_done: int
    resumed_from_epoch: int  # 0 = trained from scratch
    param_count: int
    wall_seconds: float
    compile_seconds: float  # compiling its programs (ahead, in another thread, or here)
    images_per_second: float  # training throughput, compile and evaluation excluded
    epoch_seconds: tuple[float, ...] = ()  # training time of each epoch run here (no compile)
    train_flops_per_image: float | None = None  # XLA's cost_analysis of the train step
    compile_wait_seconds: float = 0.0  # how long training waited for its programs
    failure: str = ""  # status "failed": "out_of_memory" (RESOURCE_EXHAUSTED) or "error"
    variables: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                             repr=False)  # host numpy

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-ready fields (without the variables)."""
        d = dataclasses.asdict(dataclasses.replace(self, variables=None))
        d.pop("variables")
        d["loss_curve"], d["val_accuracy_curve"] = list(self.loss_curve), list(
            self.val_accuracy_curve)
        return d


def from_history(history: Sequence[Mapping[str, Any]], *, status: str, message: str,
                 test_accuracy: float | None, **fields: Any) -> TrainResult:
    """The result of a training whose epochs left `history` (dicts with epoch, train_loss and
    val_accuracy, None when not evaluated): the best and final validation accuracy, the
    curves and the epochs done are read off it the same way for standalone and packed
    training; `fields` are the rest (timings, counts, variables)."""
    val_curve = tuple(h["val_accuracy"] for h in history)
    evaluated = [(acc, h["epoch"]) for acc, h in zip(val_curve, history) if acc is not None]
    best = max(evaluated, key=lambda t: t[0], default=(None, None))
    return TrainResult(
        status=status, message=message, best_val_accuracy=best[0], best_val_epoch=best[1],
        final_val_accuracy=evaluated[-1][0] if evaluated and status == "ok" else None,
        test_accuracy=test_accuracy if status == "ok" else None,
        loss_curve=tuple(h["train_loss"] for h in history), val_accuracy_curve=val_curve,
        epochs_done=sum(1 for h in history if math.isfinite(h["train_loss"])), **fields)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether XLA ran out of device memory (compiling or running): RESOURCE_EXHAUSTED."""
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def failed(message: str, start: float, **known: Any) -> TrainResult:
    fields = dict(best_val_accuracy=None, best_val_epoch=None, final_val_accuracy=None,
                  test_accuracy=None, loss_curve=(), val_accuracy_curve=(), epochs_done=0,
                  resumed_from_epoch=0, param_count=0, compile_seconds=0.0,
                  images_per_second=0.0)
    fields.update(known)
    fields.setdefault("failure", "error")
    return TrainResult(status="failed", message=message,
                       wall_seconds=time.perf_counter() - start, **fields)


def failed_result(error: BaseException, start: float) -> TrainResult:
    """The "failed" result of a candidate whose training raised `error` (started at
    `time.perf_counter()` `start`): out of memory or another error, with the message."""
    return failed(f"{type(error).__name__}: {first_line(error, 2000)}", start,
                  failure="out_of_memory" if is_out_of_memory(error) else "error")

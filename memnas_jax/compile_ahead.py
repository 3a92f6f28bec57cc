"""Compile-ahead: the next candidates compile in background threads while one trains.

Each MemNAS candidate is a new XLA program, and on an accelerator compiling it (with autotuning)
takes longer than training it for a search's few proxy epochs. XLA releases the GIL while it
compiles, so a small thread pool can compile candidates i+1..i+k while the main thread trains
candidate i; the device then waits only when compiling is slower than training.

Compiling never changes a result: the executables are those the trainer would compile itself,
the candidates are still trained one after another, in the same order, with the same keys
(`tests/test_compile_ahead.py` checks the search records against the sequential path).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Callable, Generic, Hashable, Sequence, TypeVar

Item = TypeVar("Item", bound=Hashable)
Programs = TypeVar("Programs")


def auto_depth(cpu_count: int | None = None) -> int:
    """How many candidates to compile ahead when the config says "auto" (-1): one per four host
    cores, at least one (one compile thread beside training wins even on 2 cores: README,
    "Search throughput"), at most four."""
    cores = cpu_count or os.cpu_count() or 1
    return max(1, min(4, cores // 4))


def resolve_depth(depth: int) -> int:
    if depth < -1:
        raise ValueError(f"compile-ahead depth must be >= -1 (-1 = auto), got {depth}")
    return auto_depth() if depth == -1 else depth


class CompileAhead(Generic[Item, Programs]):
    """Compiles `compile_fn(item)` for the items of `order`, at most `depth` ahead of the one the
    caller takes. `take(item)` returns a future of the item's programs (a compile error is
    raised by its `result()`); items must be taken in `order`. depth 0: no threads, `take`
    returns None and the caller compiles itself.

        with CompileAhead(compile_fn, items, depth=2) as ahead:
            for item in items:
                train(item, programs=ahead.take(item))
    """

    def __init__(self, compile_fn: Callable[[Item], Programs], order: Sequence[Item],
                 depth: int):
        if depth < 0:
            raise ValueError(f"compile-ahead depth must be >= 0, got {depth}")
        self._compile_fn, self._order, self._depth = compile_fn, list(order), depth
        self._next = 0  # index in `order` of the next item to submit
        self._futures: dict[Item, concurrent.futures.Future] = {}
        self._pool = (concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="compile")
                      if depth else None)
        self._fill(0)

    def _fill(self, taken: int) -> None:
        """Submits items until `depth` items after position `taken` are compiling or done."""
        while self._pool is not None and self._next < min(len(self._order),
                                                          taken + self._depth + 1):
            item = self._order[self._next]
            self._futures[item] = self._pool.submit(self._compile_fn, item)
            self._next += 1

    def take(self, item: Item) -> concurrent.futures.Future | None:
        """The future of `item`'s programs (submitted now if it was not yet), and the next
        items submitted to keep `depth` ahead."""
        if self._pool is None:
            return None
        position = self._order.index(item)
        self._fill(position)
        return self._futures.pop(item)

    def close(self) -> None:
        """Drops what was compiled ahead and not taken (a search stopped mid-round)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._futures.clear()

    def __enter__(self) -> "CompileAhead[Item, Programs]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CompileAhead", "auto_depth", "resolve_depth"]

"""Bounded asynchronous dispatch: at most a few jitted steps in flight.

JAX returns from a jitted call before the device has run it, so a Python loop can queue
hundreds of steps. With several XLA:CPU host devices and a program holding collectives, a
long queue deadlocks inside XLA (docs/reliability.md, "The CPU collective hang"): the
executions queued for one device hold the client's execution slots while another device's
share of the oldest step waits for one, and the first device waits for it at the all-reduce.
Keeping the queue short costs nothing measurable (the host only needs to stay a step or two
ahead) and holds on every backend.
"""

from __future__ import annotations

from typing import Any

import jax

MAX_STEPS_IN_FLIGHT = 4


class InFlight:
    """Counts dispatched steps and waits for every `limit`-th step's outputs, so that at most
    `limit` steps are queued. (Waiting on older outputs is not possible: the steps donate
    their inputs.)"""

    def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._count = 0

    def add(self, outputs: Any) -> Any:
        """Records a step's outputs (any pytree of arrays); returns them unchanged."""
        self._count += 1
        if self._count % self._limit == 0:
            jax.block_until_ready(outputs)
        return outputs


__all__ = ["InFlight", "MAX_STEPS_IN_FLIGHT"]

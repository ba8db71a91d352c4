"""Dynamic batching: gather items from a queue into batches of at most ``max_batch``,
waiting at most ``max_wait_ms`` after the first item of a batch for more to arrive.

The wait bounds the latency batching adds; the batch size bounds memory and the
runner's input shape. ``max_batch=1`` turns batching off.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import PipelineError

#: Put once per consumer into a queue to say that no more items will come.
END = object()


@dataclass(frozen=True)
class Batching:
    """How many items one inference may take, and how long to wait to fill it."""

    max_batch: int = 8
    max_wait_ms: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise PipelineError(f"batching max_batch is {self.max_batch!r}; expected an int >= 1 (1 = no batching)")
        if not self.max_wait_ms >= 0:
            raise PipelineError(f"batching max_wait_ms is {self.max_wait_ms!r}; expected milliseconds >= 0")

    @classmethod
    def off(cls) -> Batching:
        return cls(max_batch=1, max_wait_ms=0.0)


def next_batch(q: queue.Queue[Any], batching: Batching, abort: threading.Event,
               poll_s: float = 0.05) -> tuple[list[Any], bool]:
    """Block for the first item, then take more until ``max_batch`` or the deadline.

    Returns ``(items, ended)``: ``ended`` is True once ``END`` was taken (the items
    gathered before it are still returned) or ``abort`` was set.
    """
    items: list[Any] = []
    while not items:
        if abort.is_set():
            return items, True
        try:
            item = q.get(timeout=poll_s)
        except queue.Empty:
            continue
        if item is END:
            return items, True
        items.append(item)
    deadline = time.monotonic() + batching.max_wait_ms / 1e3
    while len(items) < batching.max_batch:
        remaining = deadline - time.monotonic()
        try:
            item = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
        except queue.Empty:
            break
        if item is END:
            return items, True
        items.append(item)
    return items, False

"""What flows from a source into a pipeline: a frozen ``Frame``, and the ``Source`` protocol.

A source is anything with ``read() -> Frame | None``, ``release()`` and ``is_open``
(the shape of ``cv2.VideoCapture``): ``read`` blocks until the next frame and returns
None once the source has ended (end of a file, a folder that is not watched, release).
Live sources reconnect by themselves and report how in ``state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

#: The states a source reports (``SourceState.status``).
SOURCE_STATUSES = ("connecting", "open", "stalled", "reconnecting", "ended", "failed", "released")


@dataclass(frozen=True)
class Frame:
    """One decoded image from a source: BGR ``HxWx3`` uint8, where it came from, and when."""

    image: np.ndarray
    source_id: str
    index: int  # 0, 1, 2... per source, counting frames captured: a gap is frames dropped on the way
    timestamp: float  # time.time() when the frame was captured/read
    name: str = ""  # a file name for folder sources, "" otherwise


@dataclass(frozen=True)
class SourceState:
    """A snapshot of a source's health, for progress lines, ``/metrics`` and the daemon."""

    source_id: str
    status: str  # one of SOURCE_STATUSES
    frames: int = 0  # frames delivered
    dropped: int = 0  # frames read but discarded (stale under the "latest" policy, or over max fps)
    reconnects: int = 0
    last_error: str = ""  # why the source last had to reconnect; cleared by the next frame
    stalls: int = 0  # times no new frame (or only the same frame) came within the stall timeout


@runtime_checkable
class Source(Protocol):
    """The small, cv2-shaped protocol every source implements."""

    id: str

    def read(self) -> Frame | None: ...

    def release(self) -> None: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def state(self) -> SourceState: ...

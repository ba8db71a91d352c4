"""A thread-safe, mutable tally behind each source's ``state`` snapshot."""

from __future__ import annotations

import threading
from dataclasses import replace

from edge_sdk.errors import InternalError
from runtime.closing import Releasing
from runtime.frame import SOURCE_STATUSES, SourceState


#: Statuses a source never leaves.
TERMINAL = ("ended", "failed", "released")


class Health:
    """Status and counters written by a source's reading thread, read from any thread.

    A terminal status (ended, failed, released) is never replaced, so a reading thread that
    finishes an OpenCV call after ``release()`` cannot report the source "open" again.
    """

    def __init__(self, source_id: str, status: str) -> None:
        self._lock = threading.Lock()
        self._state = SourceState(source_id=source_id, status=status)

    def set(self, *, status: str | None = None, last_error: str | None = None) -> None:
        with self._lock:
            if status is not None:
                if status not in SOURCE_STATUSES:
                    raise InternalError(f"unknown source status {status!r}; expected one of {SOURCE_STATUSES}")
                if self._state.status not in TERMINAL:
                    self._state = replace(self._state, status=status)
            if last_error is not None:
                self._state = replace(self._state, last_error=last_error)

    def count(self, *, frames: int = 0, dropped: int = 0, reconnects: int = 0, stalls: int = 0) -> None:
        with self._lock:
            s = self._state
            self._state = replace(s, frames=s.frames + frames, dropped=s.dropped + dropped,
                                  reconnects=s.reconnects + reconnects, stalls=s.stalls + stalls)

    @property
    def status(self) -> str:
        with self._lock:
            return self._state.status

    def snapshot(self) -> SourceState:
        with self._lock:
            return self._state


class Reporting(Releasing):
    """``is_open`` and ``state`` of a source that keeps its :class:`Health` in ``_health``; ``with``
    releases it."""

    _health: Health

    @property
    def is_open(self) -> bool:
        """True until the source has ended, failed or been released (also while stalled or reconnecting)."""
        return self._health.status not in TERMINAL

    @property
    def state(self) -> SourceState:
        return self._health.snapshot()

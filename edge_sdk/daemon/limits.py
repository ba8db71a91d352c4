"""What keeps the daemon answering when clients misbehave: timeouts, a connection limit, bounded work.

* :func:`http_protocol` - uvicorn's h11 protocol with the timeouts uvicorn lacks: a request's
  headers must arrive within ``header_timeout_s`` of the connection opening (or of its first byte
  after a keep-alive pause), so a client that connects and sends nothing, or trickles a header a
  byte at a time, is closed (408 when it sent something); and at most ``max_connections`` stay
  open: beyond it the oldest *idle* connection (no request under way) is closed to make room, so
  a flood of idle sockets cannot starve the file-descriptor table and health checks still get in.
  (Body timeouts are the app's: ``read_body`` answers 408.)
* :class:`Admission` - in-flight requests per model; beyond the bound the daemon answers 503 with
  ``Retry-After`` at once instead of queueing (the client retries, or another device takes it).
* :class:`RepeatFilter` - a log line repeated more than a few times within a window is suppressed
  and counted, so an error per accepted socket cannot write gigabytes of log.
* :func:`raise_open_files_limit` - the soft ``RLIMIT_NOFILE`` raised to the hard limit at start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from edge_sdk.daemon.kserve import BadRequest

log = logging.getLogger(__name__)


class Busy(BadRequest):
    """503 with ``Retry-After``: the daemon is at a bound (in-flight work, shutting down) right now."""

    def __init__(self, message: str, hint: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, hint=hint, status=503)
        self.retry_after_s = retry_after_s


class Admission:
    """At most ``limit`` requests per model in flight (read, queued or running); used on the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}
        self.refused = 0

    @contextmanager
    def admit(self, model: str) -> Iterator[None]:
        count = self._in_flight.get(model, 0)
        if count >= self.limit:
            self.refused += 1
            raise Busy(f"model {model!r} already has {count} requests in flight (server.max_in_flight = {self.limit})",
                       hint="retry after the Retry-After delay, or raise server.max_in_flight")
        self._in_flight[model] = count + 1
        try:
            yield
        finally:
            self._in_flight[model] -= 1

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0)


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def http_protocol(header_timeout_s: float, max_connections: int) -> type:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) with the guards above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None
        _opened: float = 0.0
        _received = False  # bytes of the current request so far

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = time.monotonic()
            self._arm_header_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._received = True
            if self.conn.their_state is h11.IDLE and self._header_timer is None:
                self._arm_header_timer()  # the first byte after a keep-alive pause
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm_header_timer()
                self._received = False

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self._received:
                self.transport.write(_timeout_response(
                    f"the request headers did not arrive within {header_timeout_s:g} s (server.header_timeout_s)"))
            self.transport.close()

        def _idle(self) -> bool:
            return (not self.transport.is_closing() and self.conn.their_state is h11.IDLE and not self._received
                    and (self.cycle is None or self.cycle.response_complete))

        def _make_room(self) -> None:
            guarded: list[Any] = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)]
            idle = sorted((c for c in guarded if c._idle()), key=lambda c: c._opened)
            if idle:
                idle[0].transport.close()
                _connections_log.warning("%d connections open (server.max_connections = %d): closed the oldest idle "
                                         "one", len(self.connections), max_connections)
            else:
                _connections_log.warning("%d connections open (server.max_connections = %d), none idle: refused a "
                                         "new one", len(self.connections), max_connections)
                self.transport.close()

    return GuardedH11Protocol


_connections_log = logging.getLogger("edge_sdk.daemon.connections")


class RepeatFilter(logging.Filter):
    """Lets a message (logger, level, format string) through ``burst`` times per ``window_s``; then counts.

    The first line after a quiet window says how many were suppressed in the last one.
    """

    def __init__(self, burst: int = 5, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, count]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen[0] >= self.window_s:
                suppressed = 0 if seen is None else int(seen[1]) - self.burst
                if len(self._seen) > 1000:  # forget old keys: a bounded memory of what was said
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
                self._seen[key] = [now, 1]
                if suppressed > 0:
                    record.msg = f"{record.msg} [repeated {suppressed} more times in the previous {self.window_s:g} s]"
                return True
            seen[1] += 1
            return seen[1] <= self.burst


def install_repeat_filter(*loggers: str, **kwargs: Any) -> RepeatFilter:
    """One :class:`RepeatFilter` on every handler of the root logger and of ``loggers`` (uvicorn's own)."""
    repeat = RepeatFilter(**kwargs)
    for name in ("", *loggers):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(repeat)
    return repeat


def raise_open_files_limit() -> tuple[int, int] | None:
    """The soft open-files limit raised to the hard one; ``(soft, hard)`` after, or None where unsupported."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - a container that forbids it
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft, hard

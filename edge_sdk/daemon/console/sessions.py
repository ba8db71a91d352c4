"""Console sessions: a random id in an ``HttpOnly`` cookie, kept server side with an expiry and a CSRF token.

A session is created only by a login with the daemon's token (``Sessions.login``) and lives
``ttl_s`` from then; it ends at logout, at expiry, or when the daemon restarts (sessions live in
memory only: a restart asks everyone to log in again). Failed logins are throttled: each one is
answered after ``fail_delay_s``, and after ``max_failures`` within ``window_s`` every login is
refused with 429 until the window has passed, so the token cannot be guessed quickly.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

__all__ = ["COOKIE", "LoginThrottle", "Session", "Sessions"]

COOKIE = "edge_sdk_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires: float  # on the sessions' clock (time.monotonic by default)


class Sessions:
    """Live sessions by id, at most ``max_sessions`` (the oldest dropped first)."""

    def __init__(self, token: str, *, ttl_s: float = 8 * 3600.0, max_sessions: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token.encode()
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def check_token(self, given: str) -> bool:
        """``given`` is the daemon's token (constant-time comparison)."""
        return bool(self._token) and hmac.compare_digest(given.strip().encode(), self._token)

    def create(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self._clock() + self.ttl_s)
        with self._lock:
            self._expire()
            while len(self._sessions) >= self.max_sessions:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, or None (unknown, expired or logged out)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


class LoginThrottle:
    """Counts failed logins in a sliding window; ``locked()`` once there were ``max_failures`` in it."""

    def __init__(self, *, max_failures: int = 10, window_s: float = 60.0, fail_delay_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.fail_delay_s = fail_delay_s
        self._clock = clock
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def failed(self) -> None:
        with self._lock:
            self._failures.append(self._clock())

    def locked(self) -> float:
        """Seconds until logins are accepted again (0: not locked)."""
        now = self._clock()
        with self._lock:
            while self._failures and self._failures[0] <= now - self.window_s:
                self._failures.popleft()
            if len(self._failures) < self.max_failures:
                return 0.0
            return max(self._failures[0] + self.window_s - now, 0.1)

"""The event store: diagnoses kept in SQLite with a snapshot image, and the MQTT outbox.

Layout of ``directory``::

    events.db (+ -wal, -shm)   SQLite in WAL mode, synchronous=FULL
    snapshots/<uuid>.<ext>      one image per event that has one (.jpg, .png or .bin by magic)
    snapshots/.tmp-<uuid>       an image being written; never referenced by a row
    .lock                       flock'ed while a store is open: one store per directory

Crash safety. :meth:`EventStore.add` (1) writes the snapshot to ``.tmp-<uuid>``, fsyncs it,
renames it to its final name and fsyncs the folder, then (2) inserts the event row and its
outbox row in ONE transaction. A crash in (1) leaves a temp file or an unreferenced image; a
crash in (2) rolls the transaction back and leaves an unreferenced image. Opening a store runs
``PRAGMA quick_check`` and then reconciles: temp files and unreferenced images are deleted, and
a row whose image is missing or has the wrong size gets ``snapshot = NULL`` (logged). So after
a kill -9 at any point every row is whole and every image belongs to a row.

``synchronous=FULL``: in WAL mode NORMAL survives a process crash but a power cut may roll
back the last commits, and with them the AUTOINCREMENT counter: an event already published
over MQTT could vanish and its id be reused. Events are rare (a cooldown per asset and fault),
so one fsync per commit costs little; devices on a factory floor do lose power.

Retention (:meth:`EventStore.enforce_retention`, called periodically by the daemon, and by
:meth:`EventStore.add` as soon as the events outgrow ``max_bytes``) deletes
events older than ``max_age_s``, then the oldest events until the tracked size (payload bytes
plus snapshot bytes, column ``size``) is at most ``max_bytes``; the images go after the
commit (a crash in between leaves orphans that the next open removes). SQLite's own overhead
(indexes, outbox, WAL) is not counted there; :meth:`EventStore.total_bytes` reports the disk use.

Outbox. Every event gets an outbox row holding its own copy of the MQTT message, so outbox
rows are independent of event rows: an event not yet delivered is still published even if
retention removed its stored copy. The outbox is bounded (``max_outbox`` rows, oldest dropped
with a warning and counted in :attr:`EventStore.outbox_dropped`) so that a broker that never
comes back cannot fill the disk.

Dead letters. A message the broker will not take (it drops the connection on every publish of
it, or answers with a failure reason code) would stall the in-order outbox forever. The
publisher counts such failed attempts per row (column ``attempts``, so a restart does not reset
them) and then moves the row, with the reason and its topic, to the table ``dead_letters``
(:meth:`EventStore.outbox_dead_letter`; read with :meth:`EventStore.dead_letters`), bounded to
``max_dead_letters`` rows, oldest dropped.

Acknowledgements. An operator acknowledges an event (:meth:`EventStore.acknowledge`, from the web
console or ``POST /v1/events/{id}/acknowledge``): its row gets ``acknowledged_at`` (Unix time) and
``acknowledged_by`` (who, e.g. "console"); acknowledging again keeps the first acknowledgement.

Schema versions (``PRAGMA user_version``): 1 had no ``outbox.attempts`` and no ``dead_letters``;
2 had no ``events.acknowledged_at`` / ``acknowledged_by``; opening an older store adds what it
lacks in one transaction, every stored row kept (attempts 0, not acknowledged). A store of a newer
version than this code knows is refused.

Threads: one connection (``check_same_thread=False``) behind one lock; every method holds the
lock for one short statement or transaction, and image files are written outside it.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edge_sdk.errors import DaemonError
from runtime.closing import Closing

__all__ = ["DeadLetter", "Event", "EventStore", "OutboxItem"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 3
_TMP = ".tmp-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after retention
    asset_id      TEXT NOT NULL,
    fault         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    timestamp     REAL NOT NULL,
    payload       TEXT NOT NULL,                      -- the diagnosis, JSON
    snapshot      TEXT,                               -- file name under snapshots/
    snapshot_size INTEGER NOT NULL DEFAULT 0,
    size          INTEGER NOT NULL,                   -- payload bytes + snapshot_size
    acknowledged_at REAL,                             -- Unix time an operator acknowledged it (version 3)
    acknowledged_by TEXT                              -- who acknowledged it (version 3)
);
CREATE INDEX IF NOT EXISTS events_timestamp ON events (timestamp);
CREATE INDEX IF NOT EXISTS events_asset ON events (asset_id, id);
CREATE INDEX IF NOT EXISTS events_fault ON events (fault, id);
-- no foreign key to events on purpose: an undelivered message outlives retention
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL,
    asset_id TEXT NOT NULL,
    payload  TEXT NOT NULL,                          -- the MQTT message, JSON
    attempts INTEGER NOT NULL DEFAULT 0              -- publishes the broker did not take (version 2)
);
CREATE TABLE IF NOT EXISTS dead_letters (            -- version 2
    seq       INTEGER PRIMARY KEY,                   -- its outbox seq
    event_id  INTEGER NOT NULL,
    asset_id  TEXT NOT NULL,
    topic     TEXT NOT NULL,
    payload   TEXT NOT NULL,                         -- the MQTT message, JSON
    reason    TEXT NOT NULL,
    attempts  INTEGER NOT NULL,
    failed_at REAL NOT NULL                          -- Unix time it was moved here
);
CREATE TABLE IF NOT EXISTS replies (                 -- answers by Idempotency-Key, so a retry repeats them
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,                       -- sha256 of the request it answered
    body        TEXT NOT NULL,                       -- the answer, JSON
    created     REAL NOT NULL
);
"""
#: How long an answer is kept for a client's retry with the same Idempotency-Key.
REPLY_TTL_S = 24 * 3600.0
_DEAD_COLUMNS = "seq, event_id, asset_id, topic, payload, reason, attempts, failed_at"
_COLUMNS = "id, asset_id, fault, confidence, timestamp, payload, snapshot, size, acknowledged_at, acknowledged_by"


@dataclass(frozen=True)
class Event:
    """One stored diagnosis. ``snapshot`` is the image's path, ``size`` the tracked bytes."""

    id: int
    asset_id: str
    fault: str
    confidence: float
    timestamp: float
    payload: dict[str, Any]
    snapshot: Path | None
    size: int
    acknowledged_at: float | None = None  # Unix time; None: not acknowledged
    acknowledged_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: the MQTT message body (see ``edge_sdk.daemon.mqtt``)."""
        return {"id": self.id, "asset_id": self.asset_id, "fault": self.fault, "confidence": self.confidence,
                "timestamp": self.timestamp, "snapshot": self.snapshot is not None, "diagnosis": self.payload}


@dataclass(frozen=True)
class OutboxItem:
    """A message waiting for the broker: ``payload_json`` is sent as is."""

    seq: int
    event_id: int
    asset_id: str
    payload_json: str
    attempts: int = 0  # earlier publishes of it that the broker did not take


@dataclass(frozen=True)
class DeadLetter:
    """An outbox message the broker would not take, set aside so that the later ones are delivered."""

    seq: int  # its outbox seq: increasing, never reused
    event_id: int
    asset_id: str
    topic: str
    payload_json: str
    reason: str
    attempts: int
    failed_at: float  # Unix time

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; ``message`` is the MQTT message that was not delivered."""
        return {"seq": self.seq, "event_id": self.event_id, "asset_id": self.asset_id, "topic": self.topic,
                "reason": self.reason, "attempts": self.attempts, "failed_at": self.failed_at,
                "message": json.loads(self.payload_json)}


class EventStore(Closing):
    """Events in ``directory/events.db`` with images in ``directory/snapshots`` (module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_age_s: float | None = None,
                 max_bytes: int | None = None, max_outbox: int = 100_000, max_dead_letters: int = 1000) -> None:
        _check_limits(max_age_s, max_bytes, max_outbox)
        if not (isinstance(max_dead_letters, int) and max_dead_letters >= 1):
            raise DaemonError(f"max_dead_letters is {max_dead_letters!r}; expected an int >= 1")
        self.directory = Path(directory)
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.max_outbox = max_outbox
        self.max_dead_letters = max_dead_letters
        self.outbox_dropped = 0  # messages dropped by the outbox bound since this store was opened
        self._snapshots = self.directory / "snapshots"
        self._lock = threading.Lock()
        self._lock_fd = _lock_directory(self.directory, self._snapshots)
        try:
            self._db = _open_db(self.directory / "events.db")
            self._reconcile()
            self._outbox_rows: int = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            self._dead_rows: int = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            self._bytes: int = self._db.execute("SELECT coalesce(sum(size), 0) FROM events").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self._db.close()
            os.close(self._lock_fd)
            raise DaemonError(f"event store {str(self.directory)!r} cannot be read: {exc}",
                              hint=_corrupt_hint(self.directory / "events.db")) from None
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            os.close(self._lock_fd)
            raise

    # -- writing --------------------------------------------------------------------------------

    def add(self, asset_id: str, fault: str, confidence: float, payload: dict[str, Any],
            snapshot: bytes | None = None, timestamp: float | None = None,
            reply: tuple[str, str, Callable[[int], str]] | None = None) -> Event:
        """Store one event (and its image) and queue its MQTT message, atomically; with ``reply``
        ``(key, fingerprint, answer(event id))`` the request's answer is kept in the same transaction, so a
        retry after a crash finds it rather than adding the event again."""
        _check_event(asset_id, fault, confidence, timestamp)
        body = _dumps(payload, f"the payload of an event for asset {asset_id!r}")
        when = time.time() if timestamp is None else float(timestamp)
        name, snapshot_size = (None, 0) if snapshot is None else self._write_snapshot(snapshot)
        committed = False
        try:
            with self._lock:
                event = self._insert(asset_id, fault, float(confidence), when, body, name, snapshot_size, reply)
                committed = True
                self._bytes += event.size
        finally:
            if name is not None and not committed:
                (self._snapshots / name).unlink(missing_ok=True)
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            self.enforce_retention()  # on write: the size bound holds between the daemon's periodic runs
        return event

    def _insert(self, asset_id: str, fault: str, confidence: float, when: float, body: str, name: str | None,
                snapshot_size: int, reply: tuple[str, str, Callable[[int], str]] | None = None) -> Event:
        size = len(body.encode("utf-8")) + snapshot_size
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO events (asset_id, fault, confidence, timestamp, payload, snapshot, snapshot_size, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (asset_id, fault, confidence, when, body, name, snapshot_size, size))
            event = Event(int(cursor.lastrowid or 0), asset_id, fault, confidence, when, json.loads(body),
                          None if name is None else self._snapshots / name, size)
            self._db.execute("INSERT INTO outbox (event_id, asset_id, payload) VALUES (?, ?, ?)",
                             (event.id, asset_id, _dumps(event.to_dict(), "an MQTT message")))
            if reply is not None:
                key, fingerprint, answer = reply
                self._db.execute("INSERT INTO replies (key, fingerprint, body, created) VALUES (?, ?, ?, ?)",
                                 (key, fingerprint, answer(event.id), time.time()))
            dropped = self._trim_outbox()
        self._outbox_rows += 1 - dropped
        if dropped:
            self.outbox_dropped += dropped
            log.warning("MQTT outbox full (%d messages); dropped the %d oldest (%d dropped since start); "
                        "is the broker reachable?", self.max_outbox, dropped, self.outbox_dropped)
        return event

    def _trim_outbox(self) -> int:
        excess = self._outbox_rows + 1 - self.max_outbox
        if excess <= 0:
            return 0
        return self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                (excess,)).rowcount

    def _write_snapshot(self, data: bytes) -> tuple[str, int]:
        """Temp file, fsync, rename, fsync the folder: the image is whole before any row names it."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DaemonError(f"snapshot is a {type(data).__name__}; expected bytes (an encoded image)",
                              hint="encode the frame first, e.g. cv2.imencode('.jpg', frame)[1].tobytes()")
        key = uuid.uuid4().hex
        tmp = self._snapshots / f"{_TMP}{key}"
        whole = memoryview(data).cast("B")
        name = f"{key}{_extension(bytes(whole[:8]))}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = whole
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._snapshots / name)
            _fsync_dir(self._snapshots)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DaemonError(f"cannot write a snapshot under {str(self._snapshots)!r}: {exc.strerror}",
                              hint="check free space and permissions of storage.dir") from None
        return name, whole.nbytes

    # -- reading --------------------------------------------------------------------------------

    def get(self, event_id: int) -> Event | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM events WHERE id = ?", (event_id,)).fetchone()
        return None if row is None else self._event(row)

    def list(self, asset_id: str | None = None, fault: str | None = None, since: float | None = None,
             before_id: int | None = None, limit: int = 100) -> builtins.list[Event]:
        """Events newest first; page with ``before_id`` = the last id of the previous page."""
        if not (isinstance(limit, int) and 1 <= limit <= 10_000):
            raise DaemonError(f"limit is {limit!r}; expected an int 1-10000", hint="page with before_id")
        where, args = [], []
        for clause, value in (("asset_id = ?", asset_id), ("fault = ?", fault), ("timestamp >= ?", since),
                              ("id < ?", before_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_COLUMNS} FROM events {condition} ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._event(row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def event_bytes(self) -> int:
        """The size retention bounds: payload plus snapshot bytes of every stored event."""
        with self._lock:
            return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM events").fetchone()[0])

    def total_bytes(self) -> int:
        """Disk use: the database files plus the snapshots."""
        files = [self.directory / f"events.db{suffix}" for suffix in ("", "-wal", "-shm")]
        with self._lock:
            images = int(self._db.execute("SELECT coalesce(sum(snapshot_size), 0) FROM events").fetchone()[0])
        return images + sum(f.stat().st_size for f in files if f.exists())

    def snapshot_path(self, event_id: int) -> Path | None:
        event = self.get(event_id)
        return None if event is None else event.snapshot

    def _event(self, row: tuple[Any, ...]) -> Event:
        event_id, asset_id, fault, confidence, timestamp, payload, snapshot, size, acked_at, acked_by = row
        return Event(event_id, asset_id, fault, confidence, timestamp, json.loads(payload),
                     None if snapshot is None else self._snapshots / snapshot, size, acked_at, acked_by)

    def acknowledge(self, event_id: int, by: str, now: float | None = None) -> Event | None:
        """Mark ``event_id`` acknowledged by ``by`` (the first acknowledgement is kept); None: no such event."""
        if not (isinstance(by, str) and by.strip() and len(by) <= 200):
            raise DaemonError(f"acknowledged by {by!r}; expected a non-empty name of at most 200 characters")
        when = time.time() if now is None else float(now)
        with self._lock, self._transaction():
            self._db.execute("UPDATE events SET acknowledged_at = ?, acknowledged_by = ?"
                             " WHERE id = ? AND acknowledged_at IS NULL", (when, by, event_id))
        return self.get(event_id)

    def keep_reply(self, key: str, fingerprint: str, body: str) -> None:
        """Keep the answer to a request with an Idempotency-Key that stored no event."""
        with self._lock, self._transaction():
            self._db.execute("INSERT OR IGNORE INTO replies (key, fingerprint, body, created) VALUES (?, ?, ?, ?)",
                             (key, fingerprint, body, time.time()))

    def reply(self, key: str, now: float | None = None) -> tuple[str, str] | None:
        """``(fingerprint, answer)`` kept for ``key`` within REPLY_TTL_S, or None."""
        cutoff = (time.time() if now is None else now) - REPLY_TTL_S
        with self._lock:
            row = self._db.execute("SELECT fingerprint, body FROM replies WHERE key = ? AND created >= ?",
                                   (key, cutoff)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    # -- retention ------------------------------------------------------------------------------

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete events past ``max_age_s``, then the oldest beyond ``max_bytes``; returns how many."""
        names: builtins.list[str] = []
        deleted = 0
        with self._lock, self._transaction():
            if self.max_age_s is not None:
                cutoff = (time.time() if now is None else now) - self.max_age_s
                names += self._column("SELECT snapshot FROM events WHERE timestamp < ? AND snapshot IS NOT NULL",
                                      cutoff)
                deleted += self._db.execute("DELETE FROM events WHERE timestamp < ?", (cutoff,)).rowcount
            cut = self._size_cut()
            if cut is not None:
                names += self._column("SELECT snapshot FROM events WHERE id <= ? AND snapshot IS NOT NULL", cut)
                deleted += self._db.execute("DELETE FROM events WHERE id <= ?", (cut,)).rowcount
            self._bytes = self._db.execute("SELECT coalesce(sum(size), 0) FROM events").fetchone()[0]
            self._db.execute("DELETE FROM replies WHERE created < ?", ((time.time() if now is None else now)
                                                                         - REPLY_TTL_S,))
        for name in names:  # after the commit: a crash before this leaves orphans for reconcile
            (self._snapshots / name).unlink(missing_ok=True)
        if deleted:
            log.info("retention deleted %d event(s) (max_age_s=%s, max_bytes=%s)", deleted, self.max_age_s,
                     self.max_bytes)
        return deleted

    def _size_cut(self) -> int | None:
        """The id up to which the oldest events must go to bring the size under ``max_bytes``."""
        if self.max_bytes is None:
            return None
        excess = self._db.execute("SELECT coalesce(sum(size), 0) FROM events").fetchone()[0] - self.max_bytes
        freed, cut = 0, None
        for event_id, size in self._db.execute("SELECT id, size FROM events ORDER BY id"):
            if freed >= excess:
                break
            freed, cut = freed + size, event_id
        return cut

    def _column(self, sql: str, *args: Any) -> builtins.list[Any]:
        return [row[0] for row in self._db.execute(sql, args)]

    # -- outbox ---------------------------------------------------------------------------------

    def outbox_pending(self, limit: int = 100, *, after_seq: int = 0) -> builtins.list[OutboxItem]:
        """Undelivered messages in insertion order (``seq`` > ``after_seq``)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, event_id, asset_id, payload, attempts FROM outbox WHERE seq > ?"
                                    " ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        return [OutboxItem(*row) for row in rows]

    def outbox_done(self, *seqs: int) -> int:
        """Forget delivered messages (one transaction); unknown seqs are ignored. Returns how many."""
        if not seqs:
            return 0
        with self._lock:
            with self._transaction():
                done = sum(self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount for seq in seqs)
            self._outbox_rows -= done
        return done

    def outbox_size(self) -> int:
        with self._lock:
            return self._outbox_rows

    def outbox_attempt(self, seq: int) -> int:
        """Count one publish of ``seq`` that the broker did not take; returns its count so far
        (0: no such row, e.g. it was delivered meanwhile)."""
        with self._lock, self._transaction():
            self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))
            row = self._db.execute("SELECT attempts FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return 0 if row is None else int(row[0])

    def outbox_dead_letter(self, seq: int, topic: str, reason: str, now: float | None = None) -> DeadLetter | None:
        """Move ``seq`` from the outbox to the dead letters (one transaction), the oldest dead letters
        beyond ``max_dead_letters`` dropped; None when there is no such outbox row."""
        when = time.time() if now is None else float(now)
        with self._lock:
            with self._transaction():
                row = self._db.execute("SELECT seq, event_id, asset_id, payload, attempts FROM outbox WHERE seq = ?",
                                       (seq,)).fetchone()
                if row is None:
                    return None
                letter = DeadLetter(row[0], row[1], row[2], topic, row[3], reason, row[4], when)
                self._db.execute(f"INSERT OR REPLACE INTO dead_letters ({_DEAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (letter.seq, letter.event_id, letter.asset_id, topic, letter.payload_json, reason,
                                  letter.attempts, when))
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                dropped = self._db.execute(
                    "DELETE FROM dead_letters WHERE seq NOT IN (SELECT seq FROM dead_letters ORDER BY seq DESC LIMIT ?)",
                    (self.max_dead_letters,)).rowcount
            self._outbox_rows -= 1
            self._dead_rows = self._dead_rows + 1 - dropped
        if dropped:
            log.warning("dead-letter table full (%d messages); dropped the %d oldest", self.max_dead_letters, dropped)
        return letter

    def dead_letters(self, limit: int = 100, *, before_seq: int | None = None) -> builtins.list[DeadLetter]:
        """Dead letters newest first; page with ``before_seq`` = the last seq of the previous page."""
        if not (isinstance(limit, int) and 1 <= limit <= 10_000):
            raise DaemonError(f"limit is {limit!r}; expected an int 1-10000", hint="page with before_seq")
        condition, args = ("WHERE seq < ?", (before_seq,)) if before_seq is not None else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {_DEAD_COLUMNS} FROM dead_letters {condition} ORDER BY seq DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [DeadLetter(*row) for row in rows]

    def dead_letter_count(self) -> int:
        with self._lock:
            return self._dead_rows

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; SQLite failures (disk full, I/O error) become DaemonError."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise DaemonError(f"event store {str(self.directory)!r} could not be written: {exc}",
                              hint="check free space and permissions of storage.dir") from None

    def _reconcile(self) -> None:
        """Undo what a crash may have left: temp files, orphan images, rows whose image is gone."""
        referenced = dict(self._db.execute("SELECT snapshot, snapshot_size FROM events WHERE snapshot IS NOT NULL"))
        on_disk = {e.name: e.stat().st_size for e in os.scandir(self._snapshots) if e.is_file()}
        broken = sorted(name for name, size in referenced.items() if on_disk.get(name) != size)
        if broken:
            with self._transaction():
                self._db.executemany("UPDATE events SET snapshot = NULL, size = size - snapshot_size,"
                                     " snapshot_size = 0 WHERE snapshot = ?", [(name,) for name in broken])
            log.warning("%d event(s) lost their snapshot (missing or truncated file, e.g. %s); kept without it",
                        len(broken), broken[0])
        stray = sorted(set(on_disk) - (set(referenced) - set(broken)))
        for name in stray:
            (self._snapshots / name).unlink(missing_ok=True)
        if stray:
            log.info("removed %d unfinished or unreferenced snapshot file(s) from %s", len(stray), self._snapshots)


def _lock_directory(directory: Path, snapshots: Path) -> int:
    try:
        snapshots.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DaemonError(f"storage directory {str(directory)!r} cannot be created or written: {exc.strerror}",
                          hint="set storage.dir to a folder the daemon's user may write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DaemonError(f"storage directory {str(directory)!r} is already in use by another event store",
                          hint="stop the other `edge-sdk serve` using it, or give each daemon its own storage.dir"
                          ) from None
    return fd


def _open_db(path: Path) -> sqlite3.Connection:
    hint = _corrupt_hint(path)
    try:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise DaemonError(f"event store {str(path)!r} cannot be opened: {exc}",
                          hint="check the permissions of storage.dir") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise DaemonError(f"event store {str(path)!r} has schema version {version}; this edge-sdk reads "
                              f"up to {_SCHEMA_VERSION}", hint="upgrade edge-sdk or use another storage.dir")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise DaemonError(f"event store {str(path)!r} is corrupt: {'; '.join(problems[:3])}", hint=hint)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("SQLite refused WAL mode for %s (got %r); writes are still atomic", path, mode)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")  # no table uses them today; on so a future one is enforced
        db.executescript(_SCHEMA)
        _migrate(db, path, version)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise DaemonError(f"event store {str(path)!r} cannot be opened: {exc}", hint=hint) from None
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path, version: int) -> None:
    """Bring a store of an older schema ``version`` up to ``_SCHEMA_VERSION`` in one transaction
    (``_SCHEMA`` has just created the tables that were missing, with every column)."""
    if version == _SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        if "attempts" not in columns:  # version 1
            db.execute("ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
        for column, kind in (("acknowledged_at", "REAL"), ("acknowledged_by", "TEXT")):
            if column not in columns:  # versions 1 and 2
                db.execute(f"ALTER TABLE events ADD COLUMN {column} {kind}")
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if version:
        log.info("event store %s: schema version %d upgraded to %d, every row kept", path, version, _SCHEMA_VERSION)


def _corrupt_hint(path: Path) -> str:
    return (f"stop the daemon and move {path}* aside (a new, empty store is then created), "
            f"or try `sqlite3 {path} .recover`")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _extension(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith(b"\x89PNG"):
        return ".png"
    return ".bin"


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DaemonError(f"{what} is not plain JSON data: {exc}",
                          hint="pass Diagnosis.to_dict() or another dict of str, numbers, lists and dicts") from None


def _check_event(asset_id: Any, fault: Any, confidence: Any, timestamp: Any) -> None:
    for name, text in (("asset_id", asset_id), ("fault", fault)):
        if not (isinstance(text, str) and text):
            raise DaemonError(f"{name} is {text!r}; expected a non-empty string")
    for name, value in (("confidence", confidence), ("timestamp", timestamp)):
        if (value is not None or name == "confidence") and not _finite(value):
            raise DaemonError(f"{name} is {value!r}; expected a finite number")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_limits(max_age_s: Any, max_bytes: Any, max_outbox: Any) -> None:
    if max_age_s is not None and not (isinstance(max_age_s, (int, float)) and max_age_s > 0):
        raise DaemonError(f"max_age_s is {max_age_s!r}; expected seconds > 0 or None", hint="storage.max_age_days")
    if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes > 0):
        raise DaemonError(f"max_bytes is {max_bytes!r}; expected an int > 0 or None", hint="storage.max_mb")
    if not (isinstance(max_outbox, int) and max_outbox >= 1):
        raise DaemonError(f"max_outbox is {max_outbox!r}; expected an int >= 1")

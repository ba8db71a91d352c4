"""``FolderSource``: the images in a folder in name order, and with ``watch=True`` the ones that
appear later (each read once its size has stopped changing, and read again while it is incomplete)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from edge_sdk.errors import SourceError
from runtime.frame import Frame
from runtime.sources._health import Health, Reporting
from runtime.sources._spec import Spec, check_positive, default_id

log = logging.getLogger(__name__)

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class FolderSource(Reporting):
    """A :class:`~runtime.frame.Source` over the image files of one folder (not its subfolders).

    Files are read in name order, decoded to BGR; ``Frame.name`` is the file name. Without
    ``watch`` the source ends after the files present at the first ``read()``. With ``watch`` it
    polls every ``poll_interval`` seconds for names not seen yet, reads a new file once its size
    and modification time are the same on two polls in a row (so a file still being written is
    not read half-way), and runs until released; a name is read once while its file exists (deleted
    and written again, or replaced by a rename over it, it is read again; rewritten in place, it is
    not: write a new file and rename it). A watched file that cannot be decoded yet (its writer
    paused longer than a poll) is read again whenever it changes; one that stays undecodable, or
    empty (0 bytes), for ``settle_timeout`` seconds is skipped. A skipped file is logged and counted
    in ``state.dropped`` with its name in ``state.last_error``; it is read if it changes later.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        source_id: str | None = None,
        watch: bool = False,
        poll_interval: float = 0.2,
        settle_timeout: float = 5.0,
    ) -> None:
        self._folder = Path(folder)
        if not self._folder.is_dir():
            what = "is not a folder" if self._folder.exists() else "does not exist"
            raise SourceError(f"image folder {str(self._folder)!r} {what}",
                              hint="pass an existing folder of .jpg/.png/.bmp/.tif images")
        check_positive("poll_interval", poll_interval)
        check_positive("settle_timeout", settle_timeout)
        self.id = source_id or default_id(Spec("folder", str(self._folder), str(self._folder)))
        self._watch = bool(watch)
        self._poll = float(poll_interval)
        self._settle = float(settle_timeout)
        self._health = Health(self.id, "open")
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._ready: list[str] = []  # names ready to decode, last one first
        self._pending: dict[str, tuple[int, int]] = {}  # watch: name -> (size, mtime) at the last poll
        self._waiting: dict[str, tuple[tuple[int, int], float]] = {}  # watch: incomplete -> (signature, since)
        self._given_up: dict[str, tuple[int, int]] = {}  # watch: skipped -> its signature then
        self._scanned = False
        self._listed: dict[str, int] = {}  # the last scan: name -> inode
        self._inodes: dict[str, int] = {}  # watch: taken names -> the inode they had
        self._index = 0

    def read(self) -> Frame | None:
        """The next image; None after the last one (without ``watch``) or once released."""
        while not self._stop.is_set():
            if self._ready:
                name = self._ready.pop()
                image = self._decode(name, final=not self._watch)
                if image is not None:
                    return self._deliver(image, name)
                continue
            if self._scanned and not self._watch:
                log.info("source %s: read all %d images of %s", self.id, self._index, self._folder)
                self._health.set(status="ended")
                return None
            if self._scanned and self._stop.wait(self._poll):
                break
            self._scan()
        return None

    def release(self) -> None:
        """Stop; a ``read()`` waiting for new files in another thread returns None promptly."""
        self._stop.set()
        self._health.set(status="released")

    def __repr__(self) -> str:
        return f"FolderSource({str(self._folder)!r}, id={self.id!r}, watch={self._watch})"

    def _scan(self) -> None:
        first, self._scanned = not self._scanned, True
        try:
            listed = {e.name: e.inode() for e in os.scandir(self._folder)
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and _is_file(e)}
        except OSError as exc:
            if not self._watch:
                raise SourceError(f"cannot list image folder {str(self._folder)!r}: {exc}",
                                  hint="check that the folder exists and is readable") from exc
            self._note_error(f"cannot list {self._folder}: {exc}")
            return
        present = set(listed)
        self._listed = listed
        if self._watch:
            self._seen &= present  # forget deleted files: memory stays bounded by the folder
            # a name published again by a rename over it (os.replace: a new inode) is a new image
            self._inodes = {n: i for n, i in self._inodes.items() if n in present}
            self._seen -= {n for n, i in self._inodes.items() if i != listed[n]}
            self._retry_changed(present)
        names = sorted(present - self._seen)
        if first and not names:
            log.warning("source %s: no images (%s) in %s", self.id, "/".join(IMAGE_EXTENSIONS), self._folder)
        self._take(self._stable(names) if self._watch else names)

    def _signature(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self._folder / name)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _retry_changed(self, present: set[str]) -> None:
        """Skipped files that changed since are read again; deleted ones are forgotten."""
        for name, signature in list(self._given_up.items()):
            if name not in present:
                del self._given_up[name]
            elif self._signature(name) != signature:
                del self._given_up[name]
                self._seen.discard(name)

    def _stable(self, names: list[str]) -> list[str]:
        """The names whose size and mtime are unchanged since the last poll (and not empty, and not
        unchanged since they last failed to decode); the ones that stay empty or undecodable for
        ``settle_timeout`` are skipped."""
        listed, now = set(names), time.monotonic()
        self._pending = {n: sig for n, sig in self._pending.items() if n in listed}
        self._waiting = {n: w for n, w in self._waiting.items() if n in listed}
        stable = []
        for name in names:
            signature = self._signature(name)
            if signature is None:
                continue
            waited = self._waiting.get(name)
            if waited is not None and waited[0] == signature:  # still what could not be read
                if now - waited[1] >= self._settle:
                    del self._waiting[name]
                    why = ("it is empty (0 bytes)" if signature[0] == 0 else "OpenCV cannot decode it") + \
                          f" and has not changed for {self._settle:g} s"
                    self._give_up(name, signature, why)
                continue
            if self._pending.get(name) != signature:
                self._pending[name] = signature
                continue
            del self._pending[name]
            if signature[0] == 0:
                self._waiting[name] = (signature, now)
                continue
            self._waiting.pop(name, None)
            stable.append(name)
        return stable

    def _give_up(self, name: str, signature: tuple[int, int], why: str) -> None:
        self._seen.add(name)
        self._given_up[name] = signature
        self._skip(name, why)

    def _take(self, names: list[str]) -> None:
        self._seen.update(names)
        self._inodes.update({n: self._listed[n] for n in names if n in self._listed})
        self._ready = sorted(self._ready + names, reverse=True)

    def _decode(self, name: str, *, final: bool) -> np.ndarray | None:
        """The image, or None: skipped when ``final``, else (watching) waiting until the file changes."""
        signature = self._signature(name)
        try:
            data = np.fromfile(self._folder / name, dtype=np.uint8)
        except OSError as exc:
            if final or signature is None:
                self._skip(name, f"cannot read it: {exc}")
                return None
            data = np.zeros(0, np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            if final or signature is None:
                self._skip(name, "OpenCV cannot decode it as an image")
            else:  # perhaps incomplete: its writer paused; read it again once it changes
                self._seen.discard(name)
                self._waiting[name] = (signature, time.monotonic())
                log.debug("source %s: %s cannot be decoded yet; waiting for it to change", self.id, name)
        return image

    def _deliver(self, image: np.ndarray, name: str) -> Frame:
        frame = Frame(image=image, source_id=self.id, index=self._index, timestamp=time.time(), name=name)
        self._index += 1
        self._health.count(frames=1)
        return frame

    def _skip(self, name: str, why: str) -> None:
        self._health.count(dropped=1)
        shown = name if name.isprintable() else repr(name)  # a newline in a name must not forge a log line
        self._note_error(f"skipped {shown}: {why}")

    def _note_error(self, error: str) -> None:
        self._health.set(last_error=error)
        log.warning("source %s: %s", self.id, error)


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file (or a link to one); a link that loops or dangles is not, and does not stop the scan."""
    try:
        return entry.is_file()
    except OSError:
        return False

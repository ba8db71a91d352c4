"""A real RTSP server (GStreamer's gst-rtsp-server) on a free loopback port, for tests (not a test module).

Usage::

    from tests.rtsp import RtspServer, require_rtsp

    require_rtsp()                                  # skips the test, with the reason, without the server
    with RtspServer(tmp_path / "rtsp", fps=30) as server:
        server.url("/live")   # "rtsp://127.0.0.1:PORT/live": a moving ball, every frame new
        server.url("/frozen") # the same frame over and over (a camera that lost its signal)
        server.freeze()       # SIGSTOP: a hung server (connections stay up, nothing is sent)
        server.thaw()         # SIGCONT
        server.stop()         # gone (connection refused); start() again serves on the same port

The server runs in the system Python (``/usr/bin/python3`` with ``python3-gi``); CI installs it with
``apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
gstreamer1.0-plugins-good``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.services import free_port, start_listener, stop_process

__all__ = ["RtspServer", "require_rtsp", "SYSTEM_PYTHON"]

SYSTEM_PYTHON = "/usr/bin/python3"
_SCRIPT = Path(__file__).with_name("rtsp_server.py")
_CHECK = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
          "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
          "assert all(Gst.ElementFactory.find(e) for e in ('videotestsrc', 'jpegenc', 'rtpjpegpay'))")


def rtsp_available() -> str | None:
    """None when the server can run here, else why not."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found"
    done = subprocess.run([SYSTEM_PYTHON, "-c", _CHECK], capture_output=True, text=True)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["GStreamer check failed"])[-1]
    return None


def require_rtsp() -> None:
    why = rtsp_available()
    if why is not None:
        pytest.skip(f"needs GStreamer's RTSP server ({why}; apt-get install python3-gi "
                    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good)")


class RtspServer:
    """One gst-rtsp-server process serving ``/live`` and ``/frozen`` at ``fps`` (behind basic
    authentication when ``user`` and ``password`` are given)."""

    def __init__(self, directory: Path, fps: int = 30, user: str | None = None, password: str | None = None) -> None:
        self.directory = Path(directory)
        self.credentials = [user, password] if user is not None and password is not None else []
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port, self.fps = free_port(), fps
        self.log = self.directory / "rtsp.log"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "/live") -> str:
        return f"rtsp://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 10.0) -> RtspServer:
        self._process = start_listener([SYSTEM_PYTHON, str(_SCRIPT), str(self.port), str(self.fps), *self.credentials],
                                       self.port, self.log, "gst-rtsp-server", timeout)
        return self

    def freeze(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            stop_process(self._process)
            self._process = None

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

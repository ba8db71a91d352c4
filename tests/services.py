"""Starting and stopping the real services tests run on loopback (mosquitto, sshd)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from edge_sdk.deploy.ssh import stop_process

__all__ = ["free_port", "start_listener", "stop_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_listener(argv: Sequence[str], port: int, log: Path, name: str, timeout: float) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log`` and wait until 127.0.0.1:``port`` accepts connections."""
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.02)
    stop_process(process)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout} s")



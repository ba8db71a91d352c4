"""How the workstation reaches a device: run a command there, upload a file there.

Two transports implement the same small protocol: :class:`LocalTransport` (a directory on this
machine: a workstation that is itself the device, and tests) and ``SshTransport`` (the system
``ssh``/``rsync``, host keys checked). Every device-side step is an ``edge-sdk device ...``
command run through ``run``, so both transports exercise the same device code.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Protocol, Sequence
from urllib.parse import unquote, urlsplit

from edge_sdk.errors import EdgeSDKError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
CHUNK = 1 << 20


def copy_from(local: Path, offset: int, out: IO[bytes], progress: Progress | None) -> None:
    """Write ``local`` from byte ``offset`` on into ``out``, reporting (done, total) per chunk."""
    total = local.stat().st_size
    done = offset
    with local.open("rb") as source:
        source.seek(offset)
        while chunk := source.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)


class DeployError(EdgeSDKError):
    """A deployment step failed on a target (the message names the target and the step)."""


class DiskFullError(DeployError):
    """An upload ran out of space on the device; the partial file it wrote was removed."""


NO_SPACE = ("No space left on device", "Disk quota exceeded")  # how ENOSPC and EDQUOT read in a tool's stderr


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Target:
    """A parsed ``--to`` value: a local directory or an ssh:// URL."""

    kind: str  # "local" or "ssh"
    path: str  # the deployment root on the device
    host: str = ""
    user: str = ""
    port: int = 22

    @property
    def display(self) -> str:
        if self.kind == "local":
            return self.path
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"ssh://{user}{self.host}{port}{self.path}"


def parse_target(value: str) -> Target:
    """``ssh://user@host[:port]/path`` or a local directory path."""
    if value.startswith("ssh://"):
        parts = urlsplit(value)
        if not parts.hostname or not parts.path or parts.path == "/":
            raise DeployError(f"target {value!r} has no host or no path",
                              hint="write ssh://user@host[:port]/opt/edge-sdk")
        if parts.password:
            raise DeployError("target URLs must not carry passwords", hint="use an SSH key (ssh-agent or -i)")
        try:
            port = parts.port or 22
        except ValueError:
            raise DeployError(f"target {value!r} has an invalid port") from None
        return Target("ssh", unquote(parts.path), parts.hostname, unquote(parts.username or ""), port)
    if "://" in value:
        raise DeployError(f"target {value!r} uses an unsupported scheme; expected ssh://... or a local directory")
    return Target("local", str(Path(value).expanduser().absolute()))


class Transport(Protocol):
    """What deployment needs from a connection to one device."""

    target: Target

    def run(self, argv: Sequence[str], *, timeout: float = 600.0) -> RunResult:
        """Run a command on the device (argv[0] is resolved there) and return its output."""
        ...

    def upload(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        """Copy ``local`` to ``remote`` (an absolute path on the device). A partial ``remote``
        from an interrupted upload is continued, not restarted; one that ran out of space is removed
        (:class:`DiskFullError`)."""
        ...

    def close(self) -> None: ...


def device_command(edge_sdk: str | None) -> list[str]:
    """How to invoke ``edge-sdk`` on a device: a given path, else the one beside this Python."""
    if edge_sdk:
        return [edge_sdk]
    return [sys.executable, "-m", "edge_sdk.cli"]


class LocalTransport:
    """A directory on this machine used as a device."""

    def __init__(self, target: Target, *, edge_sdk: str | None = None) -> None:
        self.target = target
        self.edge_sdk = device_command(edge_sdk)

    def run(self, argv: Sequence[str], *, timeout: float = 600.0) -> RunResult:
        argv = list(argv)
        if argv and argv[0] == "edge-sdk":
            argv = self.edge_sdk + argv[1:]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return RunResult(124, "", f"timed out after {timeout:.0f} s")
        except OSError as exc:
            return RunResult(127, "", str(exc))
        return RunResult(done.returncode, done.stdout, done.stderr)

    def upload(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        try:
            self._append(local, Path(remote), progress)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                Path(remote).unlink(missing_ok=True)  # a partial that fills the disk blocks every later deploy
                raise DiskFullError(f"upload to {remote} failed: {exc.strerror}") from None
            raise DeployError(f"upload to {remote} failed: {exc.strerror or exc}",
                              hint="check that the target directory is writable") from None

    @staticmethod
    def _append(local: Path, dest: Path, progress: Progress | None) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        total = local.stat().st_size
        done = dest.stat().st_size if dest.exists() else 0
        if done > total:
            dest.unlink()
            done = 0
        with dest.open("ab") as out:
            copy_from(local, done, out, progress)
            out.flush()
            os.fsync(out.fileno())

    def close(self) -> None:
        pass

"""Reach a device over SSH with the system ``ssh`` and ``rsync``: no protocol code of our own.

Host keys are checked (``StrictHostKeyChecking=yes``); trust on first use happens only when asked
for (``accept_new_host_key``, the CLI's ``--accept-new-host-key``). ``BatchMode`` means ssh never
prompts: a missing key or an unknown host fails with a :class:`DeployError` and a hint instead.
All commands of one transport share one connection (an ssh control master whose socket lives in
a private temporary directory), so a deployment's many small steps pay for one handshake.

Uploads use ``rsync --append-verify``: a partial remote file is continued, and the whole file's
checksum is then compared, re-sending the file when the partial part was wrong. Without rsync
(here or on the device) the rest of the file is appended with ``cat >>`` over ssh; the caller
verifies the file's hash either way.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import IO, Sequence

from edge_sdk.deploy.transport import (NO_SPACE, DeployError, DiskFullError, Progress, RunResult, Target,
                                      copy_from)
from edge_sdk.errors import InternalError
from runtime.closing import Closing

__all__ = ["SshTransport"]

log = logging.getLogger(__name__)

# One round trip before each upload: create the parent, drop a remote file longer than the local
# one (it cannot be a prefix of it), print the remote size and whether the device has rsync.
_PREPARE = ('mkdir -p -- "$(dirname -- "$1")" || exit 1; '
            'size=$(stat -c %s -- "$1" 2>/dev/null || echo 0); '
            'if [ "$size" -gt "$2" ]; then rm -f -- "$1" || exit 1; size=0; fi; '
            'if command -v rsync >/dev/null 2>&1; then echo "$size rsync"; else echo "$size"; fi')
_PROGRESS = re.compile(rb"\s*([\d,]+)\s+\d+%")
_LITERAL = re.compile(r"Literal data: ([\d,]+) bytes")
_RSYNC_SAFE = re.compile(r"[\w@%+=:,./-]+")
_MIN_RSYNC = (3, 1)  # --info=progress2


class SshTransport(Closing):
    """A device reached as ``ssh://user@host[:port]/path`` (see :class:`Transport`)."""

    def __init__(self, target: Target, *, identity: str | None = None, known_hosts: str | None = None,
                 accept_new_host_key: bool = False, edge_sdk: str = "edge-sdk", connect_timeout: float = 10.0,
                 ssh: str = "ssh", rsync: str = "rsync") -> None:
        if target.kind != "ssh":
            raise DeployError(f"SshTransport needs an ssh:// target, got {target.display!r}",
                              hint="use LocalTransport for a directory on this machine")
        if shutil.which(ssh) is None:
            raise DeployError(f"the ssh client {ssh!r} was not found on this machine",
                              hint="install OpenSSH (apt-get install openssh-client)")
        if identity is not None and not Path(identity).expanduser().is_file():
            raise DeployError(f"identity file {identity!r} does not exist", hint="pass the path of an SSH private key")
        self.target = target
        self.edge_sdk = _split_command(edge_sdk)
        self.known_hosts = known_hosts
        self.rsync = rsync
        self._rsync_usable: bool | None = None
        self._control_dir = tempfile.mkdtemp(prefix="edge-ssh-", dir=_short_temp_dir())
        self._control_path = os.path.join(self._control_dir, "mux")
        self._ssh = [ssh, *self._options(identity, known_hosts, accept_new_host_key, connect_timeout)]
        self._closer = weakref.finalize(self, _end_master, [*self._ssh, "-O", "exit", "--", self._destination],
                                        self._control_dir, self._control_path)

    @property
    def _destination(self) -> str:
        return f"{self.target.user}@{self.target.host}" if self.target.user else self.target.host

    def _options(self, identity: str | None, known_hosts: str | None, accept_new: bool,
                 connect_timeout: float) -> list[str]:
        options = {"BatchMode": "yes", "StrictHostKeyChecking": "accept-new" if accept_new else "yes",
                   "ConnectTimeout": str(max(1, math.ceil(connect_timeout))),
                   "ServerAliveInterval": "15", "ServerAliveCountMax": "4",
                   "ControlMaster": "auto", "ControlPath": _ssh_path(self._control_path), "ControlPersist": "60"}
        if known_hosts:
            options["UserKnownHostsFile"] = _ssh_path(str(Path(known_hosts).expanduser()))
        if identity:
            options["IdentitiesOnly"] = "yes"
        argv = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
        argv += ["-p", str(self.target.port)]
        if identity:
            argv += ["-i", str(Path(identity).expanduser()).replace("%", "%%")]
        return argv

    # -- running commands ------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float = 600.0) -> RunResult:
        """Run ``argv`` on the device; ``edge-sdk`` as argv[0] becomes the configured remote command."""
        argv = list(argv)
        if argv and argv[0] == "edge-sdk":
            argv = self.edge_sdk + argv[1:]
        return self._run_remote(shlex.join(argv), timeout=timeout)

    def _run_remote(self, command: str, *, timeout: float) -> RunResult:
        self._check_open()
        cmd = [*self._ssh, "--", self._destination, command]
        log.debug("running %s", shlex.join(cmd))
        try:
            done = subprocess.run(with_parent(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            return RunResult(124, "", f"timed out after {timeout:.0f} s")
        if done.returncode == 255:
            raise self._connection_error(done.stderr)
        return RunResult(done.returncode, done.stdout, done.stderr)

    def _connection_error(self, stderr: str) -> DeployError:
        lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("@")]
        reason = " / ".join(lines[-3:]) or "ssh exited with status 255"
        return DeployError(f"cannot connect to {self.target.display}: {reason}",
                           hint=_connection_hint(stderr, self.target, self.known_hosts))

    # -- uploads ---------------------------------------------------------------------------------

    def upload(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        """Copy ``local`` to the absolute device path ``remote``, continuing a partial ``remote``."""
        local = Path(local).absolute()
        if not local.is_file():
            raise DeployError(f"cannot upload {local}: not a file")
        if not posixpath.isabs(remote):
            raise DeployError(f"upload destination {remote!r} on {self.target.display} is not an absolute path")
        total = local.stat().st_size
        offset, remote_rsync = self._prepare(remote, total)
        if remote_rsync and self._local_rsync():
            self._rsync(local, remote, offset, total, progress)
        else:
            log.debug("no rsync %s; appending with ssh cat", "on the device" if self._local_rsync() else "here")
            self._append(local, remote, offset, total, progress)

    def _prepare(self, remote: str, total: int) -> tuple[int, bool]:
        result = self.run(["sh", "-c", _PREPARE, "sh", remote, str(total)], timeout=60)
        words = result.stdout.split()
        if result.returncode != 0 or not words or not words[0].isdigit():
            raise DeployError(f"cannot prepare {remote} on {self.target.display}: "
                              f"{result.stderr.strip() or result.stdout.strip() or result.returncode}",
                              hint="check that the deployment root is writable by the ssh user")
        return int(words[0]), "rsync" in words[1:]

    def _local_rsync(self) -> bool:
        """Whether the local rsync exists and knows --append-verify and --info=progress2 (3.1+)."""
        if self._rsync_usable is None:
            self._rsync_usable = _rsync_version(self.rsync) >= _MIN_RSYNC
        return self._rsync_usable

    def _rsync(self, local: Path, remote: str, offset: int, total: int, progress: Progress | None) -> None:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        user = f"{self.target.user}@" if self.target.user else ""
        cmd = [self.rsync, "--append-verify", "--partial", "--protect-args", "--info=progress2", "--no-h",
               "--stats", "-e", _rsync_shell(self._ssh), str(local), f"{user}{host}:{remote}"]
        log.debug("running %s", shlex.join(cmd))
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(with_parent(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=errors)
            try:
                output = _follow(process.stdout, offset, total, progress)
                returncode = process.wait()
            finally:
                stop_process(process)
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
        if returncode != 0:
            raise self._upload_error(local, remote, f"rsync exited with status {returncode}", stderr)
        literal = _LITERAL.search(output)
        log.debug("rsync sent %s new bytes of %s (%d bytes, %d already on the device)",
                  literal[1].replace(",", "") if literal else "?", local, total, offset)
        if progress:
            progress(total, total)

    def _append(self, local: Path, remote: str, offset: int, total: int, progress: Progress | None) -> None:
        self._check_open()
        cmd = [*self._ssh, "--", self._destination, f"cat >> {shlex.quote(remote)}"]
        log.debug("running %s (from byte %d)", shlex.join(cmd), offset)
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(with_parent(cmd), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=errors)
            try:
                _feed(local, offset, process.stdin, progress)
                returncode = process.wait()
            finally:
                stop_process(process)
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
        if returncode == 255:
            raise self._connection_error(stderr)
        if returncode != 0:
            raise self._upload_error(local, remote, f"cat exited with status {returncode}", stderr)
        log.debug("appended %d bytes of %s (%d bytes)", total - offset, local, total)

    def _upload_error(self, local: Path, remote: str, what: str, stderr: str) -> DeployError:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        detail = f": {' / '.join(lines[-3:])}" if lines else ""
        if any(phrase in stderr for phrase in NO_SPACE):
            self._remove(remote)  # a partial that fills the disk would block every later deploy
            return DiskFullError(f"uploading {local} to {remote} on {self.target.display} ran out of space{detail}")
        return DeployError(f"uploading {local} to {remote} on {self.target.display} failed ({what}){detail}",
                           hint=_connection_hint(stderr, self.target, self.known_hosts))

    def _remove(self, remote: str) -> None:
        result = self.run(["rm", "-f", "--", remote], timeout=60)
        if result.returncode != 0:
            log.warning("could not remove %s on %s: %s", remote, self.target.display, result.stderr.strip())

    # -- the end ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._closer.alive:
            raise InternalError(f"the ssh transport to {self.target.display} was used after close()")

    def close(self) -> None:
        """End the shared connection and remove its control directory (safe to call twice)."""
        self._closer()


def with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it dies with this process (Linux ``setpriv --pdeathsig KILL``, util-linux): a
    deploy killed with SIGKILL leaves no rsync or ssh finishing in the background. (The shared
    ControlMaster connection, which ssh detaches, ends by itself ControlPersist seconds later.)"""
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *cmd] if _SETPRIV else cmd


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _split_command(edge_sdk: str) -> list[str]:
    try:
        words = shlex.split(edge_sdk)
    except ValueError as exc:
        raise DeployError(f"remote edge-sdk command {edge_sdk!r} cannot be parsed ({exc})") from None
    if not words:
        raise DeployError("the remote edge-sdk command is empty",
                          hint="pass a path such as /opt/edge-sdk/venv/bin/edge-sdk")
    return words


def _short_temp_dir() -> str:
    """Where the control socket can live: unix socket paths are limited to about 100 bytes."""
    base = tempfile.gettempdir()
    return base if len(base) <= 40 or not os.path.isdir("/tmp") else "/tmp"


def _ssh_path(path: str) -> str:
    """A path as an ssh ``-o`` value: ``%`` escaped (ssh expands %-tokens), quoted if it has spaces."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _rsync_shell(argv: Sequence[str]) -> str:
    """``argv`` as one ``rsync -e`` string: rsync splits on spaces and honours '...' ('' is a quote)."""
    return " ".join(a if _RSYNC_SAFE.fullmatch(a) else "'" + a.replace("'", "''") + "'" for a in argv)


def _rsync_version(rsync: str) -> tuple[int, ...]:
    """The local rsync's version, (0,) if it is missing or does not say."""
    try:
        done = subprocess.run([rsync, "--version"], capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    found = re.search(r"version\s+(\d+)\.(\d+)", done.stdout)
    return (int(found[1]), int(found[2])) if found and done.returncode == 0 else (0,)


def _connection_hint(stderr: str, target: Target, known_hosts: str | None) -> str:
    """What to do about a failed connection, judged from ssh's message."""
    where = f"{target.user}@{target.host}" if target.user else target.host
    keys = known_hosts or "~/.ssh/known_hosts"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
        return (f"the host key of {target.host} has changed: unless the device was reinstalled, this may be an "
                f"attack. After checking the new key's fingerprint on the device, remove the old one with "
                f"`ssh-keygen -R '{name}' -f {keys}` and add the new one")
    if "Host key verification failed" in stderr or re.search(r"No \S+ host key is known", stderr):
        return (f"the host key of {target.host} is unknown or has changed: check its fingerprint on the device "
                f"(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then add it with "
                f"`ssh-keyscan -p {target.port} {target.host} >> {keys}`, "
                f"or pass --accept-new-host-key to trust it on first use")
    if "Permission denied" in stderr:
        return (f"the device refused the key: pass --identity KEY, or authorize yours with "
                f"`ssh-copy-id -p {target.port} {where}`")
    if "Could not resolve hostname" in stderr:
        return f"the host name {target.host!r} does not resolve: check it, or use the device's IP address"
    if re.search(r"refused|timed out|No route to host|unreachable", stderr, re.IGNORECASE):
        return f"the device is unreachable: check that it is on, on the network, and runs sshd on port {target.port}"
    return f"run `ssh -v -p {target.port} {where}` to see why"


def _follow(stream: IO[bytes] | None, offset: int, total: int, progress: Progress | None) -> str:
    """Read rsync's output to its end, reporting ``--info=progress2`` updates; return the output."""
    if stream is None:
        return ""
    chunks: list[bytes] = []
    pending = b""
    while block := os.read(stream.fileno(), 65536):
        chunks.append(block)
        if progress is None:
            continue
        *lines, pending = re.split(rb"[\r\n]", pending + block)
        for line in lines:
            if found := _PROGRESS.match(line):
                progress(max(offset, min(int(found[1].replace(b",", b"")), total)), total)
    return b"".join(chunks).decode(errors="replace")


def _feed(local: Path, offset: int, stdin: IO[bytes] | None, progress: Progress | None) -> None:
    """Write ``local`` from ``offset`` into ``stdin`` and close it (a closed pipe ends early)."""
    if stdin is None:
        return
    try:
        copy_from(local, offset, stdin, progress)
        stdin.close()
    except BrokenPipeError:  # the remote side ended: its exit status says why
        pass


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """End ``process`` if it still runs: SIGTERM, then SIGKILL after 5 s; always reaped, its pipes closed."""
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            try:
                stream.close()
            except BrokenPipeError:
                pass


def _end_master(exit_cmd: list[str], control_dir: str, control_path: str) -> None:
    """Stop the control master (if one was started) and remove its directory."""
    if os.path.exists(control_path):
        log.debug("running %s", shlex.join(exit_cmd))
        try:
            subprocess.run(exit_cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("ending the ssh control master failed: %s", exc)
    shutil.rmtree(control_dir, ignore_errors=True)

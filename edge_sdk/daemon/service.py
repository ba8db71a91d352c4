"""Run the daemon under systemd: the unit file, its installation, and ``sd_notify``.

:func:`render_unit` writes a ``Type=notify`` unit for ``edge-sdk serve --config ...``;
:func:`install_unit` puts it atomically into ``/etc/systemd/system`` (or the user's
``~/.config/systemd/user``) and, only when asked with ``enable=True``, runs
``systemctl daemon-reload`` and ``systemctl enable --now``; otherwise the caller shows
:func:`enable_commands`. :class:`SystemdNotifier` speaks the ``sd_notify`` datagram protocol
over ``$NOTIFY_SOCKET`` without libsystemd, and does nothing when that variable is unset.

The unit restarts always (``Restart=always``, never giving up): an unattended edge device
should come back after a crash, a watchdog kill or a clean-but-unexpected exit alike, and
``systemctl stop`` still stops it. Hardening stays compatible with Jetson: no
``PrivateDevices=`` (cameras are ``/dev/video*``, the GPU is ``/dev/nvhost-*`` and
``/dev/nvmap``) and no ``MemoryDenyWriteExecute=`` (CUDA and onnxruntime generate code).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from edge_sdk.errors import DaemonError
from runtime.files import write_atomic

__all__ = [
    "SystemdNotifier",
    "enable_commands",
    "install_unit",
    "render_unit",
    "system_unit_dir",
    "user_unit_dir",
]

_log = logging.getLogger(__name__)

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.service$")
_HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=full",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
)


def _needs_absolute(what: str, value: str | os.PathLike[str]) -> str:
    text = os.fspath(value)
    if "\n" in text or "\r" in text:
        raise DaemonError(f"{what} {text!r} contains a line break; a unit file cannot hold it")
    if not os.path.isabs(text):
        raise DaemonError(f"{what} {text!r} is not an absolute path; systemd starts services in '/'",
                          hint=f"pass the absolute path, e.g. {os.path.abspath(text)!r}")
    return text


def _quote(arg: str) -> str:
    """One ExecStart= word: ``%`` and ``$`` escaped; double-quoted when it holds a blank or quote."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not re.search(r"[\s\"'\\;]", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _environment_line(key: str, value: str) -> str:
    if not _ENV_KEY.match(key):
        raise DaemonError(f"environment variable name {key!r} is not valid; expected letters, digits and '_', "
                          "not starting with a digit")
    if "\n" in value or "\r" in value:
        raise DaemonError(f"environment variable {key} holds a line break; a unit file cannot hold it")
    text = f"{key}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{text}"'


def _check_watchdog(watchdog_s: int | None) -> None:
    if watchdog_s is not None and (isinstance(watchdog_s, bool) or not isinstance(watchdog_s, int)
                                   or watchdog_s <= 0):
        raise DaemonError(f"watchdog_s={watchdog_s!r} is not a positive whole number of seconds",
                          hint="pass watchdog_s=None for no watchdog")


def _check_user(user: str | None, user_mode: bool) -> None:
    if user is None:
        return
    if user_mode:
        raise DaemonError(f"user={user!r} was given for a --user unit, which always runs as its owner",
                          hint="drop user=, or install a system unit")
    if not _USER_NAME.match(user):
        raise DaemonError(f"user name {user!r} is not valid; expected letters, digits, '_', '.', '-'")


def render_unit(
    *,
    exec_path: str | os.PathLike[str],
    config_path: str | os.PathLike[str],
    user: str | None = None,
    user_mode: bool = False,
    watchdog_s: int | None = 30,
    environment: Mapping[str, str] | None = None,
    start_timeout_s: int = 300,
    stop_timeout_s: int = 60,
) -> str:
    """The text of a systemd unit that runs ``EXEC serve --config CONFIG``.

    ``start_timeout_s`` covers loading models (an engine build can take minutes; the daemon
    may also extend it with ``SystemdNotifier.extend_timeout``); ``stop_timeout_s`` covers
    draining the streams and flushing the MQTT outbox after SIGTERM. The daemon must call
    ``SystemdNotifier.watchdog()`` at least every ``watchdog_s / 2`` seconds once ready.
    """
    exec_text = _needs_absolute("exec_path", exec_path)
    config_text = _needs_absolute("config_path", config_path)
    _check_watchdog(watchdog_s)
    _check_user(user, user_mode)
    env = [_environment_line("PYTHONUNBUFFERED", "1")]
    env += [_environment_line(key, value) for key, value in (environment or {}).items()]
    lines = ["# Written by 'edge-sdk service install'. Settings belong in the --config file.", "[Unit]",
             "Description=edge-sdk on-device inference daemon"]
    if not user_mode:  # a user manager has no network-online.target
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["# Never give up restarting: cameras and brokers can come up long after a power cut.",
              "StartLimitIntervalSec=0", "", "[Service]", "Type=notify", "NotifyAccess=main",
              f"ExecStart={' '.join(_quote(word) for word in (exec_text, 'serve', '--config', config_text))}",
              "Restart=always", "RestartSec=2", f"TimeoutStartSec={start_timeout_s}",
              f"TimeoutStopSec={stop_timeout_s}", "KillSignal=SIGTERM",
              "# Sockets, model files and the event store: room above server.max_connections.",
              "LimitNOFILE=65536"]
    if watchdog_s is not None:
        lines.append(f"WatchdogSec={watchdog_s}")
    lines += _system_lines(user) if not user_mode else ["NoNewPrivileges=yes"]
    lines += env
    lines += ["", "[Install]", f"WantedBy={'default.target' if user_mode else 'multi-user.target'}", ""]
    return "\n".join(lines)


def _system_lines(user: str | None) -> list[str]:
    lines = []
    if user is not None:
        lines += [f"User={user}", "# /dev/video* and the Jetson GPU nodes belong to the video group.",
                  "SupplementaryGroups=video"]
    lines += ["StateDirectory=edge-sdk", "CacheDirectory=edge-sdk",
              '# TensorRT engines are cached here, writable under ProtectSystem/ProtectHome.',
              'Environment="EDGE_SDK_CACHE=%C/edge-sdk"',
              "# No PrivateDevices=: cameras and the GPU are devices. No MemoryDenyWriteExecute=: CUDA JIT.",
              *_HARDENING]
    return lines


def system_unit_dir() -> Path:
    return Path("/etc/systemd/system")


def user_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``, else ``~/.config/systemd/user``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def enable_commands(*, user_mode: bool, name: str = "edge-sdk.service") -> list[list[str]]:
    """The systemctl commands that load and start an installed unit."""
    scope = ["--user"] if user_mode else []
    return [["systemctl", *scope, "daemon-reload"], ["systemctl", *scope, "enable", "--now", name]]


def install_unit(
    text: str,
    *,
    user_mode: bool,
    unit_dir: str | os.PathLike[str] | None = None,
    name: str = "edge-sdk.service",
    enable: bool = False,
    systemctl: str = "systemctl",
) -> Path:
    """Write the unit atomically and return its path; with ``enable=True`` also run
    :func:`enable_commands` (``systemctl`` found on PATH, or an explicit path)."""
    if not _UNIT_NAME.match(name):
        raise DaemonError(f"unit name {name!r} is not a service unit name",
                          hint="use a name such as 'edge-sdk.service' (no '/', ending in .service)")
    directory = Path(unit_dir) if unit_dir is not None else (user_unit_dir() if user_mode else system_unit_dir())
    target = directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(target, text.encode("utf-8"), mode=0o644)
    except PermissionError:
        raise DaemonError(f"cannot write {target}: permission denied",
                          hint="run with sudo for a system unit, or install a --user unit") from None
    _log.info("installed systemd unit %s", target)
    if enable:
        _run_systemctl(systemctl, enable_commands(user_mode=user_mode, name=name))
    return target


def _run_systemctl(systemctl: str, commands: list[list[str]]) -> None:
    executable = shutil.which(systemctl)
    if executable is None:
        raise DaemonError(f"{systemctl!r} was not found; the unit is installed but not enabled",
                          hint="on a machine without systemd, start 'edge-sdk serve' another way")
    for command in commands:
        argv = [executable, *command[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise DaemonError(f"'{' '.join(command)}' failed with exit code {result.returncode}: {detail}",
                              hint="see 'journalctl -xe'; a --user unit needs a running user session")


class SystemdNotifier:
    """``sd_notify`` over ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).

    Without ``NOTIFY_SOCKET`` every call is a no-op returning False, so the daemon calls it
    unconditionally. A failed send is logged (warning once) and never raises.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it was sent."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self._address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            _log.log(level, "sd_notify to %r failed: %s", self._address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([_status(status)] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(_status(text))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to start or stop (systemd >= 236), e.g. during an engine build."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls (half of ``WatchdogSec=``), or None without a watchdog.

        None too when ``$WATCHDOG_PID`` names another process: the watchdog is not ours.
        """
        if not self._watchdog_usec.isdigit() or int(self._watchdog_usec) == 0:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        return int(self._watchdog_usec) / 2 / 1_000_000


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())  # one datagram line per assignment


def _notify_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    _log.debug("NOTIFY_SOCKET=%r is neither a path nor an @abstract name; sd_notify is off", value)
    return None

"""edge_sdk.daemon.service: unit files, atomic installation, sd_notify over real sockets, and
``edge-sdk service install`` through its parser function."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk._cli_service import add_service_parser
from edge_sdk.daemon.service import (
    SystemdNotifier,
    enable_commands,
    install_unit,
    render_unit,
    user_unit_dir,
)
from edge_sdk.errors import DaemonError

EXEC = "/opt/edge-sdk/venv/bin/edge-sdk"
CONFIG = "/etc/edge-sdk/edge-sdk.toml"


def directives(text: str) -> dict[str, list[str]]:
    """{key: [values in order]} of a unit's non-comment lines."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[")]


def test_system_unit() -> None:
    text = render_unit(exec_path=EXEC, config_path=CONFIG, user="edge")
    d = directives(text)
    assert sections(text) == ["[Unit]", "[Service]", "[Install]"]
    assert d["ExecStart"] == [f"{EXEC} serve --config {CONFIG}"]
    for key, value in {"Type": "notify", "NotifyAccess": "main", "Restart": "always", "RestartSec": "2",
                       "WatchdogSec": "30", "TimeoutStopSec": "60", "TimeoutStartSec": "300",
                       "KillSignal": "SIGTERM", "User": "edge", "SupplementaryGroups": "video",
                       "StateDirectory": "edge-sdk", "NoNewPrivileges": "yes", "ProtectSystem": "full",
                       "WantedBy": "multi-user.target", "After": "network-online.target",
                       "StartLimitIntervalSec": "0", "LimitNOFILE": "65536"}.items():
        assert d[key] == [value], key
    assert '"EDGE_SDK_CACHE=%C/edge-sdk"' in d["Environment"] and '"PYTHONUNBUFFERED=1"' in d["Environment"]
    assert "PrivateDevices" not in d and "MemoryDenyWriteExecute" not in d  # cameras, GPU nodes, CUDA JIT
    assert text.endswith("\n")


def test_system_unit_without_user_runs_as_root_and_can_drop_the_watchdog() -> None:
    d = directives(render_unit(exec_path=EXEC, config_path=CONFIG, watchdog_s=None))
    assert "User" not in d and "SupplementaryGroups" not in d and "WatchdogSec" not in d
    assert d["StateDirectory"] == ["edge-sdk"]


def test_user_unit() -> None:
    text = render_unit(exec_path=EXEC, config_path="/home/me/.config/edge-sdk/edge-sdk.toml", user_mode=True,
                       watchdog_s=20, environment={"OMP_NUM_THREADS": "2"})
    d = directives(text)
    assert d["WantedBy"] == ["default.target"] and d["WatchdogSec"] == ["20"] and d["Type"] == ["notify"]
    for absent in ("User", "SupplementaryGroups", "StateDirectory", "ProtectSystem", "After", "Wants"):
        assert absent not in d, absent
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["Environment"] == ['"PYTHONUNBUFFERED=1"', '"OMP_NUM_THREADS=2"']


def test_paths_and_environment_are_escaped_for_systemd() -> None:
    d = directives(render_unit(exec_path="/opt/edge sdk/bin/edge-sdk", config_path="/etc/edge-sdk/100%$x.toml",
                               environment={"NOTE": 'say "hi" 50%'}))
    assert d["ExecStart"] == ['"/opt/edge sdk/bin/edge-sdk" serve --config /etc/edge-sdk/100%%$$x.toml']
    assert '"NOTE=say \\"hi\\" 50%%"' in d["Environment"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"exec_path": "edge-sdk"}, "exec_path 'edge-sdk' is not an absolute path"),
    ({"config_path": "edge-sdk.toml"}, "config_path 'edge-sdk.toml' is not an absolute path"),
    ({"config_path": "/etc/a\nb.toml"}, "contains a line break"),
    ({"watchdog_s": 0}, "watchdog_s=0 is not a positive whole number"),
    ({"user": "edge", "user_mode": True}, "--user unit, which always runs as its owner"),
    ({"user": "bad user"}, "user name 'bad user' is not valid"),
    ({"environment": {"1BAD": "x"}}, "environment variable name '1BAD' is not valid"),
])
def test_render_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"exec_path": EXEC, "config_path": CONFIG, **kwargs}
    with pytest.raises(DaemonError, match=match):
        render_unit(**arguments)  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_system_unit(tmp_path: Path) -> None:
    unit = tmp_path / "edge-sdk.service"
    unit.write_text(render_unit(exec_path=sys.executable, config_path=str(tmp_path / "my config.toml"),
                                environment={"OMP_NUM_THREADS": "2"}))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "edge-sdk.service:" not in result.stderr, result.stderr  # no complaint about any line


def test_install_writes_atomically_into_the_unit_dir(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"  # created on demand
    first = render_unit(exec_path=EXEC, config_path=CONFIG)
    path = install_unit(first, user_mode=False, unit_dir=unit_dir)
    assert path == unit_dir / "edge-sdk.service" and path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    second = render_unit(exec_path=EXEC, config_path=CONFIG, watchdog_s=10)
    install_unit(second, user_mode=False, unit_dir=unit_dir)
    assert path.read_text() == second
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert [p.name for p in unit_dir.iterdir()] == ["edge-sdk.service"]  # no temporary left behind


def test_install_rejects_a_bad_unit_name(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="not a service unit name"):
        install_unit("x", user_mode=False, unit_dir=tmp_path, name="../evil.service")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_install_reports_permission_problems(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(DaemonError, match="permission denied") as caught:
        install_unit("x", user_mode=False, unit_dir=locked)
    assert caught.value.hint and "--user" in caught.value.hint


def test_install_enable_runs_systemctl(tmp_path: Path) -> None:
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    fake.chmod(0o755)
    install_unit("[Unit]\n", user_mode=True, unit_dir=tmp_path / "u", enable=True, systemctl=str(fake))
    assert log.read_text().splitlines() == ["--user daemon-reload", "--user enable --now edge-sdk.service"]

    fake.write_text('#!/bin/sh\necho "Failed to connect to bus" >&2\nexit 1\n')
    with pytest.raises(DaemonError, match="daemon-reload' failed with exit code 1: Failed to connect to bus"):
        install_unit("[Unit]\n", user_mode=False, unit_dir=tmp_path / "s", enable=True, systemctl=str(fake))
    with pytest.raises(DaemonError, match="was not found; the unit is installed but not enabled"):
        install_unit("[Unit]\n", user_mode=False, unit_dir=tmp_path / "s", enable=True,
                     systemctl=str(tmp_path / "missing"))


def test_enable_commands_and_user_unit_dir(tmp_path: Path) -> None:
    assert enable_commands(user_mode=False) == [["systemctl", "daemon-reload"],
                                                ["systemctl", "enable", "--now", "edge-sdk.service"]]
    assert enable_commands(user_mode=True)[1] == ["systemctl", "--user", "enable", "--now", "edge-sdk.service"]
    assert user_unit_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "systemd" / "user"
    assert user_unit_dir({}) == Path.home() / ".config" / "systemd" / "user"


# -- sd_notify ------------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notifier_sends_each_state(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="serving 2 models")
    assert receive(sock) == "READY=1\nSTATUS=serving 2 models"
    assert notifier.watchdog() and receive(sock) == "WATCHDOG=1"
    assert notifier.status("loading\nengines") and receive(sock) == "STATUS=loading engines"
    assert notifier.extend_timeout(90) and receive(sock) == "EXTEND_TIMEOUT_USEC=90000000"
    assert notifier.stopping() and receive(sock) == "STOPPING=1"


def test_notifier_reaches_an_abstract_socket() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract unix sockets are Linux-only")
    name = f"edge-sdk-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready() and receive(sock) == "READY=1"
        assert notifier.watchdog() and receive(sock) == "WATCHDOG=1"
        assert notifier.stopping() and receive(sock) == "STOPPING=1"


def test_notifier_is_a_no_op_without_notify_socket(tmp_path: Path) -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping() and not notifier.status("x")
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled  # not a transport we speak


def test_notifier_survives_a_dead_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.watchdog() and not notifier.watchdog()
    assert caplog.text.count("sd_notify to") == 1  # warned once, then debug


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(environ).watchdog_interval() == expected


def test_notifier_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch,
                                                notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier()
    assert notifier.watchdog_interval() == 2.0
    assert notifier.ready() and receive(sock) == "READY=1"


# -- edge-sdk service install -----------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edge-sdk")
    add_service_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_print_renders_the_unit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "edge-sdk.toml"
    assert run_cli("service", "install", "--print", "--config", str(config), "--exec", EXEC,
                   "--run-as", "edge", "--unit-dir", str(tmp_path / "units")) == 0
    out = capsys.readouterr().out
    d = directives(out)
    assert d["ExecStart"] == [f"{EXEC} serve --config {config}"] and d["User"] == ["edge"]
    assert not (tmp_path / "units").exists()  # --print installs nothing


def test_cli_install_user_unit(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert run_cli("service", "install", "--user", "--exec", EXEC) == 0
    captured = capsys.readouterr()
    unit = tmp_path / "xdg" / "systemd" / "user" / "edge-sdk.service"
    d = directives(unit.read_text())
    assert d["ExecStart"] == [f"{EXEC} serve --config {tmp_path / 'xdg' / 'edge-sdk' / 'edge-sdk.toml'}"]
    assert d["WantedBy"] == ["default.target"]
    assert f"installed {unit}" in captured.out
    assert "  systemctl --user daemon-reload" in captured.out
    assert "  systemctl --user enable --now edge-sdk.service" in captured.out
    assert "loginctl enable-linger" in captured.out
    assert "does not exist yet" in captured.err


def test_cli_install_resolves_a_relative_config_and_system_commands_use_sudo(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edge-sdk.toml").write_text("[server]\n")
    assert run_cli("service", "install", "--config", "edge-sdk.toml", "--unit-dir", str(tmp_path / "units"),
                   "--exec", EXEC) == 0
    captured = capsys.readouterr()
    d = directives((tmp_path / "units" / "edge-sdk.service").read_text())
    assert d["ExecStart"] == [f"{EXEC} serve --config {tmp_path / 'edge-sdk.toml'}"]
    assert "  sudo systemctl daemon-reload" in captured.out and captured.err == ""

"""SshTransport against a real OpenSSH server on loopback (tests/sshd.py)."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from edge_sdk.deploy.ssh import SshTransport
from edge_sdk.deploy.transport import DeployError, Target, parse_target
from edge_sdk.errors import InternalError
from tests.sshd import Sshd, require_sshd

EDGE_SDK = f"{sys.executable} -m edge_sdk.cli"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    require_sshd()
    with Sshd(tmp_path_factory.mktemp("sshd")) as running:
        yield running


def connect(server: Sshd, root: Path, **kwargs: object) -> SshTransport:
    options: dict[str, object] = {"identity": str(server.identity), "known_hosts": str(server.known_hosts),
                                  "edge_sdk": EDGE_SDK}
    options.update(kwargs)
    return SshTransport(parse_target(server.url(str(root))), **options)  # type: ignore[arg-type]


@pytest.fixture
def transport(server: Sshd, tmp_path: Path) -> Iterator[SshTransport]:
    opened = connect(server, tmp_path / "device")
    yield opened
    opened.close()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def settled_size(path: Path) -> int:
    """The size of a file some process may still be finishing (an interrupted receiver)."""
    size = -1
    while size != path.stat().st_size:
        size = path.stat().st_size
        time.sleep(0.2)
    return size


def sent_bytes(caplog: pytest.LogCaptureFixture) -> int:
    found = [re.search(r"rsync sent (\d+) new bytes", r.getMessage()) for r in caplog.records]
    return [int(m[1]) for m in found if m][-1]


def accepted_logins(server: Sshd) -> int:
    return server.log.read_text().count("Accepted publickey")


# -- run ---------------------------------------------------------------------------------------------


def test_run_returns_output_and_exit_code(transport: SshTransport) -> None:
    result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_run_passes_arguments_unchanged_through_the_remote_shell(transport: SshTransport) -> None:
    result = transport.run(["printf", "%s|", "a b", "it's", "$HOME", "*", ""])
    assert (result.returncode, result.stdout) == (0, "a b|it's|$HOME|*||")


def test_edge_sdk_is_the_configured_remote_command(transport: SshTransport) -> None:
    result = transport.run(["edge-sdk", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: edge-sdk")


def test_a_command_past_its_timeout_gives_124(transport: SshTransport) -> None:
    started = time.monotonic()
    result = transport.run(["sleep", "5"], timeout=0.5)
    assert result.returncode == 124 and time.monotonic() - started < 3


def test_commands_share_one_connection_that_close_ends(server: Sshd, transport: SshTransport) -> None:
    before = accepted_logins(server)
    for _ in range(3):
        assert transport.run(["true"]).returncode == 0
    assert accepted_logins(server) == before + 1
    control = Path(transport._control_path)
    check = subprocess.run(["ssh", "-O", "check", "-o", f"ControlPath={control}", "x"], capture_output=True, text=True)
    pid = int(re.search(r"pid=(\d+)", check.stderr)[1])  # type: ignore[index]
    assert control.is_socket() and process_alive(pid)
    transport.close()
    transport.close()  # twice is fine
    assert not control.parent.exists()
    deadline = time.monotonic() + 5
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)
    with pytest.raises(InternalError, match="after close"):
        transport.run(["true"])


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- upload --------------------------------------------------------------------------------------------


def test_upload_creates_parents_and_copies(transport: SshTransport, tmp_path: Path) -> None:
    data = random_file(tmp_path / "model.bin", 1 << 20)
    remote = tmp_path / "device" / "it's a dir" / "model.bin"
    seen: list[tuple[int, int]] = []
    transport.upload(tmp_path / "model.bin", str(remote), progress=lambda done, total: seen.append((done, total)))
    assert remote.read_bytes() == data
    assert seen[-1] == (len(data), len(data))


def test_interrupted_upload_resumes_where_it_stopped(server: Sshd, transport: SshTransport, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = random_file(tmp_path / "big.bin", 24 << 20)
    slow_rsync = tmp_path / "slow-rsync"
    slow_rsync.write_text('#!/bin/sh\nexec rsync --bwlimit=8m "$@"\n')
    slow_rsync.chmod(0o755)
    remote = tmp_path / "device" / "objects" / "big.partial"

    def stop_at_a_quarter(done: int, total: int) -> None:
        if done >= total // 4:
            raise Interrupted

    with connect(server, tmp_path / "device", rsync=str(slow_rsync)) as slow, pytest.raises(Interrupted):
        slow.upload(tmp_path / "big.bin", str(remote), progress=stop_at_a_quarter)
    partial = settled_size(remote)
    assert 0 < partial < len(data)
    inode = remote.stat().st_ino

    caplog.set_level(logging.DEBUG, logger="edge_sdk.deploy.ssh")
    seen: list[int] = []
    transport.upload(tmp_path / "big.bin", str(remote), progress=lambda done, total: seen.append(done))
    assert remote.read_bytes() == data
    assert remote.stat().st_ino == inode  # appended in place, not rewritten
    assert sent_bytes(caplog) == len(data) - partial
    assert min(seen) >= partial  # progress counts from where the device stood


def test_a_partial_file_with_wrong_bytes_is_repaired(transport: SshTransport, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = random_file(tmp_path / "model.bin", 4 << 20)
    remote = tmp_path / "device" / "model.partial"
    remote.parent.mkdir(parents=True)
    remote.write_bytes(b"\0" * (1 << 20))
    caplog.set_level(logging.DEBUG, logger="edge_sdk.deploy.ssh")
    transport.upload(tmp_path / "model.bin", str(remote))
    assert remote.read_bytes() == data
    assert sent_bytes(caplog) > len(data) - (1 << 20)  # the checksum failed, the whole file went again


def test_a_remote_file_longer_than_the_local_one_is_replaced(transport: SshTransport, tmp_path: Path) -> None:
    data = random_file(tmp_path / "model.bin", 1000)
    remote = tmp_path / "device" / "model.partial"
    remote.parent.mkdir(parents=True)
    remote.write_bytes(data + b"stale tail")
    transport.upload(tmp_path / "model.bin", str(remote))
    assert remote.read_bytes() == data


def test_without_rsync_the_rest_is_appended_over_ssh(server: Sshd, tmp_path: Path) -> None:
    data = random_file(tmp_path / "model.bin", 3 << 20)
    remote = tmp_path / "device" / "a b" / "model.partial"
    remote.parent.mkdir(parents=True)
    remote.write_bytes(data[: 1 << 20])
    inode = remote.stat().st_ino
    seen: list[int] = []
    with connect(server, tmp_path / "device", rsync=str(tmp_path / "no-rsync-here")) as plain:
        plain.upload(tmp_path / "model.bin", str(remote), progress=lambda done, total: seen.append(done))
    assert remote.read_bytes() == data and remote.stat().st_ino == inode
    assert seen[0] > 1 << 20 and seen[-1] == len(data)


def test_an_unwritable_destination_names_the_path(transport: SshTransport, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "file").write_text("")
    remote = f"{tmp_path}/device/file/objects/a"
    with pytest.raises(DeployError, match=f"cannot prepare {remote} on ssh://") as caught:
        transport.upload(tmp_path / "a", remote)
    assert "Not a directory" in caught.value.message and "writable" in (caught.value.hint or "")


def test_upload_refuses_a_relative_destination(transport: SshTransport, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(DeployError, match="not an absolute path"):
        transport.upload(tmp_path / "a", "objects/a")


# -- host keys and failures -------------------------------------------------------------------------------


def test_an_unknown_host_key_is_refused_with_how_to_add_it(server: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with connect(server, tmp_path, known_hosts=str(empty)) as strict, pytest.raises(DeployError) as caught:
        strict.run(["true"])
    assert "cannot connect to ssh://" in caught.value.message and str(server.port) in caught.value.message
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> {empty}" in (caught.value.hint or "")
    assert "--accept-new-host-key" in (caught.value.hint or "")
    assert empty.read_text() == ""


def test_a_changed_host_key_is_refused_even_when_accepting_new_keys(server: Sshd, tmp_path: Path) -> None:
    other = tmp_path / "known_hosts"
    other.write_text(f"[127.0.0.1]:{server.port} {server.identity.with_suffix('.pub').read_text()}")
    with connect(server, tmp_path, known_hosts=str(other), accept_new_host_key=True) as strict:
        with pytest.raises(DeployError, match="REMOTE HOST IDENTIFICATION HAS CHANGED|verification failed") as caught:
            strict.run(["true"])
    assert f"ssh-keygen -R '[127.0.0.1]:{server.port}'" in (caught.value.hint or "")


def test_accept_new_host_key_connects_and_records_the_key(server: Sshd, tmp_path: Path) -> None:
    recorded = tmp_path / "known_hosts"
    recorded.write_text("")
    with connect(server, tmp_path, known_hosts=str(recorded), accept_new_host_key=True) as trusting:
        assert trusting.run(["true"]).returncode == 0
    host_key = server.known_hosts.read_text().split()[2]
    assert host_key in recorded.read_text()
    with connect(server, tmp_path, known_hosts=str(recorded)) as strict:  # now known: strict checking passes
        assert strict.run(["true"]).returncode == 0


def test_an_unreachable_device_fails_quickly_and_clearly(server: Sshd, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = Target("ssh", str(tmp_path), "127.0.0.1", server.user, port)
    started = time.monotonic()
    with SshTransport(target, identity=str(server.identity), known_hosts=str(server.known_hosts),
                      connect_timeout=2) as down, pytest.raises(DeployError) as caught:
        down.run(["true"])
    assert time.monotonic() - started < 5
    assert "refused" in caught.value.message and "unreachable" in (caught.value.hint or "")


def test_a_refused_key_says_so(server: Sshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with connect(server, tmp_path, identity=str(stranger)) as refused, pytest.raises(DeployError) as caught:
        refused.run(["true"])
    assert "Permission denied" in caught.value.message and "--identity" in (caught.value.hint or "")


def test_bad_arguments_are_refused_up_front(server: Sshd, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="needs an ssh:// target"):
        SshTransport(parse_target(str(tmp_path)))
    with pytest.raises(DeployError, match="identity file"):
        connect(server, tmp_path, identity=str(tmp_path / "missing_key"))
    with pytest.raises(DeployError, match="empty"):
        connect(server, tmp_path, edge_sdk=" ")

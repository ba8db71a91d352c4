"""Deploys over real OpenSSH on loopback that must never leave a device worse than they found it, with a
real daemon serving ``ROOT/current``: a refused package never comes back through a rollback, a daemon that
is down is not a failed deploy, a package that cannot serve is stopped at preflight, success means the
daemon serves what was installed, and a rollback verifies where it goes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from edge_sdk.cli import main
from edge_sdk.client import Client
from runtime.package import Package, write_package
from tests.integration.test_daemon import TOKEN, DaemonProcess, write_config
from tests.integration.test_deploy import DEVICE_EDGE_SDK, colors_package, current_version
from tests.services import free_port
from tests.sshd import Sshd, require_sshd


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    require_sshd()
    with Sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def versions(tmp_path: Path, image_folder: Path) -> dict[str, Path]:
    return {v: colors_package(tmp_path, image_folder, v, golden_samples=3 + int(v)) for v in ("1", "2")}


class Device:
    """A deployment root reached over ssh, and a daemon configured to serve ``ROOT/current``."""

    def __init__(self, tmp: Path, server: Sshd, text_package: Path, *, serve_from: Path | None = None) -> None:
        self.root = tmp / "device"
        self.port = free_port()
        self.config = write_config(tmp, port=self.port,
                                   models={"colors": serve_from or self.root / "current", "words": text_package})
        self.daemon = DaemonProcess(self.config, self.port)
        self.ssh = ["--to", server.url(str(self.root)), "--identity", str(server.identity), "--known-hosts",
                    str(server.known_hosts), "--edge-sdk", DEVICE_EDGE_SDK]

    def deploy(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict]]:  # type: ignore[type-arg]
        capsys.readouterr()
        code = main(["deploy", *args, *self.ssh, "--config", str(self.config), "--json"])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip().startswith("[") else []

    def serving(self) -> str:
        return {m["name"]: m["version"] for m in Client(self.daemon.url, TOKEN).models()}["colors"]


def test_a_refused_package_never_comes_back_through_a_rollback_or_a_restart(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], image_folder: Path, text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = Device(tmp_path, sshd, text_package)
    assert device.deploy(capsys, str(versions["1"]))[0] == 0  # the daemon is not running yet
    device.daemon.start()
    try:
        assert device.deploy(capsys, str(versions["2"]))[0] == 0 and device.serving() == "2"
        # labels the daemon's fusion rule does not map: preflight passes, the daemon refuses the swap
        odd = colors_package(tmp_path, image_folder, "3", labels=["red", "green", "purple"])
        code, [result] = device.deploy(capsys, str(odd))
        assert code == 1 and result["step"] == "reload" and result["rolled_back"]
        assert "rolled back to colors 2" in result["message"] and current_version(device.root) == "2"
        # a manual rollback used to switch to the refused package (previous) and report success
        code, [back] = device.deploy(capsys, "--rollback")
        assert code == 1 and "no previous version" in back["message"]
        assert current_version(device.root) == "2" and device.serving() == "2"
        refused = json.loads((device.root / "refused.json").read_text())
        assert list(refused) == [hashlib.sha256(Package.open(odd).manifest_bytes).hexdigest()]
        device.daemon.kill()  # and a restart serves what current says
        device.daemon.start()
        assert device.serving() == "2"
    finally:
        device.daemon.kill()


def test_a_fix_deploys_while_the_daemon_is_down_and_is_served_when_it_starts(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = Device(tmp_path, sshd, text_package)
    code, [first] = device.deploy(capsys, str(versions["1"]))
    assert code == 0 and first["ok"] and "the daemon is not running" in first["message"]
    code, [fix] = device.deploy(capsys, str(versions["2"]))
    assert code == 0 and not fix["rolled_back"] and current_version(device.root) == "2"
    assert "it will serve colors 2 when it starts" in fix["message"]
    device.daemon.start()
    try:
        assert device.serving() == "2"
    finally:
        device.daemon.kill()


def test_labels_that_do_not_match_the_graph_are_stopped_at_preflight(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    device = Device(tmp_path, sshd, text_package)
    assert device.deploy(capsys, str(versions["1"]))[0] == 0
    pkg = Package.open(versions["2"])
    m = pkg.manifest
    lying = tmp_path / "two-labels.edgepkg"  # 2 labels for 3 outputs, every hash right
    write_package(replace(m, version="2-labels", postprocess=replace(m.postprocess, labels=m.postprocess.labels[:2])),
                  {name: pkg.read_bytes(name) for name in m.files}, lying)
    code, [result] = device.deploy(capsys, str(lying))
    assert code == 1 and result["step"] == "preflight" and "manifest has 2 labels" in result["message"]
    assert current_version(device.root) == "1"


def test_success_means_the_daemon_serves_the_installed_version(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = Path(versions["1"])
    device = Device(tmp_path, sshd, text_package, serve_from=other)  # its config points elsewhere
    device.daemon.start()
    try:
        code, [result] = device.deploy(capsys, str(versions["2"]))
        assert code == 1 and result["step"] == "reload"
        assert "does not point at this deployment" in result["message"] and str(device.root / "current") in \
            result["message"]
        assert not (device.root / "refused.json").exists()  # the config is wrong, not the package
        capsys.readouterr()
        assert main(["deploy", "--status", *device.ssh, "--config", str(device.config)]) == 0
        out = capsys.readouterr().out
        assert "serving" in out and "colors 1" in out  # what the daemon really serves, beside current
    finally:
        device.daemon.kill()


def test_a_rollback_verifies_the_version_it_switches_to(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = Device(tmp_path, sshd, text_package)
    assert device.deploy(capsys, str(versions["1"]))[0] == 0
    assert device.deploy(capsys, str(versions["2"]))[0] == 0
    previous = device.root / "previous"
    model = previous / "model.onnx"
    os.chmod(model, 0o644)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged previous version
    model.write_bytes(bytes(data))
    code, [back] = device.deploy(capsys, "--rollback")
    assert code == 1 and "cannot serve here" in back["message"] and "not rolling back" in back["message"]
    assert current_version(device.root) == "2"


def test_a_typo_in_model_is_caught_before_anything_is_switched(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], text_package: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = Device(tmp_path, sshd, text_package)
    assert device.deploy(capsys, str(versions["1"]))[0] == 0
    code, [result] = device.deploy(capsys, str(versions["2"]), "--model", "colours")
    assert code == 1 and result["step"] == "preflight" and "--model colours: not configured" in result["message"]
    assert current_version(device.root) == "1"


def test_edge_sdk_missing_on_the_device_says_how_to_install_it(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    target = sshd.url(str(tmp_path / "device"))
    code = main(["deploy", str(versions["1"]), "--to", target, "--identity", str(sshd.identity), "--known-hosts",
                 str(sshd.known_hosts), "--edge-sdk", "/opt/nowhere/bin/edge-sdk"])
    out = capsys.readouterr().out
    assert code == 1 and "edge-sdk is not installed where the device looks for it" in out
    assert "hint: install it on the device" in out and "--edge-sdk" in out


def test_one_deploy_at_a_time_per_device_and_each_device_listed_once(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from edge_sdk.deploy.agent import LOCK, LOCK_STALE_S, lock

    root = tmp_path / "device"
    ssh = ["--to", sshd.url(str(root)), "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts),
           "--edge-sdk", DEVICE_EDGE_SDK]
    lock(str(root), "line2-laptop:4242")  # another workstation's deploy is under way
    assert main(["deploy", str(versions["1"]), *ssh, "--json"]) == 1
    [result] = json.loads(capsys.readouterr().out)
    assert result["step"] == "connect" and "another deploy (line2-laptop:4242)" in result["message"]
    assert not (root / "current").exists()
    # a lock its holder stopped renewing (a workstation that died) is taken over
    (root / LOCK).write_text(json.dumps({"owner": "line2-laptop:4242", "at": time.time() - LOCK_STALE_S - 1}))
    assert main(["deploy", str(versions["1"]), *ssh]) == 0 and current_version(root) == "1"
    assert not (root / LOCK).exists()  # given back
    # a deploy of this workstation killed a moment ago (kill -9: nothing given back) is taken over at once
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock(str(root), f"{socket.gethostname()}:{int(dead.stdout)}")
    assert main(["deploy", str(versions["2"]), *ssh]) == 0 and current_version(root) == "2"
    assert not (root / LOCK).exists()
    capsys.readouterr()
    assert main(["deploy", str(versions["2"]), *ssh, "--to", sshd.url(str(root))]) == 1
    assert "is listed 2 times" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's one-line usage error, not a traceback
        main(["deploy", str(versions["2"]), *ssh, "--parallel", "0"])
    assert "'0' is not an integer >= 1" in capsys.readouterr().err


def test_devices_a_failed_canary_kept_back_are_listed_as_skipped(
        tmp_path: Path, versions: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert main(["deploy", str(versions["1"]), "--to", str(blocked / "device"), "--to", str(tmp_path / "b"),
                 "--canary", "1"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(str(tmp_path / "b")))
    assert "skipped" in row and "FAILED" not in row
    assert "0 of 2 devices succeeded; failed: " in out and "not attempted (a canary failed)" in out


DRIVER = """
import sys
from edge_sdk.deploy.deploy import Options, deploy
from edge_sdk.deploy.ssh import SshTransport
from edge_sdk.deploy.transport import parse_target
target, identity, known, edge, rsync, package = sys.argv[1:]
t = SshTransport(parse_target(target), identity=identity, known_hosts=known, edge_sdk=edge, rsync=rsync)
deploy(package, [(t, Options())])
"""


def test_a_deploy_killed_mid_upload_leaves_no_rsync_running_and_no_staged_copy(
        tmp_path: Path, sshd: Sshd, versions: dict[str, Path]) -> None:
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from edge_sdk.deploy.deploy import STAGING_PREFIX, _sweep_staging

    # a link of 1 KB/s, its output not read by the deploy (so that a dead reader cannot stop it by SIGPIPE):
    # the upload is still running when the deploy dies, and would run on for many seconds
    slow = tmp_path / "slow-rsync"
    slow.write_text('#!/bin/sh\n[ "$1" = --version ] && exec rsync --version\nexec rsync --bwlimit=1 "$@" >/dev/null\n')
    slow.chmod(0o755)
    source = Package.open(versions["1"])
    big = tmp_path / "big.edgepkg"  # 200 KB more to send: minutes at 1 KB/s
    write_package(source.manifest, {**{n: source.read_bytes(n) for n in source.manifest.files},
                                    "reports/blob.bin": os.urandom(200_000)}, big)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, sshd.url(str(tmp_path / "device")), str(sshd.identity),
                               str(sshd.known_hosts), DEVICE_EDGE_SDK, str(slow), str(big)])

    def uploading() -> list[str]:
        out = subprocess.run(["pgrep", "-f", "--", "--bwlimit=1"], capture_output=True, text=True).stdout
        return out.split()

    try:
        deadline = time.monotonic() + 60
        while not uploading():
            assert driver.poll() is None and time.monotonic() < deadline, "the upload never started"
            time.sleep(0.1)
        staged = list(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{driver.pid}-*"))
        assert staged
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 1  # dies with it (pdeathsig), not when the link notices seconds later
        while uploading() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not uploading(), "rsync kept running after the deploy was killed"
        _sweep_staging()  # what the next deploy does first
        assert not any(p.exists() for p in staged)
    finally:
        driver.kill()


def test_a_deploy_under_way_renews_its_lock_so_it_is_never_taken_over(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from edge_sdk.deploy import deploy as deploy_module
    from edge_sdk.deploy.agent import LOCK, lock
    from edge_sdk.deploy.transport import LocalTransport, parse_target

    monkeypatch.setattr(deploy_module, "LOCK_RENEW_S", 0.2)
    root = tmp_path / "device"
    with deploy_module.device_lock(LocalTransport(parse_target(str(root)))):
        taken = json.loads((root / LOCK).read_text())["at"]
        time.sleep(1.0)
        renewed = json.loads((root / LOCK).read_text())["at"]
        assert renewed > taken + 0.5
        assert "held_by" in lock(str(root), "line2-laptop:4242")  # another workstation is refused meanwhile
    assert not (root / LOCK).exists()

"""The device's content store under real conditions: a damaged stored file is sent again and every
version sharing it repaired; modes are explicit (0444 files, 0755 directories) after a real rsync
upload interrupted and resumed over OpenSSH under a umask of 077; ``--keep`` retention removes old
versions, their objects and stale partial uploads; and on a real 20 MiB filesystem (tmpfs) the
upload is refused before it starts when it cannot fit, and an upload that runs out of space leaves
no partial file behind, so the next deployment still fits."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from edge_sdk.cli import main
from edge_sdk.deploy.deploy import LocalPackage, Options, deploy
from edge_sdk.deploy.ssh import SshTransport
from edge_sdk.deploy.transport import LocalTransport, Progress, RunResult, Target, Transport, parse_target
from runtime.package import Package, write_package
from tests.integration.test_deploy import DEVICE_EDGE_SDK, colors_package, current_version, local
from tests.integration.test_deploy import versions  # noqa: F401 (a fixture)
from tests.sshd import Sshd, require_sshd

# The device's edge-sdk under a umask that would make every file it creates private to its user.
PRIVATE_UMASK_EDGE_SDK = f"sh -c 'umask 077 && exec \"$0\" -m edge_sdk.cli \"$@\"' {sys.executable}"


@pytest.fixture
def base(tmp_path: Path, image_folder: Path) -> Path:
    return colors_package(tmp_path, image_folder, "1")


def padded(base: Path, out: Path, version: str, size: int) -> Path:
    """``base`` with one more file of ``size`` random bytes: a package of that size, its own content."""
    pkg = Package.open(base)
    files = {name: pkg.read_bytes(name) for name in pkg.manifest.files}
    files["extra/blob.bin"] = os.urandom(size)
    write_package(replace(pkg.manifest, version=version), files, out)
    return out


def digest_of(package: Path, tmp: Path) -> str:
    staging = tmp / f"staging-{package.name}"
    staging.mkdir()
    return LocalPackage.open(package, staging).digest


def modes(root: Path) -> dict[str, int]:
    """The mode of every file and directory under objects/ and versions/ (links are not followed)."""
    out = {}
    for top in (root / "objects", root / "versions"):
        for path in [top, *top.rglob("*")]:
            if not path.is_symlink():
                out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def referenced(root: Path) -> set[str]:
    """Every object the installed versions are made of (manifests included)."""
    refs = set()
    for version in (root / "versions").iterdir():
        refs |= {e.sha256 for e in Package.open(version).manifest.files.values()} | {version.name}
    return refs


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    require_sshd()
    with Sshd(tmp_path / "sshd") as server:
        yield server


def ssh(server: Sshd, root: Path, edge_sdk: str, rsync: str = "rsync") -> SshTransport:
    return SshTransport(parse_target(server.url(str(root))), identity=str(server.identity),
                        known_hosts=str(server.known_hosts), edge_sdk=edge_sdk, rsync=rsync)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB filesystem mounted for the test (tmpfs): running out of space there is the kernel's ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("needs a small real filesystem: there is no `mount` here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs a small real filesystem: `mount -t tmpfs` failed ({done.stderr.strip() or done.returncode});"
                    " run the tests as root or with CAP_SYS_ADMIN")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- damaged files ---------------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    os.chmod(path, 0o644)  # whoever damages a file can write it (root can anyway)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with path.open("r+b") as f:  # in place: the same inode, so every hard link of it sees the damage
        f.write(data)


def test_a_damaged_stored_file_is_sent_again_and_every_version_sharing_it_repaired(
        tmp_path: Path, versions: dict[str, Path]) -> None:
    root = tmp_path / "device"
    assert deploy(versions["1"], [local(root)])[0].ok and deploy(versions["2"], [local(root)])[0].ok
    v1, v2 = (digest_of(versions[v], tmp_path) for v in ("1", "2"))
    model = Package.open(versions["2"]).manifest.files["model.onnx"]
    assert Package.open(versions["1"]).manifest.files["model.onnx"].sha256 == model.sha256  # shared by both
    assert modes(root)[f"objects/{model.sha256}"] == 0o444  # read-only: nobody writes into it by mistake
    serving = (root / "versions" / v2).stat().st_ino
    flip_a_byte(root / "versions" / v1 / "model.onnx")  # the previous version's file: the same inode as current's
    with pytest.raises(Exception, match="sha256|hash"):
        Package.open(root / "current")

    lines: list[str] = []
    [again] = deploy(versions["2"], [local(root)], report=lambda t, m: lines.append(m))
    assert again.ok, again.message
    assert again.uploaded_bytes == model.size  # exactly the damaged file was sent again
    assert any("damaged on the device" in line for line in lines)
    for link in ("current", "previous"):
        assert Package.open(root / link).manifest.files  # every hash checked: both versions are whole again
        assert os.path.samefile(root / link / "model.onnx", root / "objects" / model.sha256)
    assert current_version(root) == "2" and (root / "previous").resolve().name == v1
    assert (root / "versions" / v2).stat().st_ino == serving  # repaired in place: current never dangled
    assert set(modes(root).values()) <= {0o444, 0o755}


def test_an_installed_file_that_no_longer_matches_is_relinked_from_its_object(
        tmp_path: Path, versions: dict[str, Path]) -> None:
    root = tmp_path / "device"
    assert deploy(versions["1"], [local(root)])[0].ok
    golden = root / "current" / "golden.npz"
    sha = Package.open(versions["1"]).manifest.files["golden.npz"].sha256
    golden.unlink()
    golden.write_bytes(b"edited by hand")  # a new inode: the object itself is intact
    [again] = deploy(versions["1"], [local(root)])
    assert again.ok, again.message
    assert again.uploaded_bytes == 0  # nothing to send: the object was whole
    assert os.path.samefile(golden, root / "objects" / sha) and stat.S_IMODE(golden.stat().st_mode) == 0o444


# -- modes -----------------------------------------------------------------------------------------


def test_modes_are_explicit_after_an_upload_interrupted_and_resumed_over_ssh(
        tmp_path: Path, base: Path, sshd: Sshd) -> None:
    package = padded(base, tmp_path / "big.edgepkg", "big", 3_000_000)
    root = tmp_path / "remote"
    cut = tmp_path / "rsync-cut-after-1s"  # a real rsync over real ssh, killed one second into the upload
    cut.write_text('#!/bin/sh\nexec timeout -s TERM 1 rsync --bwlimit=300 "$@"\n')
    cut.chmod(0o755)
    first = ssh(sshd, root, rsync=str(cut), edge_sdk=PRIVATE_UMASK_EDGE_SDK)
    try:
        [broken] = deploy(package, [(first, Options())])
    finally:
        first.close()
    assert not broken.ok and broken.step == "upload"
    partial = root / "objects" / f"{Package.open(package).manifest.files['extra/blob.bin'].sha256}.partial"
    got = partial.stat().st_size
    assert 0 < got < 3_000_000
    assert stat.S_IMODE(partial.stat().st_mode) == 0o600  # what rsync leaves: the reason modes must be set

    lines: list[str] = []
    second = ssh(sshd, root, edge_sdk=PRIVATE_UMASK_EDGE_SDK)
    try:
        [resumed] = deploy(package, [(second, Options())], report=lambda t, m: lines.append(m))
    finally:
        second.close()
    assert resumed.ok, resumed.message
    (tmp_path / "staging").mkdir()
    whole = LocalPackage.open(package, tmp_path / "staging").size
    assert any("resuming" in line for line in lines) and resumed.uploaded_bytes <= whole - got  # continued
    found = modes(root)
    files = {p: m for p, m in found.items() if (root / p).is_file()}
    dirs = {p: m for p, m in found.items() if (root / p).is_dir()}
    assert len(files) >= 8 and set(files.values()) == {0o444}  # objects and the version's files alike
    assert len(dirs) >= 4 and set(dirs.values()) == {0o755}  # objects/, versions/, the version, extra/


# -- retention -------------------------------------------------------------------------------------


def test_keep_removes_old_versions_their_objects_and_stale_partial_uploads(
        tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "device"
    packages = [padded(base, tmp_path / f"v{i}.edgepkg", str(i), 20_000) for i in range(1, 6)]
    for package in packages[:4]:
        assert main(["deploy", str(package), "--to", str(root), "--keep", "5"]) == 0
    assert len(list((root / "versions").iterdir())) == 4
    stale, fresh = root / "objects" / f"{'a' * 64}.partial", root / "objects" / f"{'b' * 64}.partial"
    stale.write_bytes(b"an upload abandoned two hours ago")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh.write_bytes(b"an upload that may still be resumed")
    orphan = root / "objects" / ("c" * 64)
    orphan.write_bytes(b"left by a deployment that failed its preflight")

    capsys.readouterr()
    assert main(["deploy", str(packages[4]), "--to", str(root), "--keep", "1", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert len(result["details"]["prune"]["removed"]) == 3
    kept = {p.name for p in (root / "versions").iterdir()}
    assert kept == {digest_of(packages[4], tmp_path), digest_of(packages[3], tmp_path)}  # current and previous
    objects = {p.name for p in (root / "objects").iterdir()}
    assert objects == referenced(root) | {fresh.name}  # the stale partial and every unreferenced object are gone
    assert main(["deploy", "--rollback", "--to", str(root)]) == 0 and current_version(root) == "4"


# -- a full disk -----------------------------------------------------------------------------------


def test_an_upload_that_cannot_fit_is_refused_before_it_starts_and_a_lower_keep_makes_room(
        tmp_path: Path, base: Path, small_disk: Path) -> None:
    root = small_disk / "device"
    a, b, c, d = (padded(base, tmp_path / f"{v}.edgepkg", v, 6_000_000) for v in "abcd")
    for package in (a, b, c):
        [done] = deploy(package, [(LocalTransport(parse_target(str(root))), Options(keep=5))])
        assert done.ok, done.message
    [refused] = deploy(d, [(LocalTransport(parse_target(str(root))), Options(keep=5))])
    found = re.search(rf"the upload needs 6\.0 MB but the device has (\d+\.\d) MB free at {re.escape(str(root))}",
                      refused.message)
    assert not refused.ok and refused.step == "upload" and found, refused.message
    assert float(found[1]) < 6.0 and "--keep" in (refused.hint or "") and "free space" in (refused.hint or "")
    assert not [p for p in (root / "objects").iterdir() if p.name.endswith(".partial")]  # nothing was sent

    lines: list[str] = []
    [made_room] = deploy(d, [(LocalTransport(parse_target(str(root))), Options(keep=0))],
                         report=lambda t, m: lines.append(m))
    assert made_room.ok, made_room.message
    assert any("removing the versions beyond current, previous and the newest 0" in line for line in lines)
    assert current_version(root) == "d" and len(list((root / "versions").iterdir())) == 2  # d and c


class FillsTheDisk:
    """A device transport during whose first large upload another writer fills the device's disk,
    leaving ``leave`` bytes: the upload then meets the filesystem's own ENOSPC."""

    def __init__(self, inner: Transport, disk: Path, leave: int) -> None:
        self.inner, self.disk, self.leave = inner, disk, leave
        self.target: Target = inner.target

    def run(self, argv: Sequence[str], *, timeout: float = 600.0) -> RunResult:
        return self.inner.run(argv, timeout=timeout)

    def upload(self, local: Path, remote: str, *, progress: Progress | None = None) -> None:
        if self.leave and local.stat().st_size > 1_000_000:
            with (self.disk / "someone-else").open("wb") as f:
                f.write(b"\0" * (shutil.disk_usage(self.disk).free - self.leave))
            self.leave = 0
        self.inner.upload(local, remote, progress=progress)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("over", ["local", "ssh"])
def test_an_upload_that_runs_out_of_space_leaves_no_partial_and_the_next_deploy_fits(
        tmp_path: Path, base: Path, small_disk: Path, over: str, request: pytest.FixtureRequest) -> None:
    root = small_disk / "device"
    big = padded(base, tmp_path / "big.edgepkg", "big", 12_000_000)
    server: Sshd | None = request.getfixturevalue("sshd") if over == "ssh" else None

    def device() -> Transport:
        return LocalTransport(parse_target(str(root))) if server is None else ssh(server, root, DEVICE_EDGE_SDK)

    filling = FillsTheDisk(device(), small_disk, leave=3_000_000)
    try:
        [full] = deploy(big, [(filling, Options())])
    finally:
        filling.close()
    found = re.search(rf"the device's disk is full \((\d+\.\d) MB free at {re.escape(str(root))}\)", full.message)
    assert not full.ok and full.step == "upload" and found, full.message
    assert 2.0 <= float(found[1]) <= 3.1  # what the other writer left: the partial upload was removed
    blob = Package.open(big).manifest.files["extra/blob.bin"].sha256
    assert not (root / "objects" / f"{blob}.partial").exists()  # the upload that ran out of space left nothing
    assert not [p for p in (root / "objects").iterdir() if p.name.startswith(".")]  # nor a temporary file
    again = device()
    try:
        [small] = deploy(base, [(again, Options())])  # the disk is still nearly full: this one fits
    finally:
        again.close()
    assert small.ok, small.message
    assert current_version(root) == "1"

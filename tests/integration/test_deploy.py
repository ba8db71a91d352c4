"""Deployment to local-directory targets and a real OpenSSH server on loopback: first install,
upgrade (only what changed is sent), a failed preflight and a failed reload that roll back while
the old version keeps serving, three targets with one unreachable, an interrupted upload that
resumes, canaries, status and rollback."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.client import Client
from edge_sdk.deploy.deploy import Options, deploy
from edge_sdk.deploy.transport import DeployError, LocalTransport, parse_target
from runtime.package import Package, write_package
from tests import builders
from tests.integration.test_daemon import TOKEN, DaemonProcess, png
from tests.services import free_port

DEVICE_EDGE_SDK = f"{sys.executable} -m edge_sdk.cli"


def colors_package(tmp: Path, folder: Path, version: str, **kwargs: object) -> Path:
    onnx_path = tmp / f"colors-{version}.onnx"
    import onnx

    onnx.save(builders.image_model(), onnx_path)
    out = tmp / f"colors-{version}.edgepkg"
    labels = kwargs.pop("labels", builders.COLOR_LABELS)
    edge_sdk.convert(onnx_path, out, task="image-classification", labels=labels, name="colors", version=version,
                     preprocess=builders.preprocess_dict(),
                     validation=folder if labels == builders.COLOR_LABELS else None, **kwargs)
    return out


def broken_parity(package: Path, out: Path) -> Path:
    """A package whose hashes are all right but whose golden outputs its model cannot reproduce."""
    pkg = Package.open(package)
    files = {name: pkg.read_bytes(name) for name in pkg.manifest.files}
    with np.load(io.BytesIO(files["golden.npz"])) as data:
        arrays = {k: (data[k] + 5.0 if k.startswith("out") or "output" in k or "logits" in k else data[k])
                  for k in data.files}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files["golden.npz"] = buffer.getvalue()
    from dataclasses import replace

    write_package(replace(pkg.manifest, version="bad"), files, out)
    return out


def local(root: Path) -> tuple[LocalTransport, Options]:
    return LocalTransport(parse_target(str(root))), Options()


@pytest.fixture
def versions(tmp_path: Path, image_folder: Path) -> dict[str, Path]:
    v1 = colors_package(tmp_path, image_folder, "1")
    v2 = colors_package(tmp_path, image_folder, "2", golden_samples=6)  # a different golden file, same model
    return {"1": v1, "2": v2}


def current_version(root: Path) -> str:
    return json.loads((root / "current" / "manifest.json").read_text())["version"]


def test_first_install_then_an_upgrade_sends_only_what_changed(tmp_path: Path, versions: dict[str, Path]) -> None:
    root = tmp_path / "device"
    [first] = deploy(versions["1"], [local(root)])
    assert first.ok and first.step == "done" and first.version == "1" and first.backend == "onnxruntime-cpu"
    assert current_version(root) == "1" and not (root / "previous").exists()
    assert Package.open(root / "current").manifest.version == "1"  # a verified directory package
    [again] = deploy(versions["1"], [local(root)])
    assert again.ok and again.uploaded_bytes == 0  # everything was there already
    [second] = deploy(versions["2"], [local(root)])
    old, new = Package.open(versions["1"]).manifest.files, Package.open(versions["2"]).manifest.files
    changed = sum(e.size for e in new.values() if e.sha256 not in {o.sha256 for o in old.values()})
    manifest = (root / "current" / "manifest.json").stat().st_size
    assert "model.onnx" in new and new["model.onnx"].sha256 == old["model.onnx"].sha256
    assert second.ok and second.uploaded_bytes == changed + manifest  # the model file was not sent again
    assert current_version(root) == "2" and json.loads((root / "previous" / "manifest.json").read_text())["version"] == "1"
    assert len(list((root / "versions").iterdir())) == 2


def test_a_failed_preflight_leaves_the_old_version_serving(tmp_path: Path, versions: dict[str, Path]) -> None:
    root = tmp_path / "device"
    assert deploy(versions["1"], [local(root)])[0].ok
    bad = broken_parity(versions["2"], tmp_path / "bad.edgepkg")
    [result] = deploy(bad, [local(root)])
    assert not result.ok and result.step == "preflight" and "golden" in result.message
    assert not result.rolled_back and current_version(root) == "1"  # never switched


def test_a_failed_reload_rolls_back_and_the_daemon_keeps_serving(tmp_path: Path, versions: dict[str, Path],
                                                                 image_folder: Path, text_package: Path) -> None:
    root = tmp_path / "device"
    assert deploy(versions["1"], [local(root)])[0].ok
    from tests.integration.test_daemon import write_config

    port = free_port()
    config = write_config(tmp_path, port=port, models={"colors": root / "current", "words": text_package})
    daemon = DaemonProcess(config, port).start()
    try:
        options = Options(config=str(config), models=("colors",))
        transport = LocalTransport(parse_target(str(root)))
        [good] = deploy(versions["2"], [(transport, options)])
        assert good.ok and good.details["reload"]["models"][0]["version"] == "2"
        assert good.details["preflight"]["fingerprint"] and good.details["preflight"]["parity"]["max_abs_diff"] < 1e-3
        bad = broken_parity(versions["2"], tmp_path / "bad.edgepkg")  # fails its preflight: never switched
        [refused] = deploy(bad, [(transport, options)])
        assert not refused.ok and refused.step == "preflight" and current_version(root) == "2"
        # A package whose labels the daemon's fusion rule does not map: it installs and preflights,
        # but the daemon refuses to swap it in, so the deployment switches back.
        odd = colors_package(tmp_path, image_folder, "3", labels=["red", "green", "purple"])
        [failed] = deploy(odd, [(transport, options)])
        assert not failed.ok and failed.step == "reload" and failed.rolled_back
        assert current_version(root) == "2"
        client = Client(daemon.url, TOKEN)
        assert {m["name"]: m["version"] for m in client.models()}["colors"] == "2"
        assert client.predict("colors", png("red"))["label"] == "red"
    finally:
        daemon.kill()


class FlakyTransport(LocalTransport):
    """A local target whose link drops after ``limit`` bytes of one upload (a real partial file)."""

    def __init__(self, root: Path, limit: int) -> None:
        super().__init__(parse_target(str(root)))
        self.limit = limit

    def upload(self, local: Path, remote: str, *, progress=None) -> None:  # type: ignore[no-untyped-def]
        if self.limit and local.stat().st_size > self.limit:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            with local.open("rb") as src, open(remote, "ab") as out:
                out.write(src.read(self.limit))
            self.limit = 0
            raise DeployError("connection lost during the upload")
        super().upload(local, remote, progress=progress)


def test_an_interrupted_upload_resumes(tmp_path: Path, versions: dict[str, Path]) -> None:
    root = tmp_path / "device"
    flaky = FlakyTransport(root, limit=200)
    [broken] = deploy(versions["1"], [(flaky, Options())])
    assert not broken.ok and broken.step == "upload" and "connection lost" in broken.message
    assert any(p.name.endswith(".partial") for p in (root / "objects").iterdir())
    lines: list[str] = []
    [resumed] = deploy(versions["1"], [(flaky, Options())], report=lambda t, m: lines.append(m))
    assert resumed.ok and any("resuming 1 partial upload" in line for line in lines)
    total = sum(p.stat().st_size for p in (root / "current").resolve().rglob("*") if p.is_file())
    assert resumed.uploaded_bytes <= total - 200  # the first 200 bytes were not sent again
    assert not any(p.name.endswith(".partial") for p in (root / "objects").iterdir())


def test_cli_three_targets_one_unreachable(tmp_path: Path, versions: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    dead = f"ssh://nobody@127.0.0.1:{free_port()}/opt/edge-sdk"  # nothing listens there
    code = main(["deploy", str(versions["1"]), "--to", str(a), "--to", dead, "--to", str(b),
                 "--known-hosts", str(tmp_path / "known_hosts")])
    out = capsys.readouterr()
    assert code == 1
    assert "2 of 3 devices succeeded; failed: " + dead in out.out
    assert current_version(a) == "1" and current_version(b) == "1"
    assert f"[{dead}] failed at connect" in out.err  # not "upload": it never got that far
    assert main(["deploy", "--status", "--to", str(a), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status[0]["current"]["version"] == "1" and status[0]["previous"] is None


def test_cli_canary_rollback_and_inventory(tmp_path: Path, versions: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(f"""
[devices.press-1]
address = "{a}"
group = "line1"
[devices.press-2]
address = "{b}"
group = "line1"
profile = "not-this-machine"
""")
    assert main(["deploy", str(versions["1"]), "--inventory", str(inventory), "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in results] == [True, False] and "expects 'not-this-machine'" in results[1]["message"]
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert main(["deploy", str(versions["2"]), "--to", str(blocked / "device"), "--to", str(a), "--canary", "1",
                 "--json"]) == 1
    results = json.loads(capsys.readouterr().out)  # the canary fails: the rest is not attempted
    assert results[0]["step"] == "connect" and results[1]["step"] == "skipped" and current_version(a) == "1"
    assert main(["deploy", str(versions["2"]), "--to", str(a), "--canary", "1"]) == 0
    assert current_version(a) == "2"
    capsys.readouterr()
    assert main(["deploy", "--rollback", "--to", str(a)]) == 0
    assert current_version(a) == "1"
    assert main(["deploy", "--rollback", "--to", str(tmp_path / "empty")]) == 1
    assert "no previous version" in capsys.readouterr().out


def test_deploy_over_real_ssh(tmp_path: Path, versions: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.sshd import Sshd, require_sshd

    require_sshd()
    server = Sshd(tmp_path / "sshd")
    server.start()
    try:
        root = tmp_path / "remote"
        target = server.url(str(root))
        common = ["--identity", str(server.identity), "--known-hosts", str(server.known_hosts),
                  "--edge-sdk", DEVICE_EDGE_SDK]
        assert main(["deploy", str(versions["1"]), "--to", target, *common]) == 0
        assert main(["deploy", str(versions["2"]), "--to", target, *common]) == 0
        assert current_version(root) == "2"
        assert main(["deploy", "--status", "--to", target, "--json", *common]) == 0
        capsys.readouterr()
        unknown = tmp_path / "empty_known_hosts"
        unknown.write_text("")
        assert main(["deploy", str(versions["1"]), "--to", target, "--identity", str(server.identity),
                     "--known-hosts", str(unknown), "--edge-sdk", DEVICE_EDGE_SDK]) == 1
        assert "host key" in capsys.readouterr().out.lower()
        assert current_version(root) == "2"
    finally:
        server.stop()

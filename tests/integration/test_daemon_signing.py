"""The real daemon with ``[trust] keys``: it starts on signed packages only, and a hot reload to a
self-consistent backdoored package (labels swapped in the manifest, every hash still matching, the
golden check still passing) is refused with 409 while the old model keeps serving, whether the old
signature was left in place or the package was re-signed with an untrusted key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_sdk.client import Client, DaemonRequestError
from runtime.package import MANIFEST
from runtime.package import sign_package
from runtime.signing import generate_key_pair
from tests import builders
from tests.integration.test_daemon import TOKEN, DaemonProcess, png, write_config
from tests.services import free_port


def _backdoor(signed: Path, out: Path) -> Path:
    """A copy of ``signed`` with its labels reversed in manifest.json; nothing else changes."""
    with zipfile.ZipFile(signed) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    manifest = json.loads(members[MANIFEST])
    manifest["postprocess"]["labels"] = manifest["postprocess"]["labels"][::-1]
    members[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


def _trusting_config(tmp_path: Path, models: dict[str, Path], kb: Path | None = None) -> tuple[Path, int]:
    port = free_port()
    trust = '\n[trust]\nkeys = ["keys/line.pub"]\n'  # relative to the configuration file
    return write_config(tmp_path, port=port, models=models, kb=kb, extra=trust), port


def test_a_trusting_daemon_serves_signed_packages_and_refuses_backdoors(tmp_path: Path, image_package: Path,
                                                                        text_package: Path) -> None:
    line_key, _, line_id = generate_key_pair(tmp_path / "keys", "line")
    attacker_key, _, attacker_id = generate_key_pair(tmp_path / "attacker", "attacker")
    kb = builders.build_kb(tmp_path / "kb").path
    for package in (image_package, text_package, kb):
        sign_package(package, line_key)
    config, port = _trusting_config(tmp_path, {"colors": image_package, "words": text_package}, kb=kb)
    daemon = DaemonProcess(config, port).start()
    try:
        client = Client(daemon.url, TOKEN)
        before = {m["name"]: m for m in client.models()}["colors"]
        assert before["signer"] == line_id
        assert client.predict("colors", png("red"))["label"] == "red"

        stale = _backdoor(image_package, tmp_path / "backdoor.edgepkg")  # the line's signature left in place
        resigned = tmp_path / "backdoor-resigned.edgepkg"
        shutil.copyfile(stale, resigned)
        sign_package(resigned, attacker_key, replace=True)
        for package, reason in ((stale, f"by key {line_id} does not verify"),
                                (resigned, f"untrusted key {attacker_id}")):
            with pytest.raises(DaemonRequestError, match=reason) as info:
                client.reload("colors", str(package))
            assert info.value.status == 409
            after = {m["name"]: m for m in client.models()}["colors"]
            assert after["package"] == before["package"] and after["swaps"] == 0
            assert package.name in after["last_swap_error"]
            assert client.predict("colors", png("red"))["label"] == "red"  # the old model keeps serving

        # the same backdoor signed by the trusted key passes every other check: only the signature stopped it
        sign_package(resigned, line_key, replace=True)
        assert client.reload("colors", str(resigned))["signer"] == line_id
        assert client.predict("colors", png("red"))["label"] == "blue"
    finally:
        daemon.kill()


def _serve_fails(config: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_trusting_daemon_refuses_to_start_on_unsigned_packages(tmp_path: Path, image_package: Path,
                                                                 text_package: Path) -> None:
    line_key, _, line_id = generate_key_pair(tmp_path / "keys", "line")
    sign_package(text_package, line_key)
    config, _ = _trusting_config(tmp_path, {"colors": image_package, "words": text_package})
    error = _serve_fails(config)
    assert error.startswith("edge-sdk: error: model 'colors'") and "cannot be served" in error
    assert f"{image_package} is unsigned; this device serves only packages signed by a trusted key ({line_id})" \
        in error

    sign_package(image_package, line_key)  # the knowledge base goes through the same check
    kb = builders.build_kb(tmp_path / "kb").path
    config, _ = _trusting_config(tmp_path, {"colors": image_package, "words": text_package}, kb=kb)
    assert f"package {kb} is unsigned" in _serve_fails(config)

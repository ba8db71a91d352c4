"""Package signatures: key files, signing directory and archive packages, and every refusal (tampered
manifest, untrusted key, unsigned where keys are trusted, malformed signatures)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from edge_sdk.errors import BackendUnavailableError, PackageError
from runtime.package import MANIFEST, Package, extract_package, sign_package, verify_package, write_package
from runtime.signing import (
    SIGNATURES, PackageSignatureError, PublicKey, SigningKey, generate_key_pair, key_id, load_public_key,
    load_signing_key,
)
from tests.unit.runtime.test_package import _files, _manifest


def _keys(tmp_path: Path, name: str) -> tuple[SigningKey, PublicKey]:
    key, pub, _ = generate_key_pair(tmp_path / "keys", name)
    return load_signing_key(key), load_public_key(pub)


def _package(tmp_path: Path, archive: bool, name: str = "demo.edgepkg") -> Path:
    return write_package(_manifest(), _files(), tmp_path / name, archive=archive).path


def _rewrite(path: Path, member: str, change: Callable[[bytes | None], bytes | None]) -> None:
    """Change one member of a package in place (None: remove it), re-hashing nothing."""
    if path.is_dir():
        file = path / member
        data = change(file.read_bytes() if file.exists() else None)
        if data is None:
            file.unlink()
        else:
            file.write_bytes(data)
        return
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    data = change(members.get(member))
    if data is None:
        members.pop(member, None)
    else:
        members[member] = data
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)


def _swap_labels(data: bytes | None) -> bytes:
    """The backdoor: the manifest's labels swapped; no file changes, so every hash still matches."""
    assert data is not None
    doc = json.loads(data)
    doc["postprocess"]["labels"] = doc["postprocess"]["labels"][::-1]
    return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")


def test_key_pair_files_modes_and_id(tmp_path: Path) -> None:
    old = os.umask(0)  # the private key is 0600 whatever the umask
    try:
        key_path, pub_path, kid = generate_key_pair(tmp_path / "keys", "line1")
    finally:
        os.umask(old)
    assert (key_path.name, pub_path.name) == ("line1.key", "line1.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    public = load_public_key(pub_path)
    assert len(public.raw) == 32 and public.key_id == kid == key_id(public.raw) and len(kid) == 16
    assert load_signing_key(key_path).key_id == kid
    with pytest.raises(PackageSignatureError, match="already exists"):
        generate_key_pair(tmp_path / "keys", "line1")  # a key is never overwritten
    assert load_public_key(pub_path) == public
    with pytest.raises(PackageSignatureError, match="not a plain file name"):
        generate_key_pair(tmp_path / "keys", "../evil")


def test_key_files_of_the_wrong_kind_are_named(tmp_path: Path) -> None:
    key_path, pub_path, _ = generate_key_pair(tmp_path, "k")
    with pytest.raises(PackageSignatureError, match=r"k\.key.*not an ed25519 public key"):
        load_public_key(key_path)
    with pytest.raises(PackageSignatureError, match=r"k\.pub.*not an ed25519 private key"):
        load_signing_key(pub_path)
    with pytest.raises(PackageSignatureError, match=r"missing\.pub.*cannot be read"):
        load_public_key(tmp_path / "missing.pub")


@pytest.mark.parametrize("archive", [True, False])
def test_sign_and_verify(tmp_path: Path, archive: bool) -> None:
    key, public = _keys(tmp_path, "line")
    path = _package(tmp_path, archive)
    assert Package.open(path).signer is None and Package.open(path).signatures is None
    assert sign_package(path, key) == key.key_id
    assert verify_package(path, [public]) == key.key_id
    opened = Package.open(path)  # no keys: the signature still verifies, against the key it carries
    assert opened.signer == key.key_id and opened.read_bytes("model.onnx") == b"not really onnx but hashed"
    if archive:
        assert zipfile.ZipFile(path).namelist()[:2] == [MANIFEST, SIGNATURES]
    else:
        assert (path / SIGNATURES).is_file()
    written = write_package(_manifest(), _files(), tmp_path / "signed.edgepkg", archive=archive, sign=key)
    assert written.signer == key.key_id and Package.open(written.path, [public]).signer == key.key_id


@pytest.mark.parametrize("archive", [True, False])
def test_a_tampered_manifest_is_refused_with_or_without_keys(tmp_path: Path, archive: bool) -> None:
    key, public = _keys(tmp_path, "line")
    path = write_package(_manifest(), _files(), tmp_path / "demo.edgepkg", archive=archive, sign=key).path
    _rewrite(path, MANIFEST, _swap_labels)
    for trusted in ([public], None):
        with pytest.raises(PackageSignatureError, match=f"by key {key.key_id} does not verify.*changed after"):
            Package.open(path, trusted_keys=trusted)


@pytest.mark.parametrize("archive", [True, False])
def test_untrusted_and_unsigned_packages_are_refused_when_keys_are_trusted(tmp_path: Path, archive: bool) -> None:
    key, _ = _keys(tmp_path, "attacker")
    _, trusted = _keys(tmp_path, "line")
    path = _package(tmp_path, archive)
    with pytest.raises(PackageSignatureError, match=f"is unsigned.*{trusted.key_id}"):
        Package.open(path, trusted_keys=[trusted])
    assert Package.open(path).signer is None  # without keys: unchanged
    sign_package(path, key)
    with pytest.raises(PackageSignatureError, match=f"untrusted key {key.key_id}; this device trusts {trusted.key_id}"):
        Package.open(path, trusted_keys=[trusted])


def test_the_backdoor_re_signed_with_another_key_is_untrusted(tmp_path: Path) -> None:
    line, trusted = _keys(tmp_path, "line")
    attacker, _ = _keys(tmp_path, "attacker")
    path = write_package(_manifest(), _files(), tmp_path / "demo.edgepkg", sign=line).path
    _rewrite(path, MANIFEST, _swap_labels)
    with pytest.raises(PackageSignatureError, match="does not verify"):
        sign_package(path, attacker)  # the stale signature is not silently dropped...
    sign_package(path, attacker, replace=True)  # ...only on request
    assert Package.open(path).signer == attacker.key_id
    with pytest.raises(PackageSignatureError, match=f"untrusted key {attacker.key_id}"):
        Package.open(path, trusted_keys=[trusted])


def test_several_signatures_and_re_signing(tmp_path: Path) -> None:
    a, pub_a = _keys(tmp_path, "a")
    b, pub_b = _keys(tmp_path, "b")
    path = _package(tmp_path, True)
    sign_package(path, a)
    sign_package(path, b)
    sign_package(path, a)  # the same key again replaces its own entry
    entries = json.loads(Package.open(path).signatures or b"")["signatures"]
    assert sorted(e["key_id"] for e in entries) == sorted([a.key_id, b.key_id])
    assert Package.open(path, [pub_b]).signer == b.key_id and Package.open(path, [pub_a]).signer == a.key_id


@pytest.mark.parametrize("document, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format": 2, "signatures": []}', "not a format-1 signature list"),
    (b'{"format": 1, "signatures": []}', "holds 0 signatures"),
])
def test_malformed_signatures_are_refused(tmp_path: Path, document: bytes, message: str) -> None:
    path = _package(tmp_path, False)
    (path / SIGNATURES).write_bytes(document)
    with pytest.raises(PackageSignatureError, match=message):
        Package.open(path)


def test_a_signature_naming_another_key_id_is_refused(tmp_path: Path) -> None:
    key, _ = _keys(tmp_path, "line")
    path = write_package(_manifest(), _files(), tmp_path / "pkg", archive=False, sign=key).path
    doc = json.loads((path / SIGNATURES).read_bytes())
    doc["signatures"][0]["key_id"] = "0" * 16
    (path / SIGNATURES).write_text(json.dumps(doc))
    with pytest.raises(PackageSignatureError, match="names key '0000000000000000'"):
        Package.open(path)


def test_an_archive_may_hold_signatures_but_nothing_else_unlisted(tmp_path: Path) -> None:
    key, _ = _keys(tmp_path, "line")
    path = write_package(_manifest(), _files(), tmp_path / "demo.edgepkg", sign=key).path
    _rewrite(path, "extra.bin", lambda _: b"x")
    with pytest.raises(PackageError, match="does not list: \\['extra.bin'\\]"):
        Package.open(path)
    with pytest.raises(PackageError, match="may not be named"):
        write_package(_manifest(), {**_files(), SIGNATURES: b"{}"}, tmp_path / "other.edgepkg")


def test_extraction_keeps_the_signature(tmp_path: Path) -> None:
    key, public = _keys(tmp_path, "line")
    path = write_package(_manifest(), _files(), tmp_path / "demo.edgepkg", sign=key).path
    assert extract_package(path, tmp_path / "out").signer == key.key_id
    assert Package.open(tmp_path / "out", [public]).signer == key.key_id


def _block_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cryptography", "cryptography.hazmat.primitives", "cryptography.hazmat.primitives.asymmetric"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_cryptography(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    key, public = _keys(tmp_path, "line")
    path = write_package(_manifest(), _files(), tmp_path / "demo.edgepkg", sign=key).path
    _block_cryptography(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="cryptography") as info:
        load_public_key(tmp_path / "keys" / "line.pub")
    assert info.value.hint == "pip install 'edge-sdk[serve]'"
    with caplog.at_level(logging.WARNING, logger="runtime.signing"):
        opened = Package.open(path)  # no keys configured: opens, and says the signature went unchecked
    assert opened.signer is None and opened.signatures is not None and "not checked" in caplog.text
    with pytest.raises(BackendUnavailableError, match="cryptography"):
        Package.open(path, trusted_keys=[public])  # keys configured: never skipped


def test_the_runtime_imports_without_cryptography() -> None:
    code = ("import sys; sys.modules['cryptography'] = None; import runtime.package, runtime.signing, "
            "edge_sdk.daemon.config; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"

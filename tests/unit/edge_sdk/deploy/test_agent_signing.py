"""``edge-sdk device install`` with trusted keys: an unsigned or untrusted package is refused before it is
activated, and a signed package's signatures.json travels with the deployment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_sdk.deploy.agent import install, trusted_keys
from edge_sdk.deploy.deploy import LocalPackage, Options, deploy
from edge_sdk.deploy.transport import LocalTransport, parse_target
from runtime.package import sign_package
from runtime.signing import SIGNATURES, PackageSignatureError, generate_key_pair, load_public_key


def _upload(package: Path, root: Path, staging: Path) -> LocalPackage:
    """What `deploy` leaves on the device before `install`: every object under objects/<sha256>."""
    staging.mkdir()
    local = LocalPackage.open(package, staging)
    (root / "objects").mkdir(parents=True)
    for digest, path in local.objects.items():
        shutil.copyfile(path, root / "objects" / digest)
    return local


def test_install_refuses_an_unsigned_package_when_keys_are_trusted(tmp_path: Path, image_package: Path) -> None:
    _, pub, key_id = generate_key_pair(tmp_path / "keys", "line")
    root = tmp_path / "device"
    local = _upload(image_package, root, tmp_path / "staging")
    objects = list(local.objects)
    with pytest.raises(PackageSignatureError, match=f"is unsigned.*trusted key \\({key_id}\\)"):
        install(str(root), local.digest, objects, backend="onnxruntime-cpu", trusted_keys=[load_public_key(pub)])
    assert not (root / "current").exists()  # nothing was activated
    assert install(str(root), local.digest, objects, backend="onnxruntime-cpu")["signer"] is None  # no keys: as before


def test_a_signed_package_travels_and_is_checked_against_the_daemon_trust(tmp_path: Path,
                                                                          image_package: Path) -> None:
    key, pub, key_id = generate_key_pair(tmp_path / "keys", "line")
    _, other, _ = generate_key_pair(tmp_path / "keys", "other")
    sign_package(image_package, key)
    root = tmp_path / "device"
    [result] = deploy(image_package, [(LocalTransport(parse_target(str(root))), Options(backend="onnxruntime-cpu"))])
    assert result.ok, result.message
    assert result.details["preflight"]["signer"] == key_id
    local = _upload(image_package, tmp_path / "elsewhere", tmp_path / "staging")
    assert local.signature is not None and (root / "versions" / local.digest / SIGNATURES).is_file()

    config = tmp_path / "edge-sdk.toml"  # the daemon's configuration, as `device install --config` reads it
    config.write_text('[server]\ntoken = "0123456789abcdef0123"\n[models.colors]\npackage = "current"\n'
                      f'[trust]\nkeys = ["{pub}"]\n')
    assert [k.key_id for k in trusted_keys([], str(config))] == [key_id]
    args = (str(root), local.digest, list(local.objects))
    assert install(*args, backend="onnxruntime-cpu", signature=local.signature,
                   trusted_keys=trusted_keys([], str(config)))["signer"] == key_id
    with pytest.raises(PackageSignatureError, match=f"untrusted key {key_id}"):
        install(*args, backend="onnxruntime-cpu", trusted_keys=trusted_keys([str(other)], None))

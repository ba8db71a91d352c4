"""``edge-sdk keys generate``, ``convert --sign``, ``sign`` and what ``inspect`` says about signatures."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from edge_sdk.cli import main
from tests import builders


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_convert_sign_and_inspect(tmp_path: Path, image_onnx: Path, image_package: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "keys", "generate", "--out", str(tmp_path / "keys"), "--name", "line", "--json")
    generated = json.loads(out)
    assert code == 0 and stat.S_IMODE(Path(generated["private_key"]).stat().st_mode) == 0o600
    line_id, line_key, line_pub = generated["key_id"], generated["private_key"], generated["public_key"]
    code, out, _ = _cli(capsys, "keys", "generate", "--out", str(tmp_path / "keys"), "--name", "other")
    assert code == 0 and "key id: " in out
    code, _, err = _cli(capsys, "keys", "generate", "--out", str(tmp_path / "keys"), "--name", "line")
    assert code == 1 and "already exists; refusing to overwrite a key" in err

    pkg = tmp_path / "signed.edgepkg"
    code, out, _ = _cli(capsys, "convert", str(image_onnx), "-o", str(pkg), "--task", "image-classification",
                        "--labels", "red,green,blue", "--preprocess", json.dumps(builders.preprocess_dict()),
                        "--sign", line_key)
    assert code == 0 and f"signed by key {line_id}" in out
    code, out, _ = _cli(capsys, "inspect", str(pkg), "--trusted-key", line_pub)
    assert code == 0 and f"signature: signed by key {line_id} (trusted)" in out
    code, _, err = _cli(capsys, "inspect", str(pkg), "--trusted-key", str(tmp_path / "keys" / "other.pub"))
    assert code == 1 and f"signed by untrusted key {line_id}" in err and len(err.strip().splitlines()) == 1

    code, out, _ = _cli(capsys, "inspect", str(image_package))
    assert code == 0 and "signature: unsigned" in out
    code, out, _ = _cli(capsys, "sign", str(image_package), "--key", line_key)
    assert code == 0 and f"with key {line_id}" in out
    code, out, _ = _cli(capsys, "inspect", str(image_package), "--json")
    assert code == 0 and json.loads(out)["signer"] == line_id


def test_convert_with_a_bad_key_fails_before_converting(tmp_path: Path, image_onnx: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.key").write_text("not a key")
    out = tmp_path / "never.edgepkg"
    code, _, err = _cli(capsys, "convert", str(image_onnx), "-o", str(out), "--task", "image-classification",
                        "--labels", "red,green,blue", "--preprocess", json.dumps(builders.preprocess_dict()),
                        "--sign", str(tmp_path / "bad.key"))
    assert code == 1 and "bad.key' is not an ed25519 private key" in err and not out.exists()


def test_the_python_convert_signs_too(tmp_path: Path, image_onnx: Path) -> None:
    import edge_sdk
    from runtime.package import Package
    from runtime.signing import generate_key_pair, load_public_key

    key, pub, key_id = generate_key_pair(tmp_path / "keys", "line")
    out = tmp_path / "colors"
    edge_sdk.convert(image_onnx, out, task="image-classification", labels=builders.COLOR_LABELS,
                     preprocess=builders.preprocess_dict(), archive=False, sign=key)
    assert Package.open(out, trusted_keys=[load_public_key(pub)]).signer == key_id

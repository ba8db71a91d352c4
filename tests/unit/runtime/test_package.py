"""Package round trip and every refusal: bad hash, truncation, traversal, unknown schema, extra files."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.errors import PackageError, PackageIntegrityError, PackageVersionError
from runtime.manifest import Manifest, Postprocess, TensorSpec, TextPreprocess
from runtime.package import MANIFEST, Package, check_member_name, extract_package, golden_bytes, write_package


def _manifest() -> Manifest:
    return Manifest(
        name="demo", version="3", task="text-classification", model="model.onnx",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 2)),),
        preprocess=TextPreprocess(attention_mask=None, token_type_ids=None),
        postprocess=Postprocess(output="logits", labels=("a", "b")), files={},
    )


def _files() -> dict[str, bytes]:
    golden = golden_bytes({"input_ids": np.array([[1, 2]], np.int64)}, {"logits": np.array([[0.1, 0.9]], np.float32)})
    return {"model.onnx": b"not really onnx but hashed", "golden.npz": golden, "tokenizer.json": b"{}"}


@pytest.mark.parametrize("archive", [True, False])
def test_round_trip_keeps_manifest_files_and_golden(tmp_path: Path, archive: bool) -> None:
    out = tmp_path / "demo.edgepkg"
    written = write_package(_manifest(), _files(), out, archive=archive)
    assert out.is_file() == archive and out.is_dir() == (not archive)
    package = Package.open(out)
    assert package.manifest == written.manifest
    assert package.manifest.name == "demo" and package.manifest.postprocess.labels == ("a", "b")
    assert package.read_bytes("model.onnx") == b"not really onnx but hashed"
    assert sorted(package.manifest.files) == ["golden.npz", "model.onnx", "tokenizer.json"]
    inputs, outputs = package.golden()
    np.testing.assert_array_equal(inputs["input_ids"], [[1, 2]])
    np.testing.assert_allclose(outputs["logits"], [[0.1, 0.9]])


def test_same_content_gives_identical_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_package(_manifest(), _files(), tmp_path / "a.edgepkg").path.read_bytes()
    monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)  # another day: timestamps must not leak in
    b = write_package(_manifest(), _files(), tmp_path / "b.edgepkg").path.read_bytes()
    assert a == b


def test_directory_with_a_modified_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    (out / "model.onnx").write_bytes(b"not really onnx but hashEd")  # same size, other content
    with pytest.raises(PackageIntegrityError, match="model.onnx.*sha256"):
        Package.open(out)


def test_directory_with_a_missing_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    (out / "tokenizer.json").unlink()
    with pytest.raises(PackageIntegrityError, match="tokenizer.json.*missing"):
        Package.open(out)


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    (tmp_path / "outside").write_bytes(b"{}")
    (out / "tokenizer.json").unlink()
    os.symlink(tmp_path / "outside", out / "tokenizer.json")
    with pytest.raises(PackageIntegrityError, match="tokenizer.json"):
        Package.open(out)


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageIntegrityError, match="truncated|cannot be read"):
        Package.open(out)


def test_archive_with_a_tampered_member_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    with zipfile.ZipFile(out) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["model.onnx"] = b"evil model"
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(PackageIntegrityError, match="model.onnx"):
        Package.open(out)


def test_graphs_and_golden_vectors_are_stored_the_rest_deflated(tmp_path: Path) -> None:
    files = {**_files(), "model.int8.u8s8.onnx": bytes(4096), "notes/readme.txt": b"x" * 4096}
    out = write_package(_manifest(), files, tmp_path / "demo.edgepkg").path
    with zipfile.ZipFile(out) as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert kinds["model.onnx"] == kinds["model.int8.u8s8.onnx"] == kinds["golden.npz"] == zipfile.ZIP_STORED
    assert kinds["tokenizer.json"] == kinds["notes/readme.txt"] == kinds[MANIFEST] == zipfile.ZIP_DEFLATED


def test_an_archive_with_every_member_deflated_still_opens(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    with zipfile.ZipFile(out) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # as packages were written before
        for name, data in members.items():
            zf.writestr(name, data)
    assert Package.open(out).read_bytes("model.onnx") == b"not really onnx but hashed"


def test_a_flipped_byte_inside_a_stored_graph_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("model.onnx")
    data = bytearray(out.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    assert bytes(data[start:start + info.file_size]) == b"not really onnx but hashed"  # stored as it is
    data[start + 3] ^= 0x01
    out.write_bytes(bytes(data))
    with pytest.raises(PackageIntegrityError, match="damaged|sha256"):
        Package.open(out)


def test_archive_with_an_unlisted_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    with zipfile.ZipFile(out, "a") as zf:
        zf.writestr("extra.bin", b"smuggled")
    with pytest.raises(PackageIntegrityError, match="extra.bin"):
        Package.open(out)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/passwd", "a/../../b", "c:evil", "a\\b", "./x", "a//b"])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(PackageIntegrityError, match="safe relative path"):
        check_member_name(name)


def test_path_traversal_archive_is_refused_and_writes_nothing_outside(tmp_path: Path) -> None:
    evil = tmp_path / "evil.edgepkg"
    manifest = _manifest().to_dict()
    manifest["files"] = {"../escaped.txt": {"sha256": "0" * 64, "size": 3}}
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        zf.writestr("../escaped.txt", b"bad")
    dest = tmp_path / "deep" / "out"
    dest.parent.mkdir()
    with pytest.raises(PackageIntegrityError, match="escaped"):
        extract_package(evil, dest)
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not dest.exists()


def test_extract_package_unpacks_a_verified_directory(tmp_path: Path) -> None:
    archive = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), archive)
    package = extract_package(archive, tmp_path / "unpacked")
    assert not package.is_archive
    assert (tmp_path / "unpacked" / "model.onnx").read_bytes() == b"not really onnx but hashed"


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_schema_version_is_refused(tmp_path: Path, version: object) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    data = json.loads((out / MANIFEST).read_text())
    data["schema_version"] = version
    (out / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(PackageVersionError, match=f"schema_version is {version!r}") as info:
        Package.open(out)
    assert "upgrade edge-sdk" in str(info.value)


def test_invalid_manifest_json_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(PackageIntegrityError, match="not valid JSON"):
        Package.open(out)


def test_missing_package_and_non_package_paths(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="does not exist"):
        Package.open(tmp_path / "nope.edgepkg")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PackageError, match="no manifest.json"):
        Package.open(tmp_path / "plain")


def test_writer_refuses_to_clobber_a_non_package(tmp_path: Path) -> None:
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(PackageError, match="refusing to overwrite"):
        write_package(_manifest(), _files(), precious, archive=False)
    assert (precious / "keep.txt").read_text() == "mine"


def test_rewriting_replaces_an_existing_package_and_leaves_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out, archive=False)
    files = {**_files(), "model.onnx": b"version two"}
    write_package(_manifest(), files, out, archive=False)
    assert Package.open(out).read_bytes("model.onnx") == b"version two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.edgepkg"]


def test_failed_write_keeps_the_previous_package(tmp_path: Path) -> None:
    out = tmp_path / "demo.edgepkg"
    write_package(_manifest(), _files(), out)
    before = out.read_bytes()
    with pytest.raises(PackageIntegrityError):
        write_package(_manifest(), {**_files(), "../bad": b"x"}, out)
    assert out.read_bytes() == before
    Package.open(out)


def test_read_bytes_detects_a_change_after_open(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    write_package(_manifest(), _files(), out, archive=False)
    package = Package.open(out)
    (out / "tokenizer.json").write_bytes(b"[]")
    with pytest.raises(PackageIntegrityError, match="changed after it was verified"):
        package.read_bytes("tokenizer.json")

"""runtime.engine_cache: atomic put/get, sidecars, keying by package content, corrupt entries."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from devices import Fingerprint
from edge_sdk.errors import PackageError, PackageIntegrityError
from runtime.engine_cache import EngineCache, default_cache_dir, find_engine, package_engine
from runtime.engine_spec import EngineSpec
from runtime.manifest import Manifest, Postprocess, TensorSpec, TextPreprocess
from runtime.package import Package, write_package

ORIN = Fingerprint(gpu="8.7", gpu_name="Orin", tensorrt="10.3.0", cuda="12.2", l4t="36.3.0")
KEY = ORIN.key
SPEC = EngineSpec(KEY, "s8s8", "int8")
GRAPH = "model.int8.s8s8.onnx"
META = {"fingerprint": ORIN.to_dict(), "build_seconds": 182.5, "tensorrt": "10.3.0"}


def _package(tmp_path: Path, name: str, graph_bytes: bytes = b"s8s8 graph v1",
             engines: tuple[dict[str, Any], ...] = (), extra: dict[str, bytes] | None = None) -> Package:
    manifest = Manifest(
        name="demo", version="1", task="text-classification", model="model.onnx",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 2)),),
        preprocess=TextPreprocess(attention_mask=None, token_type_ids=None),
        postprocess=Postprocess(output="logits", labels=("a", "b")), files={},
        golden=None, precision="int8", graphs={"s8s8": GRAPH}, engines=engines,
    )
    files = {"model.onnx": b"fp32 graph", GRAPH: graph_bytes, **(extra or {})}
    return write_package(manifest, files, tmp_path / f"{name}.edgepkg")


@pytest.fixture
def package(tmp_path: Path) -> Package:
    return _package(tmp_path, "demo")


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "cache")


def test_put_then_get_round_trip(cache: EngineCache, package: Package) -> None:
    assert cache.get(package, SPEC) is None

    path = cache.put(package, SPEC, b"serialized engine", META)

    assert path == cache.engine_path(package, SPEC)
    assert path.read_bytes() == b"serialized engine"
    assert cache.get(package, SPEC) == b"serialized engine"
    assert cache.get(package, EngineSpec("sm87-trt10.3.1", "s8s8", "int8")) is None  # another device
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])  # no temps


def test_engine_path_layout(cache: EngineCache, package: Package) -> None:
    digest = package.manifest.files[GRAPH].sha256[:16]
    assert cache.engine_path(package, SPEC) == cache.root / "engines" / digest / f"s8s8-int8-{KEY}.plan"
    fp32 = cache.engine_path(package, EngineSpec(KEY, "fp32", "fp16"))
    assert fp32.parent.name == package.manifest.files["model.onnx"].sha256[:16]
    assert fp32.name == f"fp32-fp16-{KEY}.plan"
    dla = cache.engine_path(package, EngineSpec(KEY, "fp32", "int8", dla_core=1))
    assert dla.name == f"fp32-int8-{KEY}-dla1.plan"


def test_sidecar_holds_meta_and_checksums(cache: EngineCache, package: Package) -> None:
    path = cache.put(package, SPEC, b"engine", META)

    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["meta"] == META
    assert Fingerprint.from_dict(sidecar["meta"]["fingerprint"]) == ORIN
    assert sidecar["size"] == 6 and len(sidecar["sha256"]) == 64
    assert sidecar["key"] == KEY and sidecar["graph"] == "s8s8" and sidecar["precision"] == "int8"
    assert sidecar["package"] == {"name": "demo", "version": "1"}
    assert sidecar["created"].endswith("+00:00")


def test_put_replaces_an_existing_engine(cache: EngineCache, package: Package) -> None:
    cache.put(package, SPEC, b"old engine", META)
    cache.put(package, SPEC, b"new engine!", {**META, "build_seconds": 1.0})

    assert cache.get(package, SPEC) == b"new engine!"
    assert [e["meta"]["build_seconds"] for e in cache.entries()] == [1.0]


def test_new_graph_content_never_reuses_a_stale_engine(tmp_path: Path, cache: EngineCache) -> None:
    v1 = _package(tmp_path, "v1", b"s8s8 graph v1")
    v2 = _package(tmp_path, "v2", b"s8s8 graph v2")
    same_graph = _package(tmp_path, "v1-relabelled", b"s8s8 graph v1", extra={"notes.txt": b"x"})

    cache.put(v1, SPEC, b"engine for v1", META)

    assert cache.engine_path(v1, SPEC) != cache.engine_path(v2, SPEC)
    assert cache.get(v2, SPEC) is None
    assert cache.get(same_graph, SPEC) == b"engine for v1"  # same graph bytes: the engine still fits


def test_a_cpu_graph_or_a_meaningless_engine_is_no_spec(cache: EngineCache, package: Package) -> None:
    with pytest.raises(PackageError, match=r"graph 'u8s8' is not one of \['s8s8', 'fp32'\]"):
        EngineSpec(KEY, "u8s8", "int8")
    with pytest.raises(PackageError, match="the s8s8 graph builds only int8 engines, not fp16"):
        EngineSpec(KEY, "s8s8", "fp16")
    with pytest.raises(PackageError, match="DLA does not run explicit"):
        EngineSpec(KEY, "s8s8", "int8", dla_core=0)
    with pytest.raises(PackageError, match="built only for DLA"):
        EngineSpec(KEY, "fp32", "int8")


def test_a_package_without_the_graph_has_no_cached_engine(cache: EngineCache, tmp_path: Path) -> None:
    """An fp32 package has no s8s8 graph: looking its int8 engine up is a miss, not an error."""
    fp32_only = write_package(dataclasses.replace(_package(tmp_path, "x").manifest, graphs={}, precision="fp32"),
                              {"model.onnx": b"fp32 graph"}, tmp_path / "fp32.edgepkg")
    assert cache.get(fp32_only, SPEC) is None
    with pytest.raises(PackageError, match="no 's8s8' graph"):
        cache.engine_path(fp32_only, SPEC)


@pytest.mark.parametrize("key", ["", "../evil", "sm87/trt10", "SM87", "sm87..trt", "-sm87", "sm87\n"])
def test_unsafe_fingerprint_key_is_refused(key: str) -> None:
    with pytest.raises(PackageError, match="is not a fingerprint key"):
        EngineSpec(key, "s8s8", "int8")


def test_meta_that_is_not_json_writes_nothing(cache: EngineCache, package: Package) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache.put(package, SPEC, b"engine", {"built": object()})
    assert not cache.engine_path(package, SPEC).exists()


@pytest.mark.parametrize("sidecar", [b"{not json", b"", b"[1, 2]", b'{"sha256": "abc"}', b"\xff\xfe"])
def test_corrupt_sidecar_is_a_miss(cache: EngineCache, package: Package, sidecar: bytes,
                                   caplog: pytest.LogCaptureFixture) -> None:
    path = cache.put(package, SPEC, b"engine", META)
    path.with_suffix(".json").write_bytes(sidecar)

    with caplog.at_level(logging.WARNING, logger="runtime.engine_cache"):
        assert cache.get(package, SPEC) is None
        assert cache.entries() == []
    assert "ignoring engine cache sidecar" in caplog.text


def test_engine_without_sidecar_is_a_miss(cache: EngineCache, package: Package,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A crash between writing the engine and its sidecar leaves an uncommitted engine."""
    path = cache.put(package, SPEC, b"engine", META)
    path.with_suffix(".json").unlink()

    with caplog.at_level(logging.WARNING, logger="runtime.engine_cache"):
        assert cache.get(package, SPEC) is None
    assert "no valid sidecar" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_engine_is_a_miss(cache: EngineCache, package: Package, damage: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    path = cache.put(package, SPEC, b"serialized engine", META)
    if damage == "truncate":
        path.write_bytes(b"serialized")
    elif damage == "flip":
        path.write_bytes(b"serialized enginE")
    else:
        path.unlink()

    with caplog.at_level(logging.WARNING, logger="runtime.engine_cache"):
        assert cache.get(package, SPEC) is None
    assert "ignoring engine" in caplog.text
    if damage != "flip":  # entries() checks sizes only; get() checks the sha256
        assert cache.entries() == []


def test_entries_lists_every_engine_with_its_meta(tmp_path: Path, cache: EngineCache, package: Package) -> None:
    other = _package(tmp_path, "other", b"another graph")
    dla_key = Fingerprint(gpu="7.2", tensorrt="8.5.2", cuda="11.4", l4t="35.4.1", dla_core=0).key
    a = cache.put(package, SPEC, b"a", META)
    b = cache.put(other, EngineSpec("sm72-trt8.5.2", "fp32", "fp16", dla_core=0), b"bb", {"tensorrt": "8.5.2"})
    (a.parent / "stray.json").write_text("{}")  # ignored: no sha256/size

    entries = cache.entries()

    assert sorted(e["path"] for e in entries) == sorted([str(a), str(b)])
    by_key = {e["key"]: e for e in entries}
    assert by_key[dla_key]["precision"] == "fp16" and by_key[dla_key]["dla_core"] == 0
    assert by_key[KEY]["meta"] == META and by_key[KEY]["size"] == 1
    assert by_key[dla_key]["meta"] == {"tensorrt": "8.5.2"}
    assert EngineCache(tmp_path / "empty").entries() == []


def test_ort_trt_cache_dir_is_created_and_keyed(tmp_path: Path, cache: EngineCache, package: Package) -> None:
    path = cache.ort_trt_cache_dir(package, KEY)

    assert path.is_dir() and path.name == KEY and path.is_relative_to(cache.root / "ort-trt")
    assert cache.ort_trt_cache_dir(package, KEY) == path
    assert cache.ort_trt_cache_dir(package, KEY.replace("trt10.3.0", "trt10.4.0")) != path
    changed = _package(tmp_path, "changed", extra={"labels.txt": b"a\nb\n"})
    assert cache.ort_trt_cache_dir(changed, KEY).parent != path.parent


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("EDGE_SDK_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "edge-sdk"

    monkeypatch.setenv("EDGE_SDK_CACHE", "")  # empty counts as unset
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "edge-sdk"


# --- engines carried inside the package ------------------------------------------------------


def _engine_entry(fp: Fingerprint, **spec: Any) -> dict[str, Any]:
    made = EngineSpec(fp.key, **({"graph": "s8s8", "precision": "int8"} | spec))
    return {"file": f"engines/{made.name}.plan", "fingerprint": fp.to_dict(), **made.to_dict(), "tensorrt": fp.tensorrt}


def test_package_engine_picks_the_matching_entry(tmp_path: Path) -> None:
    xavier = Fingerprint(gpu="7.2", tensorrt="8.5.2", cuda="11.4", l4t="35.4.1")
    entries = (_engine_entry(xavier), _engine_entry(ORIN), _engine_entry(ORIN, graph="fp32", precision="fp16"))
    package = _package(tmp_path, "carrying", engines=entries, extra={
        f"engines/s8s8-int8-{xavier.key}.plan": b"xavier engine", f"engines/s8s8-int8-{ORIN.key}.plan": b"orin engine",
        f"engines/fp32-fp16-{ORIN.key}.plan": b"orin fp16 engine",
    })

    assert package_engine(package, SPEC) == b"orin engine"
    assert package_engine(package, EngineSpec(xavier.key, "s8s8", "int8")) == b"xavier engine"
    assert package_engine(package, EngineSpec(KEY, "fp32", "fp16")) == b"orin fp16 engine"
    assert package_engine(package, EngineSpec(KEY, "fp32", "fp16", dla_core=0)) is None
    assert package_engine(package, EngineSpec(KEY, "fp32", "fp32")) is None
    cache = EngineCache(tmp_path / "cache")
    assert find_engine(package, [EngineSpec(KEY, "fp32", "fp32"), EngineSpec(KEY, "fp32", "fp16")], cache) == (
        EngineSpec(KEY, "fp32", "fp16"), b"orin fp16 engine", "package")


def test_entries_written_before_engines_had_a_precision_are_read_as_built_then(tmp_path: Path) -> None:
    old = {"file": "engines/sm87-trt10.3.0-cuda12.2-l4t36.3.0.plan", "key": "sm87-trt10.3.0-cuda12.2-l4t36.3.0",
           "graph": "s8s8", "tensorrt": "10.3.0"}
    assert EngineSpec.from_entry(old) == SPEC
    assert EngineSpec.from_entry({**old, "graph": "fp32", "key": f"{old['key']}-dla1"}) == EngineSpec(
        KEY, "fp32", "fp16", dla_core=1)


def test_package_without_engines_carries_none(package: Package) -> None:
    assert package_engine(package, SPEC) is None


def test_package_engine_is_checked_against_its_sha256(tmp_path: Path) -> None:
    name = f"engines/{SPEC.name}.plan"
    archived = _package(tmp_path, "archived", engines=(_engine_entry(ORIN),), extra={name: b"orin engine"})
    files = {"model.onnx": b"fp32 graph", GRAPH: b"s8s8 graph v1", name: b"orin engine"}
    unpacked = write_package(archived.manifest, files, tmp_path / "unpacked", archive=False)
    (unpacked.path / name).write_bytes(b"orin enginE")  # changed after open

    with pytest.raises(PackageIntegrityError, match="changed after it was verified"):
        package_engine(unpacked, SPEC)


def test_engine_entry_without_a_file_is_a_package_error(tmp_path: Path) -> None:
    package = _package(tmp_path, "broken", engines=({"key": KEY},))
    with pytest.raises(PackageError, match="without a 'file'"):
        package_engine(package, SPEC)


def test_a_package_can_carry_an_engine_for_a_spec(tmp_path: Path) -> None:
    from runtime.engine_cache import add_package_engine

    source = _package(tmp_path, "a")
    out = add_package_engine(source, tmp_path / "b.edgepkg", b"serialized engine", {"gpu": "8.7"}, SPEC, "10.3.0")
    assert package_engine(out, SPEC) == b"serialized engine"
    assert package_engine(out, EngineSpec("sm72-trt8.5.2", "s8s8", "int8")) is None
    [entry] = out.manifest.engines
    assert entry["file"] == f"engines/{SPEC.name}.plan" and entry["graph"] == "s8s8" and entry["tensorrt"] == "10.3.0"
    assert entry["precision"] == "int8" and entry["dla_core"] is None
    again = add_package_engine(out, tmp_path / "c.edgepkg", b"rebuilt", {"gpu": "8.7"}, SPEC, "10.3.0")
    assert len(again.manifest.engines) == 1 and package_engine(again, SPEC) == b"rebuilt"
    assert set(again.manifest.files) == set(source.manifest.files) | {f"engines/{SPEC.name}.plan"}

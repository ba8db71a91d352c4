"""An on-device cache of TensorRT engines and onnxruntime TensorRT-EP caches.

Building a TensorRT engine takes minutes on a Jetson, so an engine is built once per
package content and device, and kept under the cache root::

    <root>/engines/<graph digest>/<spec name>.plan   the serialized engine
    <root>/engines/<graph digest>/<spec name>.json   its sidecar (commit record)
    <root>/ort-trt/<package digest>/<fingerprint key>/             onnxruntime's TensorRT-EP caches

The graph digest is the graph file's sha256 from the package manifest, so a new package
version never reuses a stale engine. The spec name (:class:`runtime.engine_spec.EngineSpec`)
names the graph, the precision, and the TensorRT version, GPU architecture and DLA core the
engine was built for, e.g. ``fp32-fp16-sm87-trt10.3.0-dla0``.

An engine counts as cached only once its sidecar is written, and only while the sidecar's
sha256 and size match the engine file: a crash mid-write, a corrupt sidecar or a damaged
engine reads as a cache miss (with a warning), never as an error.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from edge_sdk.errors import DeviceError, PackageError
from runtime.files import write_atomic
from runtime.engine_spec import EngineSpec
from runtime.package import Package, sha256_bytes

__all__ = ["EngineCache", "default_cache_dir", "package_engine", "find_engine"]

log = logging.getLogger(__name__)

_DIGEST_CHARS = 16
_KEY_RE = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", re.ASCII)  # what Fingerprint.key produces


def default_cache_dir() -> Path:
    """``$EDGE_SDK_CACHE``, else ``$XDG_CACHE_HOME/edge-sdk``, else ``~/.cache/edge-sdk``."""
    explicit = os.environ.get("EDGE_SDK_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "edge-sdk"
    return Path.home() / ".cache" / "edge-sdk"


def _check_key(fingerprint_key: str) -> str:
    if not isinstance(fingerprint_key, str) or not _KEY_RE.fullmatch(fingerprint_key):
        raise DeviceError(
            f"fingerprint key {fingerprint_key!r} is not a device fingerprint key",
            hint="pass devices.fingerprint(info).key, e.g. 'sm87-trt10.3.0'",
        )
    return fingerprint_key


def _graph_file(package: Package, graph: str) -> str:
    """The file of ``graph``: an int8 variant from ``manifest.graphs``, or ``"fp32"`` for the model."""
    manifest = package.manifest
    if graph == "fp32":
        return manifest.model
    if graph not in manifest.graphs:
        raise PackageError(
            f"package {manifest.name} {manifest.version} has no {graph!r} graph",
            hint=f"its graphs are {sorted(['fp32', *manifest.graphs])}",
        )
    return manifest.graphs[graph]


def _graph_digest(package: Package, graph: str) -> str:
    return package.manifest.files[_graph_file(package, graph)].sha256[:_DIGEST_CHARS]


def _package_digest(package: Package) -> str:
    """A digest of the whole file table: any change of content gives a new digest."""
    table = "\n".join(f"{name} {entry.sha256}" for name, entry in sorted(package.manifest.files.items()))
    return sha256_bytes(table.encode("utf-8"))[:_DIGEST_CHARS]


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's content, or None (with a warning) when it is unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("ignoring engine cache sidecar %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) or not isinstance(data.get("size"), int):
        log.warning("ignoring engine cache sidecar %s: no sha256 and size", path)
        return None
    return data


class EngineCache:
    """Engines and onnxruntime TensorRT-EP caches under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def engine_path(self, package: Package, spec: EngineSpec) -> Path:
        """Where the engine ``spec`` of ``package`` lives."""
        _check_key(spec.key)
        return self.root / "engines" / _graph_digest(package, spec.graph) / f"{spec.name}.plan"

    def get(self, package: Package, spec: EngineSpec) -> bytes | None:
        """The cached engine, or None when absent, partial or corrupt (or the package lacks its graph)."""
        if spec.graph != "fp32" and spec.graph not in package.manifest.graphs:
            return None
        path = self.engine_path(package, spec)
        sidecar = _read_sidecar(path.with_suffix(".json"))
        if sidecar is None:
            if path.exists():
                log.warning("ignoring engine %s: it has no valid sidecar (an interrupted write?)", path)
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.warning("ignoring engine cache sidecar %s: its engine is missing", path.with_suffix(".json"))
            return None
        except OSError as exc:
            log.warning("ignoring engine %s: %s", path, exc)
            return None
        if len(data) != sidecar["size"] or sha256_bytes(data) != sidecar["sha256"]:
            log.warning("ignoring engine %s: its size or sha256 does not match its sidecar", path)
            return None
        return data

    def put(self, package: Package, spec: EngineSpec, data: bytes, meta: Mapping[str, Any]) -> Path:
        """Store an engine atomically, then its sidecar; return the engine's path.

        ``meta`` (the fingerprint dict, build seconds, TensorRT version, ...) is kept
        verbatim under the sidecar's ``"meta"``; it must be JSON-serialisable.
        """
        path = self.engine_path(package, spec)
        sidecar = {
            "engine": path.name,
            "sha256": sha256_bytes(data),
            "size": len(data),
            **spec.to_dict(),
            "package": {"name": package.manifest.name, "version": package.manifest.version},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "meta": dict(meta),
        }
        try:
            sidecar_bytes = json.dumps(sidecar, indent=2, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"engine meta {dict(meta)!r} is not JSON-serialisable: {exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        write_atomic(path.with_suffix(".json"), sidecar_bytes)  # last: it commits the entry
        log.info("cached engine %s (%d bytes)", path, len(data))
        return path

    def ort_trt_cache_dir(self, package: Package, fingerprint_key: str) -> Path:
        """A directory (created) for onnxruntime's ``trt_engine_cache_path`` / ``trt_timing_cache_path``.

        Keyed by the package's whole content and the device fingerprint: onnxruntime names its
        cached engines by model hash and sm only, not by TensorRT version.
        """
        path = self.root / "ort-trt" / _package_digest(package) / _check_key(fingerprint_key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def openvino_cache_dir(self) -> Path:
        """A directory (created) for OpenVINO's ``CACHE_DIR``: its compiled-model blobs, which OpenVINO
        keys itself by graph, device, properties and OpenVINO version."""
        path = self.root / "openvino"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def entries(self) -> list[dict[str, Any]]:
        """Every committed engine's sidecar plus its ``"path"``, sorted by path.

        Only the size is checked here (hashing every engine would be slow); :meth:`get`
        checks the sha256.
        """
        found: list[dict[str, Any]] = []
        for sidecar_path in sorted((self.root / "engines").glob("*/*.json")):
            sidecar = _read_sidecar(sidecar_path)
            if sidecar is None:
                continue
            engine = sidecar_path.with_suffix(".plan")
            try:
                size = engine.stat().st_size
            except OSError:
                log.warning("ignoring engine cache sidecar %s: its engine is missing", sidecar_path)
                continue
            if size != sidecar["size"]:
                log.warning("ignoring engine %s: %d bytes, its sidecar says %d", engine, size, sidecar["size"])
                continue
            found.append({**sidecar, "path": str(engine)})
        return found


def package_engine(package: Package, spec: EngineSpec) -> bytes | None:
    """The engine ``package`` itself carries for ``spec``, or None.

    ``manifest.engines`` entries look like ``{"file": "engines/<spec name>.plan", "key": "sm87-trt10.3.0",
    "graph": "s8s8", "precision": "int8", "dla_core": null, "fingerprint": {...}, "tensorrt": "10.3.0"}``.
    The file is read (and checked against its sha256) through :meth:`Package.read_bytes`.
    """
    for entry in package.manifest.engines:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("key"), str):
            continue
        try:
            carried = EngineSpec.from_entry(entry)
        except PackageError as exc:
            log.warning("package %s: ignoring engine entry %r: %s", package.manifest.name, entry.get("file"), exc)
            continue
        if carried != spec:
            continue
        file = entry.get("file")
        if not isinstance(file, str):
            raise PackageError(
                f"package {package.manifest.name} lists an engine for {spec.name!r} without a 'file'",
                hint="rebuild the package with edge-sdk convert",
            )
        return package.read_bytes(file)
    return None


def find_engine(package: Package, specs: list[EngineSpec], cache: EngineCache) -> tuple[EngineSpec, bytes, str] | None:
    """The first of ``specs`` the package carries or the cache holds: (spec, engine, where from)."""
    for spec in specs:
        carried = package_engine(package, spec)
        if carried is not None:
            return spec, carried, "package"
        cached = cache.get(package, spec)
        if cached is not None:
            return spec, cached, "engine cache"
    return None


def add_package_engine(
    package: Package, out: str | os.PathLike[str], engine: bytes, fingerprint: Mapping[str, Any], spec: EngineSpec,
    tensorrt: str,
) -> Package:
    """Write a copy of ``package`` to ``out`` that carries ``engine`` as ``engines/<spec name>.plan``.

    An engine already carried for the same spec is replaced; every other file is kept as is.
    """
    from dataclasses import replace

    from runtime.package import write_package

    name = f"engines/{spec.name}.plan"
    entry = {"file": name, **spec.to_dict(), "fingerprint": dict(fingerprint), "tensorrt": tensorrt}

    def same(e: Any) -> bool:
        try:
            return isinstance(e, Mapping) and EngineSpec.from_entry(e) == spec
        except PackageError:
            return False

    kept = [e for e in package.manifest.engines if not same(e)]
    replaced = {e.get("file") for e in package.manifest.engines if same(e)} | {name}
    files = {n: package.read_bytes(n) for n in package.manifest.files if n not in replaced}
    files[name] = engine
    manifest = replace(package.manifest, engines=(*kept, entry))
    return write_package(manifest, files, out, archive=package.is_archive)

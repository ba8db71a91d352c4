"""The daemon's configuration: one TOML file, validated at start.

Every error names the key (``sources.cam0.model``), the value, what was expected, and the
fix. Unknown keys are errors too, so a typo never silently falls back to a default.

    [server]
    host = "127.0.0.1"            # loopback unless configured
    port = 8080
    token_file = "/etc/edge-sdk/token"   # or token = "..."; required
    max_body_mb = 16
    header_timeout_s = 10          # request line + headers, from connect (or keep-alive wake-up)
    body_timeout_s = 60            # the whole body, from the end of the headers: 408 past it
    idle_timeout_s = 5             # keep-alive between requests
    max_connections = 512          # beyond it the oldest idle connection is closed
    max_in_flight = 16             # per model; beyond it 503 + Retry-After at once
    shutdown_grace_s = 10          # after SIGTERM; requests still running then get 503
    model_dirs = []                # where reloads may take packages from, besides each model's directory

    [models.defects]
    package = "/opt/edge-sdk/defects.edgepkg"
    backend = "auto"              # or "onnxruntime-cpu", or a list
    precision = "auto"
    threads = 2

    [knowledge_base]
    package = "/opt/edge-sdk/incidents.kb.edgepkg"
    k = 3

    [sources.cam0]
    uri = "rtsp://10.0.0.5/line1"  # camera index, URL, GStreamer pipeline, video file or folder
    model = "defects"
    asset = "press-4"
    policy = "latest"
    max_fps = 5
    rois = { left = [0, 0, 320, 240] }
    assets = { left = "press-4-left" }   # per region; default: asset
    watch = false                  # folders: keep waiting for new images

    [pipeline]
    max_batch = 8
    max_wait_ms = 4
    replicas = 1

    [fusion]                       # see runtime.fusion.FusionRule
    ...

    [events]
    faults = []                    # [] = every fault; else only these
    min_confidence = 0.5
    cooldown_s = 30                # one event per asset and fault within this time
    snapshots = true

    [storage]
    dir = "/var/lib/edge-sdk"
    max_age_days = 30
    max_mb = 2048

    [mqtt]
    host = "127.0.0.1"
    port = 1883
    prefix = "edge-sdk"
    device_id = "line1-jetson"     # default: the host name
    username = ""
    password_file = ""
    keepalive_s = 30

    [trust]                        # serve only packages signed by one of these keys (see runtime.signing)
    keys = ["/etc/edge-sdk/keys/line1.pub"]
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from edge_sdk.errors import DaemonError, EdgeSDKError, PipelineError
from runtime.assets import ASSET_ID_RULE, check_asset_id
from runtime.batching import Batching
from runtime.signing import PublicKey, load_public_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

log = logging.getLogger(__name__)

_SECTIONS = ("server", "models", "knowledge_base", "sources", "pipeline", "fusion", "events", "storage", "mqtt",
             "trust")


class ConfigError(DaemonError):
    """The configuration file is missing, not TOML, or has a bad value."""


def _fail(key: str, value: Any, expected: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{key} is {value!r}; expected {expected}", hint=hint)


def _table(data: Mapping[str, Any], key: str, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise _fail(where, value, "a table", hint=f"write it as [{where}]")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}", hint=f"allowed keys: {', '.join(allowed)}")
    return value


def _get(table: Mapping[str, Any], key: str, where: str, default: Any, check: Callable[[Any], bool],
         expected: str) -> Any:
    value = table.get(key, default)
    if value is not None and not check(value):
        raise _fail(f"{where}.{key}", value, expected)
    return value


def _int(lo: int, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _num(lo: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > lo if strict else v >= lo))


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _asset_id(v: Any) -> bool:
    try:
        check_asset_id(v)
    except PipelineError:
        return False
    return True


def _nonempty(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = field(default="", repr=False)  # never logged
    max_body_mb: float = 16.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 5.0
    max_connections: int = 512
    max_in_flight: int = 16
    shutdown_grace_s: float = 10.0
    model_dirs: tuple[Path, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    package: Path
    backend: str | tuple[str, ...] = "auto"
    precision: str = "auto"
    threads: int | None = None


@dataclass(frozen=True)
class KnowledgeConfig:
    package: Path
    k: int = 3


@dataclass(frozen=True)
class SourceConfig:
    name: str
    uri: str | int
    model: str
    asset: str
    policy: str = "all"
    max_fps: float | None = None
    rois: Mapping[str, Any] = field(default_factory=dict)
    assets: Mapping[str, str] = field(default_factory=dict)  # region -> asset
    watch: bool = False  # folders: keep waiting for new images
    stall_timeout: float | None = None  # live sources: None = the source's default (3 s); 0 = never stalled

    def source_options(self) -> dict[str, Any]:
        """What ``open_source`` gets beyond the spec: the options set here (a folder refuses live-only ones)."""
        if self.stall_timeout is None:
            return {}
        return {"stall_timeout": self.stall_timeout or None}

    def asset_of(self, roi: str | None) -> str:
        return self.assets.get(roi, self.asset) if roi else self.asset


@dataclass(frozen=True)
class PipelineConfig:
    max_batch: int = Batching.max_batch
    max_wait_ms: float = Batching.max_wait_ms
    replicas: int = 1


@dataclass(frozen=True)
class EventRules:
    faults: tuple[str, ...] = ()  # empty: every fault
    min_confidence: float = 0.5
    cooldown_s: float = 30.0
    snapshots: bool = True

    def matches(self, fault: str, is_fault: bool, confidence: float) -> bool:
        return is_fault and confidence >= self.min_confidence and (not self.faults or fault in self.faults)


@dataclass(frozen=True)
class StorageConfig:
    dir: Path = Path("/var/lib/edge-sdk")
    max_age_days: float | None = 30.0
    max_mb: float | None = 2048.0

    @property
    def max_age_s(self) -> float | None:
        return None if self.max_age_days is None else self.max_age_days * 86400.0

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_mb is None else int(self.max_mb * 1024 * 1024)


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    prefix: str = "edge-sdk"
    device_id: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    keepalive_s: int = 30


@dataclass(frozen=True)
class TrustConfig:
    """The public keys a package must be signed by (none: signatures are optional, but checked when present)."""

    keys: tuple[PublicKey, ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    server: ServerConfig
    models: Mapping[str, ModelConfig]
    storage: StorageConfig
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    knowledge_base: KnowledgeConfig | None = None
    pipeline: PipelineConfig = PipelineConfig()
    fusion: Mapping[str, Any] | None = None
    events: EventRules = EventRules()
    mqtt: MqttConfig | None = None
    path: Path | None = None
    trust: TrustConfig = TrustConfig()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DaemonConfig:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {str(file)!r} does not exist",
                              hint="write one (see `edge-sdk serve --help`) and pass --config PATH") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"configuration file {str(file)!r} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {str(file)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data, base=file.parent, path=file)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path = Path("."), path: Path | None = None) -> DaemonConfig:
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"configuration has unknown section(s) {unknown}", hint=f"sections: {', '.join(_SECTIONS)}")
        models = _models(data, base)
        fusion = data.get("fusion")
        if fusion is not None:
            from runtime.fusion import FusionRule

            if not isinstance(fusion, Mapping):
                raise _fail("fusion", fusion, "a table")
            try:
                FusionRule.from_dict(fusion)
            except Exception as exc:  # PipelineError: reword as a configuration error, same message
                raise ConfigError(getattr(exc, "message", str(exc)), hint=getattr(exc, "hint", None)) from None
        return cls(
            server=_server(data, base), models=models, storage=_storage(data, base),
            sources=_sources(data, models), knowledge_base=_knowledge(data, base), pipeline=_pipeline(data),
            fusion=fusion, events=_events(data), mqtt=_mqtt(data, base), path=path,
            trust=_trust(data, base),
        )


def _path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _secret(table: Mapping[str, Any], key: str, where: str, base: Path) -> str:
    """``key`` inline, or ``key_file``: a file holding it alone (surrounding whitespace stripped; a second
    line is refused, since clients could never send it); a file others may read is warned about."""
    inline = _get(table, key, where, "", _str, "a string")
    file = _get(table, f"{key}_file", where, "", _str, "a file path")
    if inline and file:
        raise ConfigError(f"{where} sets both {key} and {key}_file", hint="keep one")
    if file:
        path = _path(file, base)
        try:
            value = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{where}.{key}_file {file!r} cannot be read: {reason}",
                              hint="check the path and that the daemon's user may read it") from None
        if mode & 0o004:
            log.warning("%s.%s_file %s is readable by every user (mode %o); chmod 600 it", where, key, path,
                        mode & 0o777)
        where_key = f"{where}.{key}_file {file!r}"
    else:
        value, where_key = str(inline), f"{where}.{key}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        lines = len(value.splitlines())
        raise ConfigError(f"{where_key} holds {lines} lines or control characters; expected the {key} alone, "
                          "on one line", hint="write only the secret, e.g. `openssl rand -hex 32`")
    return value


def _server(data: Mapping[str, Any], base: Path) -> ServerConfig:
    t = _table(data, "server", ("host", "port", "token", "token_file", "max_body_mb", "header_timeout_s",
                                "body_timeout_s", "idle_timeout_s", "max_connections", "max_in_flight",
                                "shutdown_grace_s", "model_dirs"), "server")
    token = _secret(t, "token", "server", base)
    if len(token) < 16:
        raise ConfigError("server token is missing or shorter than 16 characters",
                          hint="set server.token_file to a file with a long random token "
                               "(e.g. `openssl rand -hex 32 > /etc/edge-sdk/token`)")
    dirs = _get(t, "model_dirs", "server", [], lambda v: isinstance(v, list) and all(_nonempty(d) for d in v),
                "a list of directory paths")
    seconds = {key: float(_get(t, key, "server", default, _num(0, strict=True), "seconds > 0"))
               for key, default in (("header_timeout_s", 10.0), ("body_timeout_s", 60.0), ("idle_timeout_s", 5.0),
                                    ("shutdown_grace_s", 10.0))}
    return ServerConfig(host=_get(t, "host", "server", "127.0.0.1", _nonempty, "a host name or address"),
                        port=_get(t, "port", "server", 8080, _int(0, 65535), "a port number 0-65535"),
                        token=token,
                        max_body_mb=_get(t, "max_body_mb", "server", 16.0, _num(0, strict=True), "megabytes > 0"),
                        max_connections=_get(t, "max_connections", "server", 512, _int(1), "an int >= 1"),
                        max_in_flight=_get(t, "max_in_flight", "server", 16, _int(1), "an int >= 1"),
                        model_dirs=tuple(_path(d, base) for d in dirs), **seconds)


def _models(data: Mapping[str, Any], base: Path) -> dict[str, ModelConfig]:
    table = data.get("models")
    if not isinstance(table, Mapping) or not table:
        raise ConfigError("configuration has no [models.NAME] table", hint='add [models.defects] package = "..."')
    out = {}
    for name, spec in table.items():
        where = f"models.{name}"
        if not isinstance(spec, Mapping):
            raise _fail(where, spec, "a table")
        t = _table(table, name, ("package", "backend", "precision", "threads"), where)
        package = _get(t, "package", where, None, _nonempty, "a package path")
        if package is None:
            raise ConfigError(f"{where} has no package", hint=f'add package = "/path/to/{name}.edgepkg"')
        backend = t.get("backend", "auto")
        if not (isinstance(backend, str) or (isinstance(backend, list) and all(isinstance(b, str) for b in backend))):
            raise _fail(f"{where}.backend", backend, '"auto", a backend name or a list of them')
        precision = _get(t, "precision", where, "auto", lambda v: v in ("auto", "fp32", "int8"), "auto, fp32 or int8")
        out[str(name)] = ModelConfig(str(name), _path(package, base),
                                     backend if isinstance(backend, str) else tuple(backend), precision,
                                     _get(t, "threads", where, None, _int(1), "an int >= 1"))
    return out


def _knowledge(data: Mapping[str, Any], base: Path) -> KnowledgeConfig | None:
    if "knowledge_base" not in data:
        return None
    t = _table(data, "knowledge_base", ("package", "k"), "knowledge_base")
    package = _get(t, "package", "knowledge_base", None, _nonempty, "a package path")
    if package is None:
        raise ConfigError("knowledge_base has no package", hint='add package = "/path/to/incidents.kb.edgepkg"')
    return KnowledgeConfig(_path(package, base), _get(t, "k", "knowledge_base", 3, _int(1, 100), "an int 1-100"))


def _sources(data: Mapping[str, Any], models: Mapping[str, ModelConfig]) -> dict[str, SourceConfig]:
    table = data.get("sources", {})
    if not isinstance(table, Mapping):
        raise _fail("sources", table, "a table of [sources.NAME]")
    out = {}
    for name, _ in table.items():
        where = f"sources.{name}"
        t = _table(table, name, ("uri", "model", "asset", "policy", "max_fps", "rois", "assets", "watch",
                                     "stall_timeout"), where)
        uri = t.get("uri")
        if not (_nonempty(uri) or _int(0)(uri)):
            raise _fail(f"{where}.uri", uri, "a camera index, URL, GStreamer pipeline, video file or folder")
        model = _get(t, "model", where, None, _nonempty, "a model name")
        if model not in models:
            raise _fail(f"{where}.model", model, f"one of the configured models {sorted(models)}")
        rois = _get(t, "rois", where, {}, lambda v: isinstance(v, Mapping), "a table of region = [x, y, w, h]")
        assets = _get(t, "assets", where, {}, lambda v: isinstance(v, Mapping) and all(map(_asset_id, v.values())),
                      f"a table of region = asset id ({ASSET_ID_RULE})")
        stray = sorted(set(assets) - set(rois))
        if stray:
            raise ConfigError(f"{where}.assets names region(s) {stray} that {where}.rois does not declare")
        out[str(name)] = SourceConfig(
            name=str(name), uri=uri if isinstance(uri, int) else str(uri), model=model,
            asset=_get(t, "asset", where, str(name), _asset_id, ASSET_ID_RULE),
            policy=_get(t, "policy", where, "all", lambda v: v in ("all", "latest"), '"all" or "latest"'),
            max_fps=_get(t, "max_fps", where, None, _num(0, strict=True), "frames per second > 0"),
            rois=dict(rois), assets=dict(assets),
            watch=_get(t, "watch", where, False, lambda v: isinstance(v, bool), "true or false"),
            stall_timeout=_get(t, "stall_timeout", where, None, _num(0),
                               "seconds >= 0 (0: a camera triggered by the line, never stalled)"))
    return out


def _pipeline(data: Mapping[str, Any]) -> PipelineConfig:
    t = _table(data, "pipeline", ("max_batch", "max_wait_ms", "replicas"), "pipeline")
    return PipelineConfig(_get(t, "max_batch", "pipeline", 8, _int(1, 1024), "an int 1-1024"),
                          _get(t, "max_wait_ms", "pipeline", 4.0, _num(0), "milliseconds >= 0"),
                          _get(t, "replicas", "pipeline", 1, _int(1, 64), "an int 1-64"))


def _events(data: Mapping[str, Any]) -> EventRules:
    t = _table(data, "events", ("faults", "min_confidence", "cooldown_s", "snapshots"), "events")
    faults = _get(t, "faults", "events", [], lambda v: isinstance(v, list) and all(map(_nonempty, v)),
                  "a list of fault names ([] = every fault)")
    return EventRules(tuple(faults),
                      _get(t, "min_confidence", "events", 0.5, lambda v: _num(0)(v) and v <= 1, "a number in [0, 1]"),
                      _get(t, "cooldown_s", "events", 30.0, _num(0), "seconds >= 0"),
                      _get(t, "snapshots", "events", True, lambda v: isinstance(v, bool), "true or false"))


def _storage(data: Mapping[str, Any], base: Path) -> StorageConfig:
    t = _table(data, "storage", ("dir", "max_age_days", "max_mb"), "storage")
    directory = _get(t, "dir", "storage", "/var/lib/edge-sdk", _nonempty, "a directory path")
    return StorageConfig(_path(directory, base),
                         _get(t, "max_age_days", "storage", 30.0, _num(0, strict=True), "days > 0"),
                         _get(t, "max_mb", "storage", 2048.0, _num(0, strict=True), "megabytes > 0"))


def _mqtt(data: Mapping[str, Any], base: Path) -> MqttConfig | None:
    if "mqtt" not in data:
        return None
    keys = ("host", "port", "prefix", "device_id", "username", "password", "password_file", "keepalive_s")
    t = _table(data, "mqtt", keys, "mqtt")
    host = _get(t, "host", "mqtt", None, _nonempty, "a broker host name or address")
    if host is None:
        raise ConfigError("mqtt has no host", hint='add host = "127.0.0.1" (or remove [mqtt] to disable MQTT)')
    prefix = _get(t, "prefix", "mqtt", "edge-sdk", lambda v: _nonempty(v) and not set(v) & set("#+"),
                  "a topic prefix without # or +")
    device = _get(t, "device_id", "mqtt", "", lambda v: _str(v) and not set(v) & set("#+/"),
                  "an id without #, + or /") or socket.gethostname()
    return MqttConfig(host=host, port=_get(t, "port", "mqtt", 1883, _int(1, 65535), "a port number"),
                      prefix=prefix.rstrip("/"), device_id=device,
                      username=_get(t, "username", "mqtt", "", _str, "a string"),
                      password=_secret(t, "password", "mqtt", base),
                      keepalive_s=_get(t, "keepalive_s", "mqtt", 30, _int(5, 3600), "seconds 5-3600"))


def _trust(data: Mapping[str, Any], base: Path) -> TrustConfig:
    """``[trust] keys``: public key files, each read and checked now, so a bad key stops the start."""
    if "trust" not in data:
        return TrustConfig()
    t = _table(data, "trust", ("keys",), "trust")
    files = _get(t, "keys", "trust", None, lambda v: isinstance(v, list) and all(map(_nonempty, v)),
                 "a list of public key file paths")
    if not files:
        raise ConfigError(f"trust.keys is {files!r}; expected at least one public key file",
                          hint='add keys = ["/etc/edge-sdk/keys/line1.pub"], or remove [trust] to serve unsigned '
                               "packages")
    keys: dict[str, PublicKey] = {}
    for i, file in enumerate(files):
        where = f"trust.keys[{i}] {file!r}"
        try:
            key = load_public_key(_path(file, base), extra="serve")
        except EdgeSDKError as exc:  # unreadable, not an ed25519 PEM, or no cryptography: name the key
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        if key.key_id in keys:
            raise ConfigError(f"{where} is key {key.key_id} again (also {keys[key.key_id].source})",
                              hint="list each key once")
        keys[key.key_id] = key
    return TrustConfig(tuple(keys.values()))

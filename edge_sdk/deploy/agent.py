"""The device side of a deployment: ``edge-sdk device have|install|activate|rollback|status|reload``.

Layout under the deployment root (e.g. ``/opt/edge-sdk``)::

    objects/<sha256>            verified files, content-addressed (shared by every version)
    objects/<sha256>.partial    an upload in progress (continued, never restarted)
    versions/<package-hash>/    an installed package (a directory package), complete or absent
    current -> versions/<h>     what the daemon serves (its config points at <root>/current)
    previous -> versions/<h>    what ``rollback`` returns to

The package hash is the sha256 of its ``manifest.json``, which lists every file's sha256, so it
names the whole content. Its ``signatures.json`` (signatures over those manifest bytes; not part
of the hash) is uploaded as one more object and named by ``install --signature``; when the device
trusts keys (``--trusted-key``, or the daemon configuration's ``[trust]`` given as ``--config``),
``install`` refuses a package that is unsigned or not signed by one of them. Each step prints one
JSON object on stdout; errors are one line on stderr and exit status 1. Links are switched by
renaming a new link over the old one, which is atomic: a reader sees the old version or the new
one, never neither.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from edge_sdk.deploy.transport import DeployError
from runtime.signing import SIGNATURES, PublicKey

HASH_LEN = 64


def _is_hash(value: str) -> bool:
    return len(value) == HASH_LEN and all(c in "0123456789abcdef" for c in value)


def _check_hash(value: str) -> str:
    if not _is_hash(value):
        raise DeployError(f"{value!r} is not a sha256 hex digest")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Layout:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects, self.versions = self.root / "objects", self.root / "versions"
        self.current, self.previous = self.root / "current", self.root / "previous"

    def object(self, digest: str) -> Path:
        return self.objects / _check_hash(digest)

    def partial(self, digest: str) -> Path:
        return self.objects / f"{_check_hash(digest)}.partial"

    def version(self, digest: str) -> Path:
        return self.versions / _check_hash(digest)

    def link_target(self, link: Path) -> str | None:
        if not link.is_symlink():
            return None
        name = Path(os.readlink(link)).name
        return name if _is_hash(name) else None


def have(root: str, digests: Sequence[str]) -> dict[str, Any]:
    """Which objects the device holds complete, and how far partial uploads got."""
    layout = Layout(root)
    done = [d for d in digests if layout.object(d).is_file()]
    partial = {d: layout.partial(d).stat().st_size for d in digests
               if d not in done and layout.partial(d).is_file()}
    return {"have": done, "partial": partial}


def _commit_object(layout: Layout, digest: str) -> None:
    """A finished upload becomes an object once its content hashes to its name."""
    final = layout.object(digest)
    if final.is_file():
        return
    partial = layout.partial(digest)
    if not partial.is_file():
        raise DeployError(f"object {digest[:12]} was not uploaded", hint="run the deployment again")
    got = sha256_file(partial)
    if got != digest:
        partial.unlink()
        raise DeployError(f"object {digest[:12]} arrived corrupted (its sha256 is {got[:12]}); it was removed",
                          hint="run the deployment again to upload it afresh")
    os.replace(partial, final)


def _assemble(layout: Layout, package: str, signature: str | None = None) -> Path:
    """``versions/<package>/`` from the objects, complete or not at all; with ``signature`` (the object
    holding its signatures.json) placed in it, replacing an earlier one."""
    target = layout.version(package)
    if target.is_dir():
        if signature is not None:
            _place_signatures(layout, target, signature)
        return target
    manifest_bytes = layout.object(package).read_bytes()
    files = json.loads(manifest_bytes).get("files", {})
    missing = [p for p, e in files.items() if not layout.object(e["sha256"]).is_file()]
    if missing:
        raise DeployError(f"package {package[:12]} lacks {len(missing)} file(s) on the device, e.g. {missing[0]!r}")
    staging = layout.versions / f".{package}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for rel, entry in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel in ("manifest.json", SIGNATURES):
            raise DeployError(f"package {package[:12]} lists an unsafe path {rel!r}")
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(layout.object(entry["sha256"]), dest)  # objects are never modified: sharing is safe
        except OSError:
            shutil.copyfile(layout.object(entry["sha256"]), dest)
    (staging / "manifest.json").write_bytes(manifest_bytes)
    if signature is not None:
        _place_signatures(layout, staging, signature)
    os.replace(staging, target)
    return target


def _place_signatures(layout: Layout, directory: Path, signature: str) -> None:
    tmp = directory / f".{SIGNATURES}.{os.getpid()}"
    shutil.copyfile(layout.object(signature), tmp)
    os.replace(tmp, directory / SIGNATURES)


def profile() -> tuple[str, str]:
    """What kind of device this is (as an inventory's ``profile`` names it) and its engine fingerprint."""
    import devices

    info = devices.detect()
    return info.jetson_family or info.arch, devices.fingerprint(info).key


def install(root: str, package: str, objects: Sequence[str], *, backend: str = "auto",
            allow_engine_build: bool = False, expect_profile: str | None = None, signature: str | None = None,
            trusted_keys: Sequence[PublicKey] = ()) -> dict[str, Any]:
    """Verify the uploaded objects, assemble the version, and preflight it on this device; with
    ``trusted_keys`` it must be signed by one of them (its signatures.json is the object ``signature``)."""
    from runtime.package import Package
    from runtime.select import select_runner

    layout = Layout(root)
    here, fingerprint = profile()
    if expect_profile and expect_profile != here:
        raise DeployError(f"this device is a {here!r}; the inventory expects {expect_profile!r}",
                          hint="fix the inventory's profile, or deploy a package meant for this device")
    for digest in [package, *objects, *([signature] if signature else [])]:
        _commit_object(layout, digest)
    path = _assemble(layout, package, signature)
    pkg = Package.open(path, trusted_keys=trusted_keys)  # every hash, the schema version, the signature
    built = _engine_build(pkg, allow_engine_build)
    selection = select_runner(pkg, backend, verify=True)
    try:
        parity = selection.parity
        return {"package": package, "name": pkg.manifest.name, "version": pkg.manifest.version, "profile": here,
                "fingerprint": fingerprint, "signer": pkg.signer,
                "backend": selection.backend, "graph": selection.graph, "engine": built,
                "skipped": [{"backend": s.backend, "reason": s.reason} for s in selection.skipped],
                "parity": None if parity is None else {"max_abs_diff": parity.max_abs_diff,
                                                       "tolerance": parity.tolerance}}
    finally:
        selection.runner.deactivate()


def _engine_build(pkg: Any, allowed: bool) -> str:
    import importlib.util

    if not allowed:
        return "not requested"
    if importlib.util.find_spec("tensorrt") is None:
        return "skipped: no TensorRT on this device"
    from converters.device_build import build_for_device  # needs the convert extra on the device

    build_for_device(pkg.path)
    return "built"


def _switch(link: Path, target: str | None) -> None:
    """Point ``link`` at ``versions/<target>`` (or remove it) atomically."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(Path("versions") / target, tmp)
    os.replace(tmp, link)


def activate(root: str, package: str) -> dict[str, Any]:
    layout = Layout(root)
    if not layout.version(package).is_dir():
        raise DeployError(f"package {package[:12]} is not installed on this device", hint="run install first")
    old = layout.link_target(layout.current)
    if old != package:
        _switch(layout.previous, old)
        _switch(layout.current, package)
    return {"current": package, "previous": layout.link_target(layout.previous)}


def rollback(root: str) -> dict[str, Any]:
    layout = Layout(root)
    old, new = layout.link_target(layout.current), layout.link_target(layout.previous)
    if new is None or not layout.version(new).is_dir():
        raise DeployError("there is no previous version to roll back to on this device")
    _switch(layout.current, new)
    _switch(layout.previous, old)
    return {"current": new, "previous": old}


def _describe(layout: Layout, digest: str | None) -> dict[str, Any] | None:
    if digest is None:
        return None
    try:
        manifest = json.loads((layout.version(digest) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"package": digest, "name": None, "version": None, "precision": None}
    return {"package": digest, "name": manifest.get("name"), "version": manifest.get("version"),
            "precision": manifest.get("precision")}


def status(root: str, config: str | None = None) -> dict[str, Any]:
    layout = Layout(root)
    versions = sorted(p.name for p in layout.versions.iterdir() if _is_hash(p.name)) if layout.versions.is_dir() else []
    out: dict[str, Any] = {"root": str(layout.root), "current": _describe(layout, layout.link_target(layout.current)),
                           "previous": _describe(layout, layout.link_target(layout.previous)), "versions": versions}
    if config:
        out["daemon"] = daemon_state(config)
    return out


def trusted_keys(files: Sequence[str], config: str | None) -> tuple[PublicKey, ...]:
    """The keys ``install`` requires: ``files``, plus the daemon configuration's ``[trust]`` keys."""
    from runtime.signing import load_public_key

    keys = {k.key_id: k for k in (load_public_key(f) for f in files)}
    if config:
        from edge_sdk.daemon.config import DaemonConfig

        keys.update({k.key_id: k for k in DaemonConfig.load(config).trust.keys})
    return tuple(keys.values())


def _daemon(config: str) -> tuple[str, str]:
    from edge_sdk.daemon.config import DaemonConfig

    cfg = DaemonConfig.load(config)
    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host
    return f"http://{host}:{cfg.server.port}", cfg.server.token


def daemon_state(config: str) -> dict[str, Any]:
    from edge_sdk.client import Client

    url, token = _daemon(config)
    client = Client(url, token, timeout=5)
    try:
        return {"url": url, "ready": client.ready(),
                "models": [{k: m[k] for k in ("name", "version", "backend", "precision")} for m in client.models()]}
    except Exception as exc:  # unreachable, stopped: a status, not a failure
        return {"url": url, "ready": False, "error": str(getattr(exc, "message", exc))}


def reload(config: str, models: Sequence[str] = (), timeout: float = 60.0) -> dict[str, Any]:
    """Hot swap the daemon's models to what their configured paths hold now, then wait until ready."""
    from edge_sdk.client import Client

    url, token = _daemon(config)
    client = Client(url, token, timeout=timeout)
    names = list(models) or [m["name"] for m in client.models()]
    swapped = [client.reload(name) for name in names]
    deadline = time.monotonic() + timeout
    while not client.ready():
        if time.monotonic() > deadline:
            raise DeployError(f"the daemon at {url} is not ready {timeout:.0f} s after the reload")
        time.sleep(0.2)
    return {"url": url, "models": [{k: m[k] for k in ("name", "version", "backend")} for m in swapped]}


def add_device_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("device", help="device-side deployment steps (run by `edge-sdk deploy` over ssh)")
    steps = p.add_subparsers(dest="step", required=True)
    s = steps.add_parser("have", help="which objects this device holds")
    s.add_argument("--root", required=True)
    s.add_argument("digests", nargs="*")
    s = steps.add_parser("install", help="verify uploaded objects, assemble and preflight a version")
    s.add_argument("--root", required=True)
    s.add_argument("--package", required=True)
    s.add_argument("--backend", default="auto")
    s.add_argument("--allow-engine-build", action="store_true")
    s.add_argument("--expect-profile")
    s.add_argument("--signature", help="the uploaded object holding the package's signatures.json")
    s.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="refuse the package unless it is signed by this public key (repeatable)")
    s.add_argument("--config", help="the daemon's configuration: its [trust] keys are required too")
    s.add_argument("objects", nargs="*")
    s = steps.add_parser("activate", help="switch current to an installed version")
    s.add_argument("--root", required=True)
    s.add_argument("--package", required=True)
    s = steps.add_parser("rollback", help="switch current back to previous")
    s.add_argument("--root", required=True)
    s = steps.add_parser("status", help="installed versions (and the daemon's state)")
    s.add_argument("--root", required=True)
    s.add_argument("--config")
    s = steps.add_parser("reload", help="hot swap the daemon's models and wait until ready")
    s.add_argument("--config", required=True)
    s.add_argument("--model", action="append", default=[])
    s.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_cmd_device)


def _cmd_device(args: argparse.Namespace) -> int:
    step = args.step
    if step == "have":
        result = have(args.root, args.digests)
    elif step == "install":
        result = install(args.root, args.package, args.objects, backend=args.backend,
                         allow_engine_build=args.allow_engine_build, expect_profile=args.expect_profile,
                         signature=args.signature, trusted_keys=trusted_keys(args.trusted_key, args.config))
    elif step == "activate":
        result = activate(args.root, args.package)
    elif step == "rollback":
        result = rollback(args.root)
    elif step == "status":
        result = status(args.root, args.config)
    else:
        result = reload(args.config, args.model, args.timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0

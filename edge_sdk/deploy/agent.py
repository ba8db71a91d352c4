"""The device side of a deployment: ``edge-sdk device have|install|activate|rollback|status|reload|prune``.

Layout under the deployment root (e.g. ``/opt/edge-sdk``)::

    objects/<sha256>            verified files, content-addressed (shared by every version), 0444
    objects/<sha256>.partial    an upload in progress (continued, never restarted)
    versions/<package-hash>/    an installed package (a directory package), complete or absent;
                                its files are hard links of the objects, directories 0755
    current -> versions/<h>     what the daemon serves (its config points at <root>/current)
    previous -> versions/<h>    what ``rollback`` returns to

The package hash is the sha256 of its ``manifest.json``, which lists every file's sha256, so it
names the whole content. Its ``signatures.json`` (signatures over those manifest bytes; not part
of the hash) is uploaded as one more object and named by ``install --signature``; when the device
trusts keys (``--trusted-key``, or the daemon configuration's ``[trust]`` given as ``--config``),
``install`` refuses a package that is unsigned or not signed by one of them. Each step prints one
JSON object on stdout; errors are one line on stderr and exit status 1. Links are switched by
renaming a new link over the old one, which is atomic: a reader sees the old version or the new
one, never neither. The store itself (hash checks, damaged files fetched again, modes, ``prune``'s
retention) is :mod:`edge_sdk.deploy.store`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from edge_sdk.client import DaemonUnreachable
from edge_sdk.deploy.store import Layout, assemble, commit_object, have, make_dirs, prune, repair_others
from edge_sdk.deploy.store import is_hash as _is_hash
from edge_sdk.deploy.transport import DeployError
from edge_sdk.errors import EdgeSDKError
from runtime.signing import PublicKey


def profile() -> tuple[str, str]:
    """What kind of device this is (as an inventory's ``profile`` names it) and its engine fingerprint."""
    import devices

    info = devices.detect()
    return info.jetson_family or info.arch, devices.fingerprint(info).key


def install(root: str, package: str, objects: Sequence[str], *, backend: str = "auto",
            allow_engine_build: bool = False, expect_profile: str | None = None, signature: str | None = None,
            trusted_keys: Sequence[PublicKey] = (), config: str | None = None,
            models: Sequence[str] = ()) -> dict[str, Any]:
    """Verify the uploaded objects, assemble the version, and preflight it on this device; with
    ``trusted_keys`` it must be signed by one of them (its signatures.json is the object ``signature``).
    With the daemon's ``config`` the preflight runs as the daemon will serve it (the backend and
    precision of the models configured on ``ROOT/current``), and ``models`` must be configured there:
    a typo is caught before anything is switched."""
    from runtime.package import Package

    layout = Layout(root)
    here, fingerprint = profile()
    if expect_profile and expect_profile != here:
        raise DeployError(f"this device is a {here!r}; the inventory expects {expect_profile!r}",
                          hint="fix the inventory's profile, or deploy a package meant for this device")
    fresh = {d for d in dict.fromkeys([package, *objects, *([signature] if signature else [])])
             if commit_object(layout, d)}
    path = assemble(layout, package, signature)
    repair_others(layout, fresh, package)  # a re-sent damaged file is shared by older versions too
    pkg = Package.open(path, trusted_keys=trusted_keys)  # every hash, the schema version, the signature
    built = _engine_build(pkg, allow_engine_build)
    policy, precision = _served_as(root, config, models, backend)
    return {"package": package, "name": pkg.manifest.name, "version": pkg.manifest.version, "profile": here,
            "fingerprint": fingerprint, "signer": pkg.signer, "engine": built, **_preflight(pkg, policy, precision)}


def _preflight(pkg: Any, backend: Any, precision: str) -> dict[str, Any]:
    """Select a backend for ``pkg`` here, golden vectors checked (raises when none can serve it)."""
    from runtime.select import select_runner

    selection = select_runner(pkg, backend, precision=precision, verify=True)
    try:
        parity = selection.parity
        return {"backend": selection.backend, "graph": selection.graph, "precision": precision,
                "skipped": [{"backend": s.backend, "reason": s.reason} for s in selection.skipped],
                "parity": None if parity is None else {"max_abs_diff": parity.max_abs_diff,
                                                       "tolerance": parity.tolerance}}
    finally:
        selection.runner.deactivate()


def _served_as(root: str, config: str | None, models: Sequence[str], backend: str) -> tuple[Any, str]:
    """The backend policy and precision the daemon (``config``) serves ``ROOT/current`` with; checks that
    ``models`` are configured."""
    if not config:
        return backend, "auto"
    from edge_sdk.daemon.config import DaemonConfig

    cfg = DaemonConfig.load(config)
    unknown = [m for m in models if m not in cfg.models]
    if unknown:
        raise DeployError(f"--model {', '.join(unknown)}: not configured in {config} "
                          f"(models: {', '.join(sorted(cfg.models))})", hint="fix the --model name")
    current = Layout(root).current.absolute()
    here = [m for m in cfg.models.values() if m.package.absolute() == current]
    if not here:
        return backend, "auto"
    chosen = here[0]
    return (chosen.backend if backend == "auto" else backend), chosen.precision


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
    marks = refused(layout)
    if package in marks:  # deployed again on purpose (say, after the daemon's config was fixed)
        del marks[package]
        _write_refused(layout, marks)
    return {"current": package, "previous": layout.link_target(layout.previous)}


REFUSED = "refused.json"  # versions a daemon refused to serve: never a rollback target
NOT_THIS_DEPLOYMENT = "does not point at this deployment"  # the daemon's config, not the package, is wrong


def refused(layout: Layout) -> dict[str, Any]:
    try:
        data = json.loads((layout.root / REFUSED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _mark_refused(layout: Layout, digest: str, reason: str) -> None:
    _write_refused(layout, {**refused(layout), digest: {"reason": reason[:500], "at": time.time()}})


def _write_refused(layout: Layout, marks: dict[str, Any]) -> None:
    tmp = layout.root / f".{REFUSED}.{os.getpid()}"
    tmp.write_text(json.dumps(marks, indent=1))
    os.replace(tmp, layout.root / REFUSED)


def rollback(root: str, *, refused_reason: str | None = None, config: str | None = None,
             backend: str = "auto", trusted: Sequence[PublicKey] = ()) -> dict[str, Any]:
    """Switch ``current`` back to ``previous`` after verifying it here (hashes, signature, golden vectors on
    the backend the daemon serves it with). With ``refused_reason`` the version switched away from is
    marked refused (and no longer ``previous``): a later rollback cannot bring it back."""
    from runtime.package import Package

    layout = Layout(root)
    old, new = layout.link_target(layout.current), layout.link_target(layout.previous)
    if new is None or not layout.version(new).is_dir():
        raise DeployError("there is no previous version to roll back to on this device")
    mark = refused(layout).get(new)
    if mark:
        raise DeployError(f"the previous version {_label(layout, new)} was refused by the daemon "
                          f"({mark.get('reason', 'no reason kept')}); not rolling back to it",
                          hint="deploy a fixed package instead")
    policy, precision = _served_as(root, config, (), backend)
    try:
        pkg = Package.open(layout.version(new), trusted_keys=trusted)
        check = _preflight(pkg, policy, precision)
    except EdgeSDKError as exc:
        raise DeployError(f"the previous version {_label(layout, new)} cannot serve here: {exc.message}; "
                          "not rolling back to it", hint="deploy a good package instead") from None
    _switch(layout.current, new)
    if refused_reason is not None and old is not None:
        _mark_refused(layout, old, refused_reason)
        _switch(layout.previous, None)
    else:
        _switch(layout.previous, old)
    return {"current": _describe(layout, new), "previous": _describe(layout, layout.link_target(layout.previous)),
            "refused": old if refused_reason is not None else None, "preflight": check}


def _label(layout: Layout, digest: str) -> str:
    d = _describe(layout, digest) or {}
    return f"{d.get('name')} {d.get('version')} ({digest[:12]})"


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
                           "previous": _describe(layout, layout.link_target(layout.previous)), "versions": versions,
                           "refused": sorted(refused(layout))}
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
                "models": [{k: m.get(k) for k in ("name", "model", "version", "backend", "precision", "package")}
                           for m in client.models()]}
    except Exception as exc:  # unreachable, stopped: a status, not a failure
        return {"url": url, "ready": False, "error": str(getattr(exc, "message", exc))}


def reload(config: str, models: Sequence[str] = (), timeout: float = 60.0, root: str | None = None,
           expect: str | None = None) -> dict[str, Any]:
    """Hot swap the daemon's models to what their configured paths hold now, then wait until ready.

    A daemon that is not running is not a failure (``running: false``): it serves ``current`` when it
    starts. With ``root`` and ``expect`` (the package just switched to) the daemon must then report that
    version for every model it serves from ``ROOT/current``, and serve at least one from there."""
    from edge_sdk.client import Client

    url, token = _daemon(config)
    client = Client(url, token, timeout=timeout)
    try:
        names = list(models) or [m["name"] for m in client.models()]
    except DaemonUnreachable:
        return {"url": url, "running": False, "models": []}
    swapped = [client.reload(name) for name in names]
    deadline = time.monotonic() + timeout
    while not client.ready():
        if time.monotonic() > deadline:
            raise DeployError(f"the daemon at {url} is not ready {timeout:.0f} s after the reload")
        time.sleep(0.2)
    served = client.models()
    if root is not None and expect is not None:
        _check_served(Layout(root), expect, served, url, config)
    return {"url": url, "running": True, "models": [{k: m[k] for k in ("name", "version", "backend")} for m in swapped],
            "served": [{k: m.get(k) for k in ("name", "model", "version", "package")} for m in served]}


def _check_served(layout: Layout, expect: str, served: Sequence[dict[str, Any]], url: str, config: str) -> None:
    want = _describe(layout, expect) or {}
    current = layout.current.absolute()
    here = [m for m in served if m.get("package") and Path(m["package"]).absolute() == current]
    if not here:
        listing = ", ".join(f"{m['name']} {m.get('version')} from {m.get('package')}" for m in served) or "nothing"
        raise DeployError(f"the daemon at {url} serves no model from {current} (it serves {listing}): its "
                          f"configuration {config} {NOT_THIS_DEPLOYMENT}",
                          hint=f"set models.<name>.package = \"{current}\" in {config}")
    wrong = [m for m in here if (m.get("model"), m.get("version")) != (want.get("name"), want.get("version"))]
    if wrong:
        m = wrong[0]
        raise DeployError(f"after the reload the daemon serves {m['name']} as {m.get('model')} {m.get('version')}, "
                          f"not the installed {want.get('name')} {want.get('version')}")


LOCK = ".deploy.lock"
LOCK_STALE_S = 60.0  # a lock its holder has not renewed for this long was left by a deploy that died
LOCK_RENEW_S = 15.0  # how often a deploy under way renews its lock


def lock(root: str, owner: str, *, release: bool = False, take_over: str | None = None) -> dict[str, Any]:
    """Take, renew (same ``owner``) or, with ``release``, give back the device's deploy lock: one deploy or
    rollback at a time, whichever workstation runs it.

    A lock its holder has not renewed for LOCK_STALE_S is taken over, and so is one held by ``take_over``
    (the workstation found that holder dead). Otherwise the answer is ``{"held_by": ..., "renewed_s_ago": ...}``
    and the caller decides."""
    path = Layout(root).root / LOCK
    held = _lock_holder(path)
    if release:
        if held is not None and held.get("owner") == owner:
            path.unlink(missing_ok=True)
        return {"released": owner}
    make_dirs(path.parent)  # 0755 whatever the umask: a daemon running as another user reads inside
    age = time.time() - float(held.get("at", 0)) if held is not None else None
    if (held is not None and held.get("owner") not in (owner, take_over) and age is not None
            and age < LOCK_STALE_S):
        return {"held_by": held.get("owner"), "renewed_s_ago": round(age, 1), "path": str(path)}
    tmp = path.with_name(f"{LOCK}.{os.getpid()}")
    tmp.write_text(json.dumps({"owner": owner, "at": time.time()}))
    if held is None:
        try:
            os.link(tmp, path)  # atomic: fails when another deploy took it meanwhile
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            return lock(root, owner)
        tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)  # ours already (renewed), or stale, or its holder died
    return {"locked": owner}


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"owner": "unknown (unreadable lock)", "at": path.stat().st_mtime if path.exists() else 0}
    return data if isinstance(data, dict) else {"owner": "unknown", "at": 0}


def add_device_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("device", help="device-side deployment steps (run by `edge-sdk deploy` over ssh)")
    steps = p.add_subparsers(dest="step", required=True)
    s = steps.add_parser("lock", help="take (or --release) the device's deploy lock")
    s.add_argument("--root", required=True)
    s.add_argument("--owner", required=True)
    s.add_argument("--release", action="store_true")
    s.add_argument("--take-over", metavar="OWNER", help="take the lock from OWNER, found dead by the caller")
    s = steps.add_parser("have", help="which objects this device holds")
    s.add_argument("--root", required=True)
    s.add_argument("digests", nargs="*")
    s = steps.add_parser("prune", help="remove versions beyond current, previous and the newest --keep, "
                                       "and the objects only they used")
    s.add_argument("--root", required=True)
    s.add_argument("--keep", type=int, required=True)
    s = steps.add_parser("install", help="verify uploaded objects, assemble and preflight a version")
    s.add_argument("--root", required=True)
    s.add_argument("--package", required=True)
    s.add_argument("--backend", default="auto")
    s.add_argument("--allow-engine-build", action="store_true")
    s.add_argument("--expect-profile")
    s.add_argument("--signature", help="the uploaded object holding the package's signatures.json")
    s.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="refuse the package unless it is signed by this public key (repeatable)")
    s.add_argument("--config", help="the daemon's configuration: its [trust] keys are required too, and the "
                                    "preflight uses the backend and precision it serves ROOT/current with")
    s.add_argument("--model", action="append", default=[], help="daemon model(s) that will be reloaded: checked")
    s.add_argument("objects", nargs="*")
    s = steps.add_parser("activate", help="switch current to an installed version")
    s.add_argument("--root", required=True)
    s.add_argument("--package", required=True)
    s = steps.add_parser("rollback", help="verify previous, then switch current back to it")
    s.add_argument("--root", required=True)
    s.add_argument("--refused", metavar="REASON", help="the daemon refused current: mark it, never roll back to it")
    s.add_argument("--config", help="the daemon's configuration (trusted keys, backend and precision)")
    s.add_argument("--backend", default="auto")
    s = steps.add_parser("status", help="installed versions (and the daemon's state)")
    s.add_argument("--root", required=True)
    s.add_argument("--config")
    s = steps.add_parser("reload", help="hot swap the daemon's models and wait until ready")
    s.add_argument("--config", required=True)
    s.add_argument("--model", action="append", default=[])
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--root", help="the deployment root: with --expect, check what the daemon serves from it")
    s.add_argument("--expect", metavar="PACKAGE", help="the package hash current was switched to")
    p.set_defaults(func=_cmd_device)


def _cmd_device(args: argparse.Namespace) -> int:
    step = args.step
    if step == "lock":
        result = lock(args.root, args.owner, release=args.release, take_over=args.take_over)
    elif step == "have":
        result = have(args.root, args.digests)
    elif step == "prune":
        result = prune(args.root, args.keep)
    elif step == "install":
        result = install(args.root, args.package, args.objects, backend=args.backend,
                         allow_engine_build=args.allow_engine_build, expect_profile=args.expect_profile,
                         signature=args.signature, trusted_keys=trusted_keys(args.trusted_key, args.config),
                         config=args.config, models=args.model)
    elif step == "activate":
        result = activate(args.root, args.package)
    elif step == "rollback":
        result = rollback(args.root, refused_reason=args.refused, config=args.config, backend=args.backend,
                          trusted=trusted_keys((), args.config))
    elif step == "status":
        result = status(args.root, args.config)
    else:
        result = reload(args.config, args.model, args.timeout, root=args.root, expect=args.expect)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0

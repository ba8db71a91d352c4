"""The workstation side: deploy one package to many devices, each step verified, failures rolled back.

Per device: ``have`` (what it already holds) -> upload the missing files, content-addressed, to
``objects/<sha>.partial`` (an interrupted upload continues where it stopped) -> ``install``
(the device verifies every hash, assembles ``versions/<package-hash>/`` and preflights it: its
profile, the backend it would select, the golden-vector parity check, an engine build if allowed)
-> ``activate`` (atomic ``current`` switch) -> ``reload`` the daemon and wait until it is ready.
A failure after ``activate`` switches back (``rollback``) and reloads again, so the previous
version keeps serving. Devices run in parallel (bounded); ``canary`` devices go first and the
rest only follow if every canary succeeded.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_sdk.deploy.transport import DeployError, Transport
from edge_sdk.errors import EdgeSDKError
from runtime.package import Package, sha256_bytes

log = logging.getLogger(__name__)

Report = Callable[[str, str], None]  # (target, message): a progress line per device
PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class LocalPackage:
    """A verified package on the workstation, with its files staged by content hash."""

    path: Path
    digest: str  # sha256 of manifest.json: names the whole content
    name: str
    version: str
    objects: dict[str, Path]  # sha256 -> staged file (manifest.json included)
    signature: str | None = None  # sha256 of its signatures.json (also in objects), when signed

    @classmethod
    def open(cls, path: str | Path, staging: Path) -> LocalPackage:
        package = Package.open(path)  # a package that fails verification here never leaves the workstation
        raw = _manifest_bytes(package)
        digest = sha256_bytes(raw)
        objects: dict[str, Path] = {digest: staging / digest}
        objects[digest].write_bytes(raw)
        for name, entry in package.manifest.files.items():
            if entry.sha256 not in objects:
                objects[entry.sha256] = staging / entry.sha256
                objects[entry.sha256].write_bytes(package.read_bytes(name))
        signature = None
        if package.signatures is not None:  # not listed in the manifest: shipped as one more object
            signature = sha256_bytes(package.signatures)
            objects.setdefault(signature, staging / signature).write_bytes(package.signatures)
        return cls(package.path, digest, package.manifest.name, package.manifest.version, objects, signature)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.objects.values())


def _manifest_bytes(package: Package) -> bytes:
    if package.is_archive:
        with zipfile.ZipFile(package.path) as zf:
            return zf.read("manifest.json")
    return (package.path / "manifest.json").read_bytes()


@dataclass(frozen=True)
class Options:
    config: str | None = None  # the daemon's config on the device: reload it after switching
    models: tuple[str, ...] = ()  # the daemon models to reload (default: all)
    backend: str = "auto"
    allow_engine_build: bool = False
    profile: str | None = None  # expected device profile (inventory)
    timeout: float = 600.0


@dataclass(frozen=True)
class DeviceResult:
    target: str
    ok: bool
    step: str  # the last step reached
    message: str = ""
    version: str = ""
    backend: str = ""
    uploaded_bytes: int = 0
    seconds: float = 0.0
    rolled_back: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "step": self.step, "message": self.message,
                "version": self.version, "backend": self.backend, "uploaded_bytes": self.uploaded_bytes,
                "seconds": round(self.seconds, 2), "rolled_back": self.rolled_back, "details": self.details}


def device_step(transport: Transport, step: str, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``edge-sdk device <step> ...`` on the device and return its JSON answer."""
    result = transport.run(["edge-sdk", "device", step, *args], timeout=timeout)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise DeployError(f"{step} on the device: {message.removeprefix('edge-sdk: error: ')}")
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError):
        raise DeployError(f"{step} on {transport.target.display} answered {result.stdout[-200:]!r}, not JSON",
                          hint="is the device's edge-sdk the same version as this one?") from None


def _upload(transport: Transport, package: LocalPackage, report: Report) -> int:
    root = transport.target.path
    answer = device_step(transport, "have", "--root", root, *package.objects)
    missing = [d for d in package.objects if d not in set(answer["have"])]
    partial = {k: int(v) for k, v in answer.get("partial", {}).items()}
    total = sum(package.objects[d].stat().st_size - partial.get(d, 0) for d in missing)
    if partial:
        report(transport.target.display, f"resuming {len(partial)} partial upload(s)")
    sent, last = 0, [0.0]
    for digest in missing:
        before = partial.get(digest, 0)
        size = package.objects[digest].stat().st_size

        def progress(done: int, _total: int, base: int = sent, start: int = before) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:  # a line every few seconds, not one per chunk
                last[0] = now
                report(transport.target.display, f"uploading {_mb(base + done - start)}/{_mb(total)}")

        transport.upload(package.objects[digest], f"{root}/objects/{digest}.partial", progress=progress)
        sent += size - before
    report(transport.target.display, f"uploaded {_mb(sent)} ({len(package.objects) - len(missing)} of "
                                     f"{len(package.objects)} files already there)")
    return sent


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def deploy_one(transport: Transport, package: LocalPackage, options: Options, report: Report) -> DeviceResult:
    """Deploy to one device; never raises for a device problem (the result says what failed)."""
    target, root, started = transport.target.display, transport.target.path, time.monotonic()
    step, sent, activated, details = "connect", 0, False, {}
    try:
        step = "upload"
        sent = _upload(transport, package, report)
        step = "preflight"
        report(target, "verifying and preflighting on the device")
        args = ["--root", root, "--package", package.digest, "--backend", options.backend]
        args += ["--allow-engine-build"] if options.allow_engine_build else []
        args += ["--expect-profile", options.profile] if options.profile else []
        args += ["--signature", package.signature] if package.signature else []
        args += ["--config", options.config] if options.config else []  # its [trust] keys are checked
        details["preflight"] = device_step(transport, "install", *args, *package.objects, timeout=options.timeout)
        step = "activate"
        details["activate"] = device_step(transport, "activate", "--root", root, "--package", package.digest)
        activated = True
        if options.config:
            step = "reload"
            report(target, "reloading the daemon")
            models = [a for m in options.models for a in ("--model", m)]
            details["reload"] = device_step(transport, "reload", "--config", options.config, *models,
                                            timeout=options.timeout)
        report(target, f"ok: {package.name} {package.version} on {details['preflight']['backend']}")
        return DeviceResult(target, True, "done", version=package.version, backend=details["preflight"]["backend"],
                            uploaded_bytes=sent, seconds=time.monotonic() - started, details=details)
    except EdgeSDKError as exc:
        result = DeviceResult(target, False, step, exc.message, uploaded_bytes=sent,
                              seconds=time.monotonic() - started, details=details)
        report(target, f"failed at {step}: {exc.message}")
        return _roll_back(transport, options, result, report) if activated else result


def _roll_back(transport: Transport, options: Options, result: DeviceResult, report: Report) -> DeviceResult:
    target = transport.target.display
    report(target, "rolling back to the previous version")
    try:
        back = device_step(transport, "rollback", "--root", transport.target.path)
        if options.config:
            device_step(transport, "reload", "--config", options.config,
                        *[a for m in options.models for a in ("--model", m)], timeout=options.timeout)
    except DeployError as exc:
        return replace(result, message=f"{result.message}; the rollback failed too: {exc.message}")
    report(target, "rolled back")
    return replace(result, rolled_back=True, details={**result.details, "rollback": back})


Job = tuple[Transport, Options]


def deploy(package_path: str | Path, jobs: Sequence[Job], *, parallel: int = 4, canary: int = 0,
           report: Report | None = None) -> list[DeviceResult]:
    """Deploy to every job's device (with its options); canaries first, then the rest if every
    canary succeeded."""
    say: Report = report or (lambda target, message: log.info("%s: %s", target, message))
    if parallel < 1 or canary < 0:
        raise DeployError(f"parallel is {parallel} and canary {canary}; expected parallel >= 1 and canary >= 0")
    with tempfile.TemporaryDirectory(prefix="edge-sdk-deploy-") as staging:
        package = LocalPackage.open(package_path, Path(staging))
        say("workstation", f"{package.name} {package.version}: package {package.digest[:12]}, "
                           f"{len(package.objects)} files, {_mb(package.size)}")
        waves = [list(jobs[:canary]), list(jobs[canary:])] if canary else [list(jobs)]
        results: list[DeviceResult] = []
        for i, wave in enumerate(waves):
            if i and not all(r.ok for r in results):
                results += [DeviceResult(t.target.display, False, "skipped", "a canary failed; not attempted")
                            for t, _ in wave]
                continue
            with ThreadPoolExecutor(max_workers=min(parallel, max(1, len(wave)))) as pool:
                results += list(pool.map(lambda job: deploy_one(job[0], package, job[1], say), wave))
        return results


def rollback_all(jobs: Sequence[Job], *, parallel: int = 4) -> list[DeviceResult]:
    def one(job: Job) -> DeviceResult:
        t, options = job
        started = time.monotonic()
        try:
            back = device_step(t, "rollback", "--root", t.target.path)
            if options.config:
                device_step(t, "reload", "--config", options.config, timeout=options.timeout)
            return DeviceResult(t.target.display, True, "rollback", seconds=time.monotonic() - started,
                                details={"rollback": back})
        except DeployError as exc:
            return DeviceResult(t.target.display, False, "rollback", exc.message, seconds=time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))


def status_all(jobs: Sequence[Job], *, parallel: int = 4) -> list[dict[str, Any]]:
    def one(job: Job) -> dict[str, Any]:
        t, options = job
        args = ["--root", t.target.path] + (["--config", options.config] if options.config else [])
        try:
            return {"target": t.target.display, "ok": True, **device_step(t, "status", *args)}
        except DeployError as exc:
            return {"target": t.target.display, "ok": False, "error": exc.message}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))

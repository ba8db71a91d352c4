"""The workstation side: deploy one package to many devices, each step verified, failures rolled back.

Per device: ``have`` (what it already holds) -> upload the missing files, content-addressed, to
``objects/<sha>.partial`` (an interrupted upload continues where it stopped) -> ``install``
(the device verifies every hash, assembles ``versions/<package-hash>/`` and preflights it: its
profile, the backend it would select, the golden-vector parity check, an engine build if allowed)
-> ``activate`` (atomic ``current`` switch) -> ``reload`` the daemon and wait until it is ready
-> ``prune`` (the versions beyond ``Options.keep`` and the files only they used are removed).
A failure after ``activate`` switches back (``rollback``) and reloads again, so the previous
version keeps serving. Devices run in parallel (bounded); ``canary`` devices go first and the
rest only follow if every canary succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from edge_sdk.deploy.agent import LOCK_RENEW_S, LOCK_STALE_S, NOT_THIS_DEPLOYMENT
from edge_sdk.deploy.transport import DeployError, DiskFullError, Transport
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
                package.copy_file(name, objects[entry.sha256])  # streamed: a large model is not held in memory
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
    keep: int | None = 3  # the device keeps current, previous and the newest `keep` versions (None: all)


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
    hint: str | None = None  # what to do about a failure (a changed host key, a missing edge-sdk, ...)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "step": self.step, "message": self.message,
                "version": self.version, "backend": self.backend, "uploaded_bytes": self.uploaded_bytes,
                "seconds": round(self.seconds, 2), "rolled_back": self.rolled_back, "hint": self.hint,
                "details": self.details}


def device_step(transport: Transport, step: str, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``edge-sdk device <step> ...`` on the device and return its JSON answer."""
    result = transport.run(["edge-sdk", "device", step, *args], timeout=timeout)
    if result.returncode == 127 or (result.returncode != 0 and re.search(r"edge.sdk\S*: (command )?not found|"
                                                                         r"No module named .?edge_sdk",
                                                                         result.stderr)):
        raise DeployError(f"edge-sdk is not installed where the device looks for it "
                          f"({(result.stderr.strip().splitlines() or ['exit status 127'])[-1][:200]})",
                          hint="install it on the device (pip install 'edge-sdk[serve]' in the device's "
                               "environment), then pass --edge-sdk /path/to/edge-sdk or set edge_sdk in the "
                               "inventory if it is not on the ssh session's PATH")
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise DeployError(f"{step} on the device: {message.removeprefix('edge-sdk: error: ')}")
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError):
        raise DeployError(f"{step} on {transport.target.display} answered {result.stdout[-200:]!r}, not JSON",
                          hint="is the device's edge-sdk the same version as this one?") from None


def _upload(transport: Transport, package: LocalPackage, report: Report, keep: int | None = None) -> int:
    """Send what the device lacks (a file it found damaged again), refusing when its disk has too little
    space; with ``keep``, versions beyond that retention are removed first when space is short."""
    target, root = transport.target.display, transport.target.path
    missing, partial, total, answer = _plan(transport, package)
    if answer.get("free") is not None and total > answer["free"] and keep is not None:
        report(target, f"{_mb(total)} to send, {_mb(answer['free'])} free: removing the versions beyond "
                       f"current, previous and the newest {keep}")
        device_step(transport, "prune", "--root", root, "--keep", str(keep))
        missing, partial, total, answer = _plan(transport, package)
    free = answer.get("free")
    if free is not None and total > free:
        lower = "a lower --keep" + (f" (now {keep})" if keep is not None else "")
        raise DeployError(f"the upload needs {_mb(total)} but the device has {_mb(free)} free at {root}",
                          hint=f"deploy with {lower} to remove more old versions first, or free space on the device")
    if answer.get("damaged"):
        report(target, f"sending {len(answer['damaged'])} file(s) again: damaged on the device")
    if partial:
        report(target, f"resuming {len(partial)} partial upload(s)")
    sent, last = 0, [0.0]
    for digest in missing:
        before = partial.get(digest, 0)
        size = package.objects[digest].stat().st_size

        def progress(done: int, _total: int, base: int = sent, start: int = before) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:  # a line every few seconds, not one per chunk
                last[0] = now
                report(target, f"uploading {_mb(base + done - start)}/{_mb(total)}")

        try:
            transport.upload(package.objects[digest], f"{root}/objects/{digest}.partial", progress=progress)
        except DiskFullError:  # the transport removed the partial file
            free = _plan(transport, package)[3].get("free")
            raise DeployError(f"the device's disk is full ({'?' if free is None else _mb(free)} free at {root}) "
                              f"after {_mb(sent)} of {_mb(total)} were sent",
                              hint="free space on the device, or deploy with a lower --keep") from None
        sent += size - before
    report(target, f"uploaded {_mb(sent)} ({len(package.objects) - len(missing)} of "
                   f"{len(package.objects)} files already there)")
    return sent


def _plan(transport: Transport, package: LocalPackage) -> tuple[list[str], dict[str, int], int, dict[str, Any]]:
    """What the device lacks, how far its partial uploads got, the bytes left to send, and its answer."""
    answer = device_step(transport, "have", "--root", transport.target.path, *package.objects)
    held = set(answer["have"])
    missing = [d for d in package.objects if d not in held]
    partial = {k: int(v) for k, v in answer.get("partial", {}).items()}
    total = sum(package.objects[d].stat().st_size - partial.get(d, 0) for d in missing)
    return missing, partial, total, answer


def prune_device(transport: Transport, keep: int | None, report: Report) -> dict[str, Any]:
    """The device's retention after a successful deployment: current, previous and the newest ``keep``
    versions stay (None: all stay, nothing is asked). A failure is reported, not raised: the deployment
    itself succeeded."""
    if keep is None:
        return {}
    try:
        done = device_step(transport, "prune", "--root", transport.target.path, "--keep", str(keep))
    except DeployError as exc:
        report(transport.target.display, f"could not remove old versions: {exc.message}")
        return {"error": exc.message}
    if done.get("removed") or done.get("objects_removed") or done.get("partials_removed"):
        report(transport.target.display, f"removed {len(done.get('removed', []))} old version(s), "
                                         f"{_mb(int(done.get('freed') or 0))} freed")
    return done


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


OWNER = f"{socket.gethostname()}:{os.getpid()}"  # who holds a device's deploy lock


def _dead_here(owner: object) -> bool:
    """Whether ``owner`` (``host:pid``) is a process of this machine that no longer runs."""
    host, _, pid = str(owner).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs as another user
        return False
    return False


@contextmanager
def device_lock(transport: Transport) -> Iterator[None]:
    """The device's deploy lock for this process, renewed every LOCK_RENEW_S while held and given back at
    the end. A lock whose holder is a dead process of this machine is taken over at once; one its holder
    stopped renewing (a workstation that died) after LOCK_STALE_S."""
    root = transport.target.path
    answer = device_step(transport, "lock", "--root", root, "--owner", OWNER)
    if "held_by" in answer and _dead_here(answer["held_by"]):
        answer = device_step(transport, "lock", "--root", root, "--owner", OWNER, "--take-over",
                             str(answer["held_by"]))
    if "held_by" in answer:
        raise DeployError(f"another deploy ({answer['held_by']}) holds this device (renewed "
                          f"{float(answer.get('renewed_s_ago', 0)):.0f} s ago)",
                          hint=f"wait for it to finish; a deploy that died stops renewing its lock, which is "
                               f"taken over {LOCK_STALE_S:.0f} s after its last renewal")
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_lock, args=(transport, stop), daemon=True,
                               name=f"edge-sdk-lock-{transport.target.display}")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(LOCK_RENEW_S)
        try:
            device_step(transport, "lock", "--root", root, "--owner", OWNER, "--release")
        except EdgeSDKError as exc:
            log.warning("%s: could not release the deploy lock: %s", transport.target.display, exc.message)


def _renew_lock(transport: Transport, stop: threading.Event) -> None:
    while not stop.wait(LOCK_RENEW_S):
        try:
            device_step(transport, "lock", "--root", transport.target.path, "--owner", OWNER, timeout=LOCK_STALE_S / 2)
        except EdgeSDKError as exc:  # the deploy's own steps will meet the same problem and report it
            log.warning("%s: could not renew the deploy lock: %s", transport.target.display, exc.message)


def deploy_one(transport: Transport, package: LocalPackage, options: Options, report: Report) -> DeviceResult:
    """Deploy to one device; never raises for a device problem (the result says what failed)."""
    step = "connect"
    try:
        with device_lock(transport):
            step = "upload"
            return _deploy_locked(transport, package, options, report)
    except EdgeSDKError as exc:
        report(transport.target.display, f"failed at {step}: {exc.message}")
        return DeviceResult(transport.target.display, False, step, exc.message, hint=exc.hint)


def _deploy_locked(transport: Transport, package: LocalPackage, options: Options, report: Report) -> DeviceResult:
    target, root, started = transport.target.display, transport.target.path, time.monotonic()
    step, sent, activated, details = "upload", 0, False, {}
    try:
        sent = _upload(transport, package, report, options.keep)
        step = "preflight"
        report(target, "verifying and preflighting on the device")
        args = ["--root", root, "--package", package.digest, "--backend", options.backend]
        args += ["--allow-engine-build"] if options.allow_engine_build else []
        args += ["--expect-profile", options.profile] if options.profile else []
        args += ["--signature", package.signature] if package.signature else []
        # its [trust] keys, the precision it serves current with, and the --model names are checked
        args += ["--config", options.config, *_model_args(options)] if options.config else []
        details["preflight"] = device_step(transport, "install", *args, *package.objects, timeout=options.timeout)
        step = "activate"
        details["activate"] = device_step(transport, "activate", "--root", root, "--package", package.digest)
        activated = True
        note = ""
        if options.config:
            step = "reload"
            report(target, "reloading the daemon")
            details["reload"] = _reload(transport, options, package.digest)
            if not details["reload"].get("running", True):
                note = (f"installed; the daemon is not running: it will serve {package.name} {package.version} "
                        "when it starts")
                report(target, note)
        details["prune"] = prune_device(transport, options.keep, report)  # retention: never fails the deploy
        report(target, f"ok: {package.name} {package.version} on {details['preflight']['backend']}")
        return DeviceResult(target, True, "done", note, version=package.version,
                            backend=details["preflight"]["backend"], uploaded_bytes=sent,
                            seconds=time.monotonic() - started, details=details)
    except EdgeSDKError as exc:
        result = DeviceResult(target, False, step, exc.message, uploaded_bytes=sent,
                              seconds=time.monotonic() - started, details=details, hint=exc.hint)
        report(target, f"failed at {step}: {exc.message}")
        return _roll_back(transport, options, result, report) if activated else result


def _model_args(options: Options) -> list[str]:
    return [a for m in options.models for a in ("--model", m)]


def _reload(transport: Transport, options: Options, expect: str | None) -> dict[str, Any]:
    """The daemon's reload onto ``current`` (which must then be ``expect``); ``running: false`` when it is down."""
    assert options.config is not None
    check = ["--root", transport.target.path, "--expect", expect] if expect else []
    return device_step(transport, "reload", "--config", options.config, *_model_args(options), *check,
                       timeout=options.timeout)


def _rollback_args(transport: Transport, options: Options) -> list[str]:
    return ["--root", transport.target.path, "--backend", options.backend,
            *(["--config", options.config] if options.config else [])]


def _roll_back(transport: Transport, options: Options, result: DeviceResult, report: Report) -> DeviceResult:
    """After a failed reload: back to the previous version, the refused one marked so that no later
    rollback brings it back."""
    target = transport.target.display
    report(target, "rolling back to the previous version")
    blame = [] if NOT_THIS_DEPLOYMENT in result.message else ["--refused", result.message[:300]]
    try:
        back = device_step(transport, "rollback", *_rollback_args(transport, options), *blame, timeout=options.timeout)
    except DeployError as exc:
        return replace(result, message=f"{result.message}; the rollback failed too: {exc.message}")
    details = {**result.details, "rollback": back}
    current = back.get("current") or {}
    label = f"{current.get('name')} {current.get('version')}"
    if options.config:
        try:
            details["rollback_reload"] = _reload(transport, options, current.get("package"))
        except DeployError as exc:
            report(target, f"rolled back to {label}; the daemon's reload after it failed: {exc.message}")
            return replace(result, rolled_back=True, details=details,
                           message=f"{result.message}; rolled back to {label}, but the daemon's reload after the "
                                   f"rollback failed: {exc.message}")
    report(target, f"rolled back to {label}")
    return replace(result, rolled_back=True, details=details, message=f"{result.message}; rolled back to {label}")


Job = tuple[Transport, Options]
STAGING_PREFIX = "edge-sdk-deploy-"


def _sweep_staging() -> None:
    """Remove the staged copies of deploys that were killed (SIGKILL skips their clean-up): their pid
    is in the directory name and no longer runs."""
    for stale in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = stale.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
            log.info("removed %s, left by a deploy that was killed", stale)
        except PermissionError:  # another user's live process
            pass


def deploy(package_path: str | Path, jobs: Sequence[Job], *, parallel: int = 4, canary: int = 0,
           report: Report | None = None) -> list[DeviceResult]:
    """Deploy to every job's device (with its options); canaries first, then the rest if every
    canary succeeded."""
    say: Report = report or (lambda target, message: log.info("%s: %s", target, message))
    if parallel < 1 or canary < 0:
        raise DeployError(f"parallel is {parallel} and canary {canary}; expected parallel >= 1 and canary >= 0")
    _sweep_staging()
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as staging:
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
    """Every device back to its previous version, verified there first; where the daemon then refuses it,
    switched forward again (the daemon kept serving the version it had)."""
    def one(job: Job) -> DeviceResult:
        t, options = job
        started = time.monotonic()
        step = "connect"
        try:
            with device_lock(t):
                step = "rollback"
                return locked(t, options, started)
        except DeployError as exc:
            return DeviceResult(t.target.display, False, step, exc.message, seconds=time.monotonic() - started,
                                hint=exc.hint)

    def locked(t: Transport, options: Options, started: float) -> DeviceResult:
        step = "rollback"
        try:
            back = device_step(t, "rollback", *_rollback_args(t, options), timeout=options.timeout)
            current = back.get("current") or {}
            label = f"{current.get('name')} {current.get('version')} ({str(current.get('package'))[:12]})"
            details: dict[str, Any] = {"rollback": back}
            message = f"current: {label}"
            if options.config:
                step = "reload"
                try:
                    details["reload"] = _reload(t, options, current.get("package"))
                except DeployError as exc:
                    forward = device_step(t, "rollback", *_rollback_args(t, options), "--refused", exc.message[:300],
                                          timeout=options.timeout)
                    return DeviceResult(t.target.display, False, "reload",
                                        f"the daemon refused {label}: {exc.message}; switched back to "
                                        f"{(forward.get('current') or {}).get('version')}",
                                        seconds=time.monotonic() - started, details={**details, "forward": forward})
                if not details["reload"].get("running", True):
                    message += "; the daemon is not running: it will serve this version when it starts"
            return DeviceResult(t.target.display, True, "rollback", message, version=str(current.get("version") or ""),
                                seconds=time.monotonic() - started, details=details)
        except DeployError as exc:
            return DeviceResult(t.target.display, False, step, exc.message, seconds=time.monotonic() - started,
                                hint=exc.hint)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))


def status_all(jobs: Sequence[Job], *, parallel: int = 4) -> list[dict[str, Any]]:
    def one(job: Job) -> dict[str, Any]:
        t, options = job
        args = ["--root", t.target.path] + (["--config", options.config] if options.config else [])
        try:
            return {"target": t.target.display, "ok": True, **device_step(t, "status", *args)}
        except DeployError as exc:
            return {"target": t.target.display, "ok": False, "error": exc.message, "hint": exc.hint}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))

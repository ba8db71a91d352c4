"""The daemon's loaded models, swappable while serving.

A request takes a *lease* on a model's current pipeline; a hot swap loads and verifies the
new package first (hashes, its signature when the daemon trusts keys, then the golden-vector
parity check on the selected backend), then replaces the pipeline atomically. The old pipeline
is closed only after its last lease is returned, so requests in flight finish on the model they
started with. A package that fails any check leaves the old model serving and the failure is
recorded.

A reload takes a package only from the directories models are served from (each configured
package's own directory, and ``server.model_dirs``). A reload to an explicit path is remembered in
the storage directory (``active-models.json``) and served again after a restart, as long as the
configuration still names the same package for that model; a remembered package that no longer
loads is logged and the configured one serves.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from edge_sdk.daemon.config import ModelConfig
from edge_sdk.errors import DaemonError, EdgeSDKError
from runtime.files import write_atomic
from runtime.package import Package
from runtime.pipeline import Pipeline
from runtime.signing import PublicKey

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


class UnknownModelError(DaemonError):
    """A request named a model the daemon does not serve."""


class PackageNotAllowed(DaemonError):
    """A reload named a package outside the directories models are served from (HTTP 403)."""


ACTIVE_FILE = "active-models.json"


@dataclass
class _Slot:
    pipeline: Pipeline
    package: Path
    loaded_at: float
    leases: int = 0
    swaps: int = 0
    last_swap_error: str = ""
    idle: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()))


def _load(config: ModelConfig, package: Path, trusted_keys: Sequence[PublicKey] = ()) -> Pipeline:
    verified = Package.open(package, trusted_keys=trusted_keys)  # with keys: unsigned or untrusted is refused
    pipeline = Pipeline.from_package(verified, config.backend, threads=config.threads, precision=config.precision)
    if pipeline.manifest.name != config.name:
        log.info("model %s serves package %s (manifest name %r)", config.name, package, pipeline.manifest.name)
    return pipeline


class ModelRegistry:
    """Models by configured name, each behind a lease so it can be swapped under load."""

    def __init__(self, configs: Mapping[str, ModelConfig], trusted_keys: Sequence[PublicKey] = (), *,
                 model_dirs: Sequence[Path] = (), state_dir: Path | None = None) -> None:
        self.configs = dict(configs)
        self.trusted_keys = tuple(trusted_keys)  # every load and swap must be signed by one of them
        dirs = [c.package.absolute().parent for c in self.configs.values()] + [Path(d) for d in model_dirs]
        self.model_dirs = tuple(dict.fromkeys(Path(os.path.realpath(d)) for d in dirs))
        self._active = state_dir / ACTIVE_FILE if state_dir is not None else None
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()  # one swap at a time

    def allowed(self, package: Path) -> Path:
        """``package`` if it lies in a directory models are served from, else PackageNotAllowed."""
        if not package.is_absolute():
            raise PackageNotAllowed(f"package {str(package)!r} is a relative path; expected an absolute path on "
                                    "the device")
        real = Path(os.path.realpath(package))
        if not any(real == d or real.is_relative_to(d) for d in self.model_dirs):
            raise PackageNotAllowed(f"package {package} is outside the directories models are served from "
                                    f"({', '.join(map(str, self.model_dirs))})",
                                    hint="put it beside the configured package, or add its directory to "
                                         "server.model_dirs")
        return package

    def _remembered(self) -> dict[str, Any]:
        if self._active is None or not self._active.exists():
            return {}
        try:
            data = json.loads(self._active.read_text(encoding="utf-8"))
            return {k: v for k, v in data.get("models", {}).items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); serving the configured packages", self._active, exc)
            return {}

    def _remember(self, name: str, package: Path | None, version: str) -> None:
        """Keep the explicit reload (or forget it: ``None``) for the next start."""
        if self._active is None:
            return
        models = self._remembered()
        if package is None:
            models.pop(name, None)
        else:
            models[name] = {"package": str(package), "version": version,
                            "configured": str(self.configs[name].package)}
        try:
            write_atomic(self._active, json.dumps({"models": models}, indent=1).encode())
        except OSError as exc:
            log.warning("model %s: could not remember the reload in %s (%s): a restart serves the configured "
                        "package", name, self._active, exc)

    def load_all(self) -> None:
        """Load every configured model (or the package a reload made it serve); a model that cannot load
        stops the start with its reason."""
        remembered = self._remembered()
        for name, config in self.configs.items():
            pipeline, path = None, config.package
            entry = remembered.get(name)
            if entry and entry.get("configured") == str(config.package) and entry.get("package"):
                try:
                    path = self.allowed(Path(entry["package"]))
                    pipeline = _load(config, path, self.trusted_keys)
                    log.info("model %s: serving %s, the package it was reloaded to (%s)", name, path, self._active)
                except EdgeSDKError as exc:
                    log.warning("model %s: the package it was reloaded to (%s) no longer loads (%s); serving the "
                                "configured %s", name, entry["package"], exc.message, config.package)
                    pipeline, path = None, config.package
            try:
                pipeline = pipeline or _load(config, config.package, self.trusted_keys)
            except EdgeSDKError as exc:
                self.close()
                raise DaemonError(f"model {name!r} ({config.package}) cannot be served: {exc.message}",
                                  hint=exc.hint) from None
            self._slots[name] = _Slot(pipeline, path, time.time())
            log.info("model %s: %s on %s (%s)", name, path, pipeline.backend, pipeline.selection.precision)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownModelError(f"model {name!r} is not served here; served: {sorted(self._slots)}")
        return slot

    @contextmanager
    def lease(self, name: str) -> Iterator[Pipeline]:
        """The model's current pipeline, guaranteed open until the block ends."""
        with self._lock:
            slot = self._slot(name)
            slot.leases += 1
        try:
            yield slot.pipeline
        finally:
            with slot.idle:
                slot.leases -= 1
                slot.idle.notify_all()

    def current(self, name: str) -> Pipeline:
        """The current pipeline without a lease (for metadata; never run inference on it)."""
        return self._slot(name).pipeline

    def info(self, name: str) -> dict[str, Any]:
        slot = self._slot(name)
        p = slot.pipeline
        m = p.manifest
        return {"name": name, "package": str(slot.package), "model": m.name, "version": m.version, "task": m.task,
                "backend": p.backend, "precision": p.selection.precision_label, "labels": list(m.postprocess.labels),
                "skipped_backends": [{"backend": s.backend, "reason": s.reason} for s in p.skipped],
                "loaded_at": slot.loaded_at, "swaps": slot.swaps, "last_swap_error": slot.last_swap_error,
                "signer": p.package.signer if p.package is not None else None}

    def swap(self, name: str, package: str | os.PathLike[str] | None = None,
             check: Callable[[Pipeline], None] | None = None) -> dict[str, Any]:
        """Load ``package`` (default: the configured path, re-read) and swap it in if it passes every check.

        ``check(pipeline)`` may refuse the new pipeline (raise an EdgeSDKError) before it is swapped in.
        """
        with self._swap_lock:
            old = self._slot(name)
            try:
                path = self.allowed(Path(package)) if package is not None else self.configs[name].package
            except PackageNotAllowed as exc:
                log.warning("hot swap of %s refused: %s", name, exc.message)
                raise
            try:
                new = _load(self.configs[name], path, self.trusted_keys)
                if check is not None:
                    try:
                        check(new)
                    except EdgeSDKError:
                        new.close()
                        raise
            except EdgeSDKError as exc:
                old.last_swap_error = f"{path}: {exc.message}"
                log.warning("hot swap of %s to %s refused; the previous model keeps serving: %s",
                            name, path, exc.message)
                raise DaemonError(f"model {name!r} was not swapped: {exc.message}; the previous package keeps serving",
                                  hint=exc.hint) from None
            slot = _Slot(new, path, time.time(), swaps=old.swaps + 1)
            with self._lock:
                self._slots[name] = slot
            log.info("model %s swapped to %s (%s on %s)", name, path, new.manifest.version, new.backend)
            self._remember(name, path if package is not None else None, new.manifest.version)
            threading.Thread(target=self._retire, args=(name, old), daemon=True, name=f"retire-{name}").start()
            return self.info(name)

    @staticmethod
    def _retire(name: str, slot: _Slot) -> None:
        with slot.idle:
            if not slot.idle.wait_for(lambda: slot.leases == 0, timeout=DRAIN_TIMEOUT_S):
                log.warning("model %s: %d requests still use the old package after %.0f s; closing it",
                            name, slot.leases, DRAIN_TIMEOUT_S)
        slot.pipeline.close()

    def close(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            slot.pipeline.close()

"""The daemon's loaded models, swappable while serving.

A request takes a *lease* on a model's current pipeline; a hot swap loads and verifies the
new package first (hashes, its signature when the daemon trusts keys, then the golden-vector
parity check on the selected backend), then replaces the pipeline atomically. The old pipeline
is closed only after its last lease is returned, so requests in flight finish on the model they
started with. A package that fails any check leaves the old model serving and the failure is
recorded.
"""

from __future__ import annotations

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
from runtime.package import Package
from runtime.pipeline import Pipeline
from runtime.signing import PublicKey

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


class UnknownModelError(DaemonError):
    """A request named a model the daemon does not serve."""


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

    def __init__(self, configs: Mapping[str, ModelConfig], trusted_keys: Sequence[PublicKey] = ()) -> None:
        self.configs = dict(configs)
        self.trusted_keys = tuple(trusted_keys)  # every load and swap must be signed by one of them
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()  # one swap at a time

    def load_all(self) -> None:
        """Load every configured model; a model that cannot load stops the start with its reason."""
        for name, config in self.configs.items():
            try:
                pipeline = _load(config, config.package, self.trusted_keys)
            except EdgeSDKError as exc:
                self.close()
                raise DaemonError(f"model {name!r} ({config.package}) cannot be served: {exc.message}",
                                  hint=exc.hint) from None
            self._slots[name] = _Slot(pipeline, config.package, time.time())
            log.info("model %s: %s on %s (%s)", name, config.package, pipeline.backend, pipeline.selection.precision)

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
            path = Path(package) if package is not None else self.configs[name].package
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

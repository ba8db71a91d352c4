"""The edge-sdk error tree.

Every error the SDK raises on purpose for a user's mistake or a machine's limit
derives from :class:`EdgeSDKError`. Each carries a message that names the value,
what was expected, and an optional ``hint`` saying how to fix it::

    EdgeSDKError
    ├── DeviceError                  the machine could not be read or is unsuitable
    ├── PackageError                 a *.edgepkg could not be written, read or trusted
    │   ├── PackageIntegrityError    hash mismatch, truncated archive, path traversal
    │   └── PackageVersionError      a manifest schema version this SDK does not read
    ├── ConversionError              the workstation side failed
    │   ├── PruningError
    │   ├── CalibrationError
    │   └── EngineBuildError
    ├── BackendUnavailableError      a backend cannot run here (missing extra, no GPU)
    ├── InferenceError               running a model failed
    │   └── InputMismatchError       a feed's name, dtype or shape is not what the model declares
    ├── PipelineError                pre/post-processing and streaming
    │   ├── SourceError
    │   └── SinkError
    └── DaemonError                  the on-device daemon or its client

:class:`InternalError` signals a bug in edge-sdk itself and is deliberately *not*
an ``EdgeSDKError``: callers that handle user errors should not swallow our bugs.

This module imports nothing from the rest of the project so that every layer
(``devices``, ``runtime``, ``converters``) may raise these errors.
"""

from __future__ import annotations

__all__ = [
    "EdgeSDKError",
    "DeviceError",
    "PackageError",
    "PackageIntegrityError",
    "PackageVersionError",
    "ConversionError",
    "PruningError",
    "CalibrationError",
    "EngineBuildError",
    "BackendUnavailableError",
    "InferenceError",
    "InputMismatchError",
    "PipelineError",
    "SourceError",
    "SinkError",
    "DaemonError",
    "InternalError",
]


class EdgeSDKError(Exception):
    """Root of every deliberate edge-sdk error."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class DeviceError(EdgeSDKError):
    """The machine could not be inspected, or does not meet a requirement."""


class PackageError(EdgeSDKError):
    """A model package could not be written, read or trusted."""


class PackageIntegrityError(PackageError):
    """A package's content does not match its manifest (hash, size, unsafe path)."""


class PackageVersionError(PackageError):
    """The manifest's schema version is not one this SDK can read."""


class ConversionError(EdgeSDKError):
    """Converting a model on the workstation failed."""


class PruningError(ConversionError):
    """Pruning could not be applied as asked."""


class CalibrationError(ConversionError):
    """Calibration data or ranges are unusable."""


class EngineBuildError(ConversionError):
    """A TensorRT engine could not be built."""


class BackendUnavailableError(EdgeSDKError):
    """A backend cannot run on this machine (missing optional dependency, no GPU, ...)."""


class InferenceError(EdgeSDKError):
    """Running a model failed."""


class InputMismatchError(InferenceError):
    """A feed does not match the model's declared inputs (name, dtype, rank or shape)."""


class PipelineError(EdgeSDKError):
    """Pre/post-processing or streaming failed."""


class SourceError(PipelineError):
    """A frame or text source failed."""


class SinkError(PipelineError):
    """A prediction sink failed."""


class DaemonError(EdgeSDKError):
    """The on-device daemon or its client failed."""


class InternalError(Exception):
    """A bug in edge-sdk. Not an EdgeSDKError on purpose; please report it."""

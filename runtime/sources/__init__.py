"""Frame sources for production-line pipelines, and :func:`open_source` to pick one from a spec.

- :class:`CaptureSource`: a camera (index or /dev/video*), an RTSP/HTTP(S) stream, a GStreamer
  pipeline (Jetson CSI cameras: ``nvarguscamerasrc ! ... ! appsink``) or a video file, through
  ``cv2.VideoCapture``; live ones reconnect with exponential backoff.
- :class:`FolderSource`: the images of a folder, optionally watched for new files.
- :class:`PolicySource`: around any source, "all" frames or only the "latest", at most ``max_fps``.

Errors are :class:`edge_sdk.errors.SourceError`. Credentials in a URL never reach an id, a log
line or an error message.
"""

from __future__ import annotations

import inspect
from typing import Any

from edge_sdk.errors import SourceError
from runtime.frame import Frame, Source, SourceState
from runtime.sources._capture import CaptureSource
from runtime.sources._folder import IMAGE_EXTENSIONS, FolderSource
from runtime.sources._policy import POLICIES, PacedSource, PolicySource, RateGate, check_policy
from runtime.sources._spec import URL_SCHEMES, SourceSpec, check_positive, classify

__all__ = [
    "CaptureSource",
    "FolderSource",
    "PacedSource",
    "PolicySource",
    "RateGate",
    "open_source",
    "POLICIES",
    "IMAGE_EXTENSIONS",
    "URL_SCHEMES",
    "SourceSpec",
    "Frame",
    "Source",
    "SourceState",
]


def open_source(
    spec: SourceSpec,
    *,
    source_id: str | None = None,
    policy: str = "all",
    max_fps: float | None = None,
    watch: bool = False,
    realtime: bool = False,
    **kwargs: Any,
) -> Source:
    """The source ``spec`` names, wrapped in a :class:`PolicySource` when ``policy`` is not "all"
    or ``max_fps`` is set.

    ``spec``: a camera index (``0``, ``"0"``) or device (``/dev/video0``); an ``rtsp://``,
    ``rtsps://``, ``http://`` or ``https://`` URL; a GStreamer pipeline (contains ``" ! "``); an
    existing folder (``watch`` applies to folders only); or an existing video file (``realtime``
    replays it at its recorded frame rate, as the camera delivered it). ``kwargs`` go
    to :class:`CaptureSource` (``live``, ``backoff_initial``, ``backoff_max``, ``max_reconnects``,
    ``open_timeout``, ``stall_timeout``, ``buffer``) or :class:`FolderSource` (``poll_interval``,
    ``settle_timeout``).
    """
    check_policy(policy)
    check_positive("max_fps", max_fps, allow_none=True)
    found = classify(spec, missing_ok=kwargs.get("live") is True)
    kind = FolderSource if found.kind == "folder" else CaptureSource
    if realtime and found.kind != "file":
        raise SourceError(f"realtime=True replays video files, and {found.display!r} is a {found.kind}",
                          hint="drop realtime=True: live sources already deliver at their own rate")
    if watch and kind is not FolderSource:
        raise SourceError(f"watch=True applies to image folders, and {found.display!r} is a {found.kind}",
                          hint="drop watch=True, or pass a folder")
    allowed = [p for p in inspect.signature(kind).parameters if p not in ("spec", "folder", "source_id", "watch")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise SourceError(f"option(s) {', '.join(unknown)} do not apply to {found.display!r} ({kind.__name__}); "
                          f"expected any of {', '.join(allowed)}", hint="remove them")
    source: Source
    if kind is FolderSource:
        source = FolderSource(str(found.target), source_id=source_id, watch=watch, **kwargs)
    else:
        source = CaptureSource(found.target, source_id=source_id, **kwargs)
    if realtime:
        source = PacedSource(source, _recorded_fps(str(found.target)))
    if policy != "all" or max_fps is not None:
        source = PolicySource(source, policy=policy, max_fps=max_fps)
    return source


def _recorded_fps(path: str) -> float:
    """The frame rate a video file was recorded at (30 when the container does not say)."""
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        capture.release()
    return fps if 0.0 < fps < 1000.0 else 30.0

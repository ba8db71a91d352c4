"""What a source spec names (camera, URL, GStreamer pipeline, folder, file), and a readable,
credential-free id for it.

Every id, log line and error message about a source goes through :func:`display`/:func:`default_id`,
so a password in ``rtsp://user:pass@host`` never leaves this module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

from edge_sdk.errors import SourceError

#: URL schemes opened as live network streams.
URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
#: What separates GStreamer elements: a spec containing it is a pipeline.
GST_SEPARATOR = " ! "
#: The spec kinds :func:`classify` returns.
KINDS = ("camera", "url", "gstreamer", "folder", "file")

SourceSpec = Union[int, str, os.PathLike[str]]

ACCEPTED_FORMS = (
    "a camera index (0 or '0') or device (/dev/video0), a URL (rtsp://, rtsps://, http://, https://), "
    "a GStreamer pipeline (elements joined by ' ! ', ending in appsink), an existing image folder "
    "or an existing video file"
)

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


@dataclass(frozen=True)
class Spec:
    """A classified source spec: its kind, what to hand to OpenCV, and a safe name to show."""

    kind: str  # one of KINDS
    target: int | str  # camera index, URL, pipeline or path, as given (credentials included)
    display: str  # for logs and errors: credentials and query strings removed


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` of a URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def display(spec: object) -> str:
    """A spec as it may appear in logs and errors: URLs without credentials or query string."""
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if "://" in text and GST_SEPARATOR not in text:
        parts = urlsplit(redact(text))
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    if GST_SEPARATOR in text:
        return f"GStreamer pipeline starting with {_gst_head(text)!r}"
    return text


def classify(spec: object, *, missing_ok: bool = False) -> Spec:
    """Decide what ``spec`` names; raise :class:`SourceError` if it is none of the accepted forms.

    With ``missing_ok`` a path that does not exist (yet) is a "file".
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, str, os.PathLike)):
        raise SourceError(f"source {spec!r} has type {type(spec).__name__}; expected {ACCEPTED_FORMS}",
                          hint="pass an int, a str or a pathlib.Path")
    if isinstance(spec, int):
        return _camera(spec)
    text = os.fspath(spec)
    if text.isdigit():
        return _camera(int(text))
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in URL_SCHEMES:
        return Spec("url", text, display(text))
    if GST_SEPARATOR in text:
        return Spec("gstreamer", text, display(text))
    path = Path(text)
    if path.is_dir():
        return Spec("folder", text, text)
    if path.is_char_device():
        return Spec("camera", text, text)
    if path.is_file() or missing_ok:
        return Spec("file", text, display(text))
    raise SourceError(f"source {display(text)!r} does not exist or is not a form a source accepts; "
                      f"expected {ACCEPTED_FORMS}",
                      hint="check the path (relative paths are taken from the current directory) or the URL scheme")


def default_id(spec: Spec) -> str:
    """A short readable id: ``cam0``, a file or folder name, a URL's host and path, a pipeline's
    first element."""
    if spec.kind == "camera":
        return f"cam{spec.target}" if isinstance(spec.target, int) else Path(str(spec.target)).name
    if spec.kind == "url":
        parts = urlsplit(redact(str(spec.target)))
        return f"{parts.netloc}{parts.path.rstrip('/')}" or parts.scheme
    if spec.kind == "gstreamer":
        return f"gst-{_gst_head(str(spec.target)).split()[0]}"
    return Path(str(spec.target)).name or str(spec.target)


def _camera(index: int) -> Spec:
    if index < 0:
        raise SourceError(f"camera index {index} is negative; expected 0, 1, 2...",
                          hint="use 0 for the first camera (/dev/video0)")
    return Spec("camera", index, f"camera {index}")


def _gst_head(pipeline: str) -> str:
    """The first element of a pipeline without its properties (they may hold credentials)."""
    head = pipeline.split(GST_SEPARATOR, 1)[0].strip()
    return head.split()[0] if head else "?"


def check_positive(name: str, value: object, *, allow_none: bool = False, integer: bool = False) -> None:
    """Raise :class:`SourceError` unless ``value`` is a positive number (or None when allowed)."""
    if value is None and allow_none:
        return
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:  # type: ignore[operator]
        expected = "a positive integer" if integer else "a positive number"
        raise SourceError(f"{name}={value!r} is not valid; expected {expected}" + (" or None" if allow_none else ""),
                          hint=f"pass e.g. {name}={1 if integer else 0.5}" + (f" or {name}=None" if allow_none else ""))

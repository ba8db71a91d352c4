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
from urllib.parse import quote, unquote, urlsplit

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

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# what follows the userinfo's "@": a host name, IPv4 or [IPv6], an optional port, then the end of the
# authority (a path, a query, a fragment, a quote or whitespace in free text, or the end)
_HOST_AFTER_AT = re.compile(r"(?:[^\s/?#@:\[\]'\"]+|\[[^\]\s/@]*\])(?::\d*)?(?=[/?#\s'\"]|$)")
#: query parameters whose values never appear in an id or a log line
SECRET_PARAMS = re.compile(r"pass|pwd|pw|secret|token|auth|key|sig|credential|^p$|^s$", re.IGNORECASE)


@dataclass(frozen=True)
class Spec:
    """A classified source spec: its kind, what to hand to OpenCV, and a safe name to show."""

    kind: str  # one of KINDS
    target: int | str  # camera index, URL, pipeline or path, as given (credentials included)
    display: str  # for logs and errors: credentials and query strings removed


def split_userinfo(url: str, *, within_line: bool = False) -> tuple[str, str | None, str]:
    """``scheme://``, the userinfo (or None) and what follows its ``@``, read as a camera URL is written:
    the password may hold a raw ``@``, ``/``, ``:`` or space, so the userinfo ends at the *last* ``@``
    that a host follows (``rtsp://admin:p@ss/w rd@10.0.0.7:554/live`` -> ``admin:p@ss/w rd``). An ``@``
    in a path (no ``:`` before it, a ``/`` before it) is not taken for one. ``within_line``: for free
    text, look no further than the end of the line."""
    found = _SCHEME.match(url)
    if found is None:
        return "", None, url
    scheme, rest = found.group(), url[found.end():]
    line_end = len(rest.split("\n", 1)[0]) if within_line else len(rest)
    for at in sorted((i for i in range(line_end) if rest[i] == "@"), reverse=True):
        before = rest[:at]
        if ("/" in before and ":" not in before) or not _HOST_AFTER_AT.match(rest, at + 1):
            continue
        return scheme, before, rest[at + 1:]
    return scheme, None, rest


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed (see :func:`split_userinfo`)."""
    out, pos = [], 0
    for found in _SCHEME.finditer(text):
        if found.start() < pos:
            continue  # inside a userinfo already removed
        scheme, userinfo, rest = split_userinfo(text[found.start():], within_line=True)
        if userinfo is None:
            continue
        out.append(text[pos:found.start()] + scheme)
        pos = len(text) - len(rest)
    return "".join(out) + text[pos:]


def without_userinfo(url: str) -> str:
    """A URL (one spec, all of it, control characters included) without its userinfo."""
    scheme, userinfo, rest = split_userinfo(url)
    return url if userinfo is None else scheme + rest


def opencv_url(url: str) -> str:
    """``url`` as FFmpeg must be given it: user and password percent-encoded (FFmpeg decodes them), so a
    raw ``@``, ``/`` or space in a password neither breaks the URL nor sends the password as a host name."""
    scheme, userinfo, rest = split_userinfo(url)
    if userinfo is None:
        return url
    user, colon, password = userinfo.partition(":")
    encode = lambda part: quote(unquote(part), safe="")  # noqa: E731  (already encoded: unchanged)
    return f"{scheme}{encode(user)}{colon}{encode(password) if colon else ''}@{rest}"


def _safe_query(query: str) -> str:
    """A query string with the values of secret-looking parameters replaced by ``***``."""
    pairs = [p.partition("=") for p in query.split("&") if p]
    return "&".join(k + (f"={'***' if SECRET_PARAMS.search(k) else v}" if eq else "") for k, eq, v in pairs)


def display(spec: object) -> str:
    """A spec as it may appear in logs and errors: URLs without credentials or query string."""
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if "://" in text and GST_SEPARATOR not in text:
        parts = urlsplit(without_userinfo(text))
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
    if text.isascii() and text.isdigit():
        return _camera(int(text))
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in URL_SCHEMES:
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise SourceError(f"source URL {display(text)!r} contains a control character (a newline or tab "
                              "pasted into the configuration?)", hint="remove it; percent-encode it (%0A) if the "
                                                                     "password really holds one")
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
        parts = urlsplit(without_userinfo(str(spec.target)))
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


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def split_name(text: str) -> tuple[str | None, str]:
    """``"NAME=SPEC"`` -> (NAME, SPEC); anything else -> (None, text). NAME is letters, digits, ``_ . -``
    (so ``rtsp://nvr/?channel=2`` is no name), and an existing path is never split."""
    name, eq, spec = text.partition("=")
    if not eq or not spec or not _NAME.fullmatch(name) or Path(text).exists():
        return None, text
    return name, spec


def unique_ids(specs: list[Spec]) -> list[str]:
    """A default id per spec (:func:`default_id`), made unique where two would clash: a URL's query
    is added (secret-looking values hidden), a path's parent folders, and as a last resort ``-2``, ``-3``."""
    ids = [default_id(s) for s in specs]
    for make in (_with_query, _with_parents):
        clashing = {i for i in ids if ids.count(i) > 1}
        ids = [make(spec, i) if i in clashing else i for spec, i in zip(specs, ids)]
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return out


def _with_query(spec: Spec, current: str) -> str:
    if spec.kind != "url":
        return current
    query = urlsplit(without_userinfo(str(spec.target))).query
    return f"{current}?{_safe_query(query)}" if query else current


def _with_parents(spec: Spec, current: str) -> str:
    if spec.kind not in ("folder", "file"):
        return current
    parts = Path(os.path.abspath(str(spec.target))).parts
    return "/".join(parts[-3:]).lstrip("/") if len(parts) > 1 else current

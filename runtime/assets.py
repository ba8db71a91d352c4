"""Asset ids: what a diagnosis, an event and an MQTT topic are keyed by.

An asset id is 1 to ``MAX_LENGTH`` characters: letters and digits of any script, ``_``, space and
``. : @ ( ) / # + -``; no control characters, no Unicode non-characters, no leading or trailing
space. Every place an id enters (the daemon's HTTP API, its config, streams, the SDK's
:class:`~runtime.diagnosis.Diagnoser`) checks it with :func:`check_asset_id`, so an id is always
printable in a log line and a valid MQTT topic level once ``/ # +`` are percent-encoded.
"""

from __future__ import annotations

import re

from edge_sdk.errors import PipelineError

__all__ = ["ASSET_ID_RULE", "MAX_LENGTH", "check_asset_id"]

MAX_LENGTH = 64
ASSET_ID_RULE = (f"1-{MAX_LENGTH} letters, digits, spaces or . _ : @ ( ) / # + -, "
                 "not starting or ending with a space")
_ASSET_ID = re.compile(r"[\w .:@()/#+-]+")


def check_asset_id(value: object, where: str = "asset id") -> str:
    """``value`` if it is a valid asset id (module docstring); else a :class:`PipelineError` naming it."""
    if not isinstance(value, str):
        raise PipelineError(f"{where} is a {type(value).__name__}; expected a string of {ASSET_ID_RULE}")
    if not 0 < len(value) <= MAX_LENGTH or value != value.strip() or not _ASSET_ID.fullmatch(value):
        shown = ascii(value[:80]) + ("..." if len(value) > 80 else "")
        raise PipelineError(f"{where} {shown} ({len(value)} characters) is not a valid asset id; expected "
                            f"{ASSET_ID_RULE}", hint='e.g. "press-4" or "pump P-101"')
    return value

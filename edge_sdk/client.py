"""``edge_sdk.Client``: call a device's daemon from Python (standard library only).

    client = edge_sdk.Client("http://jetson-07:8080", token=open("token").read().strip())
    d = client.diagnose_text("pump-7", "grinding noise at the drive end bearing")
    print(d["diagnosis"]["fault"], [m["incident"]["fix"] for m in d["diagnosis"]["similar"]])

Errors from the daemon raise :class:`~edge_sdk.errors.DaemonError` with the daemon's own
message and hint, plus the HTTP status in ``.status``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from edge_sdk.errors import DaemonError

_IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"BM": "image/bmp"}


class DaemonRequestError(DaemonError):
    """The daemon answered with an error status."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0) -> None:
        super().__init__(message, hint)
        self.status = status


class DaemonUnreachable(DaemonError):
    """Nothing listens at the daemon's address (connection refused): it is not running."""


def _image_bytes(image: Any) -> tuple[bytes, str]:
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        import cv2
        import numpy as np

        if not isinstance(image, np.ndarray):
            raise DaemonError(f"image is a {type(image).__name__}; expected a path, encoded bytes or a BGR array")
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise DaemonError("the image array could not be encoded as PNG")
        data = encoded.tobytes()
    kind = next((t for magic, t in _IMAGE_TYPES.items() if data.startswith(magic)), "application/octet-stream")
    return data, kind


class Client:
    """The daemon's convenience API: models, predictions, diagnoses, events, sources."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise DaemonError(f"daemon url is {url!r}; expected http://host:port or https://host:port")
        self.url, self._token, self.timeout = url.rstrip("/"), token, timeout

    def _request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
                 query: dict[str, Any] | None = None, raw: bool = False, headers: dict[str, str] | None = None) -> Any:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                detail = json.loads(payload)
                message, hint = detail.get("error", payload.decode(errors="replace")), detail.get("hint")
            except (json.JSONDecodeError, AttributeError):
                message, hint = payload.decode(errors="replace") or exc.reason, None
            raise DaemonRequestError(f"{method} {path} failed with {exc.code}: {message}", hint, exc.code) from None
        except urllib.error.URLError as exc:
            kind = DaemonUnreachable if isinstance(exc.reason, ConnectionRefusedError) else DaemonError
            raise kind(f"cannot reach the daemon at {self.url}: {exc.reason}",
                       hint="is `edge-sdk serve` running, and is the address right?") from None
        return data if raw else json.loads(data)

    def _json(self, method: str, path: str, data: Any, **kwargs: Any) -> Any:
        return self._request(method, path, body=json.dumps(data).encode(), content_type="application/json", **kwargs)

    def live(self) -> bool:
        return bool(self._request("GET", "/v2/health/live").get("live"))

    def ready(self) -> bool:
        try:
            return bool(self._request("GET", "/v2/health/ready").get("ready"))
        except DaemonRequestError as exc:
            if exc.status == 503:
                return False
            raise

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models")["models"])

    def predict(self, model: str, item: Any) -> dict[str, Any]:
        """One prediction: ``item`` is an image (path, bytes, BGR array) for image models, else a text."""
        return self.predict_batch(model, [item])[0] if isinstance(item, str) else self._predict_image(model, item)

    def _predict_image(self, model: str, image: Any) -> dict[str, Any]:
        data, kind = _image_bytes(image)
        path = f"/v1/models/{urllib.parse.quote(model)}/predict"
        return dict(self._request("POST", path, body=data, content_type=kind)["predictions"][0])

    def predict_batch(self, model: str, texts: list[str]) -> list[dict[str, Any]]:
        path = f"/v1/models/{urllib.parse.quote(model)}/predict"
        return list(self._json("POST", path, {"texts": texts})["predictions"])

    def diagnose_text(self, asset: str, text: str, model: str | None = None, *,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        """``idempotency_key`` (e.g. a UUID kept with the report): a retry with the same key gets the first
        answer back instead of a second event, even across a daemon restart."""
        return dict(self._json("POST", "/v1/diagnose", {"asset": asset, "text": text}, query={"model": model},
                               headers=_idempotency(idempotency_key)))

    def diagnose_image(self, asset: str, image: Any, model: str | None = None, *,
                       idempotency_key: str | None = None) -> dict[str, Any]:
        data, kind = _image_bytes(image)
        return dict(self._request("POST", "/v1/diagnose", body=data, content_type=kind,
                                  query={"asset": asset, "model": model}, headers=_idempotency(idempotency_key)))

    def events(self, *, asset: str | None = None, fault: str | None = None, since: float | None = None,
               before: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = {"asset": asset, "fault": fault, "since": since, "before": before, "limit": limit}
        return list(self._request("GET", "/v1/events", query=query)["events"])

    def event(self, event_id: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/events/{int(event_id)}"))

    def snapshot(self, event_id: int) -> bytes:
        return bytes(self._request("GET", f"/v1/events/{int(event_id)}/snapshot", raw=True))

    def sources(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/sources")["sources"])

    def reload(self, model: str, package: str | None = None) -> dict[str, Any]:
        """Hot swap ``model`` to ``package`` (a path on the device; default: its configured path)."""
        return dict(self._json("POST", f"/v1/models/{urllib.parse.quote(model)}/reload",
                               {"package": package} if package else {}))

    def metrics(self) -> str:
        return bytes(self._request("GET", "/metrics", raw=True)).decode()


def _idempotency(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Idempotency-Key": key}

"""The daemon's HTTP API (Starlette, served by uvicorn).

* KServe v2 / Open Inference Protocol: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.
* Convenience (``/v1``): predict with a model (image bytes or JSON texts), diagnose an uploaded
  image or a text about an asset, list and fetch events and their snapshots, sources' state,
  models, hot swap.
* ``/metrics`` (Prometheus) and ``/openapi.json``.
* ``/`` and ``/console/...``: the web console (edge_sdk.daemon.console.routes), behind a login with the token.

Every endpoint except the two health checks requires ``Authorization: Bearer <token>``, or the console's
session cookie (a POST with the cookie also needs the session's CSRF token and a same-origin ``Origin``).
Request bodies are limited to ``server.max_body_mb`` and must arrive within
``server.body_timeout_s`` (408); errors are JSON ``{"error", "hint"}`` with a 4xx status that says
whose fault it was. Work is bounded: at most ``server.max_in_flight`` requests per model are read,
queued or running, beyond that 503 with ``Retry-After`` (edge_sdk.daemon.limits). After SIGTERM new
requests get 503, and those still running ``server.shutdown_grace_s`` later are answered 503 too
(their computation is abandoned), so a client always learns to retry elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import math
import time
import zlib
from typing import Any, Awaitable, Callable, TypeVar

import anyio
import anyio.to_thread

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from edge_sdk import __version__
from edge_sdk.daemon.console.routes import Console
from edge_sdk.daemon.core import Daemon
from edge_sdk.daemon.kserve import (BadRequest, decode_request, encode_response, model_metadata, parse_json,
                                    split_body)
from edge_sdk.daemon.limits import Admission, Busy
from edge_sdk.daemon.models import PackageNotAllowed, UnknownModelError
from edge_sdk.daemon.uploads import decode_upload
from edge_sdk.errors import DaemonError, EdgeSDKError, InputMismatchError, PipelineError
from runtime.assets import check_asset_id
from runtime.manifest import IMAGE_TASKS

log = logging.getLogger(__name__)

PUBLIC = ("/v2/health/live", "/v2/health/ready")
AUTH_SCOPE = "edge_sdk.auth"  # how a request was admitted: "token" or "console" (its session cookie)
MAX_EVENTS_PAGE = 1000
Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


def error(status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": message, **({"hint": hint} if hint else {})}, status_code=status, headers=headers)


async def offload(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` on a worker thread; a cancelled request stops waiting for it (the thread
    finishes alone)."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)


async def read_body(request: Request, limit: int, timeout_s: float = 60.0) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes is over the {limit}-byte limit",
                         hint="raise server.max_body_mb, or send a smaller image", status=413)
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"request body is over the {limit}-byte limit", status=413)
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)",
                         hint="send the body at once, or raise server.body_timeout_s for slow links",
                         status=408) from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise BadRequest(f"Content-Encoding {encoding[:40]!r} is not supported; expected gzip or none", status=415)
    return _gunzip(body, limit)


def _gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body inflated to at most ``limit`` bytes (a small bomb cannot grow past the body limit)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the gzip request body is corrupt: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise BadRequest(f"the gzip request body inflates past the {limit}-byte limit", status=413)
    if not inflater.eof:
        raise BadRequest("the gzip request body is truncated")
    return data


def _asset(value: str) -> str:
    """A valid asset id (runtime.assets), or 400 naming what was sent and what is allowed."""
    try:
        return check_asset_id(value)
    except PipelineError as exc:
        raise BadRequest(exc.message, exc.hint) from None


def _status(exc: EdgeSDKError) -> int:
    if isinstance(exc, BadRequest):
        return exc.status
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, PackageNotAllowed):
        return 403
    if isinstance(exc, (InputMismatchError, PipelineError)):
        return 422
    if isinstance(exc, DaemonError):
        return 409
    return 500


class Api:
    """Request handlers over one :class:`Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        server = daemon.config.server
        self.limit = server.max_body_bytes
        self.body_timeout_s = server.body_timeout_s
        self.admission = Admission(server.max_in_flight)
        self.grace_s = server.shutdown_grace_s
        self.stopping = False
        self._running: set[asyncio.Task[Any]] = set()
        self._keys_in_use: set[str] = set()  # Idempotency-Keys of diagnoses being answered now
        self._cut: set[asyncio.Task[Any]] = set()

    async def body(self, request: Request) -> bytes:
        return await read_body(request, self.limit, self.body_timeout_s)

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """From SIGTERM: refuse new requests now, cut those still running after the grace (both 503)."""
        def start() -> None:
            if not self.stopping:
                self.stopping = True
                loop.call_later(self.grace_s, self._cut_off)
        loop.call_soon_threadsafe(start)

    def _cut_off(self) -> None:
        for task in list(self._running):
            self._cut.add(task)
            task.cancel()

    async def guard(self, request: Request, answer: Callable[[], Awaitable[Response]]) -> Response:
        """``answer()``, unless the daemon is shutting down; 503 when the grace runs out under it."""
        if self.stopping and request.url.path not in PUBLIC:
            return error(503, "the daemon is shutting down", hint="retry on another device or after its restart",
                         headers={"Retry-After": "5", "Connection": "close"})
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            return await answer()
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            if hasattr(task, "uncancel"):  # Python >= 3.11: the cancellation is handled here
                task.uncancel()
            log.warning("%s %s was still running %.0f s after SIGTERM (server.shutdown_grace_s): answered 503",
                        request.method, request.url.path, self.grace_s)
            return error(503, f"the daemon shut down before this request finished (grace {self.grace_s:g} s)",
                         hint="retry on another device or after its restart", headers={"Retry-After": "5",
                                                                                          "Connection": "close"})
        finally:
            self._running.discard(task)
            self._cut.discard(task)

    # KServe v2 ---------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = self.daemon.ready and not self.stopping  # a draining daemon takes no new work
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server(self, request: Request) -> Response:
        return JSONResponse({"name": "edge-sdk", "version": __version__, "extensions": []})

    def _served(self, request: Request) -> tuple[str, Any]:
        """The model the path names, with its version when the path has one (KServe's versioned routes)."""
        name = request.path_params["name"]
        pipeline = self.daemon.registry.current(name)
        version = request.path_params.get("version")
        if version is not None and version != pipeline.manifest.version:
            raise BadRequest(f"model {name!r} version {version!r} is not served (serving version "
                             f"{pipeline.manifest.version!r})", hint=f"use /v2/models/{name}/... for the served one",
                             status=404)
        return name, pipeline

    async def model(self, request: Request) -> Response:
        name, pipeline = self._served(request)
        return JSONResponse(model_metadata(name, pipeline.manifest, pipeline.backend))

    async def model_ready(self, request: Request) -> Response:
        name, _ = self._served(request)
        return JSONResponse({"name": name, "ready": self.daemon.ready})

    async def infer(self, request: Request) -> Response:
        name, pipeline = self._served(request)
        with self.admission.admit(name):
            manifest = pipeline.manifest
            header, tail = split_body(await self.body(request), request.headers.get("inference-header-content-length"))
            infer = decode_request(header, manifest.inputs, tail)
            result, served = await offload(self.daemon.infer, name, infer.feeds)
        body, head_length = encode_response(name, served.version, result, infer)
        if head_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(head_length)})

    # convenience ---------------------------------------------------------------------------
    async def _items(self, request: Request, name: str) -> list[Any]:
        manifest = self.daemon.registry.current(name).manifest
        body = await self.body(request)
        if manifest.task in IMAGE_TASKS:
            return [await offload(decode_upload, body)]  # decoding is CPU work: off the event loop
        data = parse_json(body)
        texts = data.get("texts") if isinstance(data, dict) and "texts" in data else [
            data.get("text") if isinstance(data, dict) else None]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise BadRequest('expected a JSON body {"text": "..."} or {"texts": ["...", ...]} with non-empty texts')
        return texts

    async def predict(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.daemon.registry.current(name)  # 404 before admission for a model not served
        with self.admission.admit(name):
            items = await self._items(request, name)
            predictions = await offload(self.daemon.predict, name, items)
        return JSONResponse({"model": name, "predictions": [p.to_dict() for p in predictions]})

    async def diagnose(self, request: Request) -> Response:
        if self.daemon.fuser is None:
            raise DaemonError("diagnosis needs a [fusion] table in the configuration",
                              hint="declare the fault vocabulary and each model's label map under [fusion]")
        model = request.query_params.get("model")
        content_type = request.headers.get("content-type", "")
        text = content_type.startswith("application/json")
        key = _idempotency_key(request.headers.get("idempotency-key"))
        with self.admission.admit(self.daemon.pick_model("text" if text else "image", model)):
            body = await self.body(request)
            reply = None
            if key is not None:
                fingerprint = hashlib.sha256(b"\0".join(
                    (request.url.path.encode(), request.url.query.encode(), content_type.encode(), body))).hexdigest()
                replayed = await self._replay(key, fingerprint)
                if replayed is not None:
                    return replayed
                if key in self._keys_in_use:
                    raise BadRequest(f"a request with Idempotency-Key {key!r} is still being answered",
                                     hint="wait for its answer, then retry with the same key", status=409)
                reply = (key, fingerprint)
                self._keys_in_use.add(key)
            try:
                if text:
                    data = parse_json(body)
                    if not isinstance(data, dict) or not isinstance(data.get("asset"), str) \
                            or not data["asset"].strip() or not isinstance(data.get("text"), str) \
                            or not data["text"].strip():
                        raise BadRequest('expected a JSON body {"asset": "pump-7", "text": "..."}')
                    asset = _asset(data["asset"])
                    outcome = await offload(self.daemon.diagnose_text, asset, data["text"], model, reply)
                else:
                    asset = request.query_params.get("asset", "")
                    if not asset.strip():
                        raise BadRequest("an image upload needs ?asset=ASSET_ID", hint="POST /v1/diagnose?asset=pump-7")
                    asset = _asset(asset)
                    outcome = await offload(lambda: self.daemon.diagnose_image(asset, decode_upload(body), model,
                                                                               reply=reply))
            finally:
                if key is not None:
                    self._keys_in_use.discard(key)
        return JSONResponse(outcome.to_dict())

    async def _replay(self, key: str, fingerprint: str) -> Response | None:
        """The answer kept for ``key`` (a retry), 422 when the key answered another request, None if new."""
        kept = await offload(self.daemon.store.reply, key)
        if kept is None:
            return None
        if kept[0] != fingerprint:
            raise BadRequest(f"Idempotency-Key {key!r} was used for another request (other body, asset or model)",
                             hint="use a new key for each distinct request", status=422)
        return Response(kept[1], media_type="application/json", headers={"Idempotent-Replayed": "true"})

    async def events(self, request: Request) -> Response:
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", 100, 1, MAX_EVENTS_PAGE)
        before = _int_param(q.get("before"), "before", None, 1, None)
        since = _float_param(q.get("since"), "since")
        events = await offload(self.daemon.store.list, asset_id=q.get("asset"), fault=q.get("fault"),
                                         since=since, before_id=before, limit=limit)
        rows = [_event(e) for e in events]
        return JSONResponse({"events": rows, "next": rows[-1]["id"] if len(rows) == limit else None})

    async def event(self, request: Request) -> Response:
        event_id = _int_param(request.path_params["id"], "event id", None, 1, None)
        event = await offload(self.daemon.store.get, event_id)
        if event is None:
            return error(404, f"event {event_id} does not exist (it may have been removed by retention)")
        return JSONResponse(_event(event))

    async def snapshot(self, request: Request) -> Response:
        event_id = _int_param(request.path_params["id"], "event id", None, 1, None)
        path = await offload(self.daemon.store.snapshot_path, event_id)
        if path is None:
            return error(404, f"event {event_id} has no snapshot")
        return FileResponse(path, media_type="image/jpeg")

    async def acknowledge(self, request: Request) -> Response:
        event_id = _int_param(request.path_params["id"], "event id", None, 1, None)
        by = "console" if request.scope.get(AUTH_SCOPE) == "console" else "api"
        event = await offload(self.daemon.store.acknowledge, event_id, by)
        if event is None:
            return error(404, f"event {event_id} does not exist (it may have been removed by retention)")
        return JSONResponse(_event(event))

    async def dead_letters(self, request: Request) -> Response:
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", 100, 1, MAX_EVENTS_PAGE)
        before = _int_param(q.get("before"), "before", None, 1, None)
        letters = await offload(self.daemon.store.dead_letters, limit, before_seq=before)
        rows = [d.to_dict() for d in letters]
        return JSONResponse({"count": await offload(self.daemon.store.dead_letter_count), "dead_letters": rows,
                             "next": rows[-1]["seq"] if len(rows) == limit else None})

    async def sources(self, request: Request) -> Response:
        return JSONResponse({"sources": self.daemon.sources()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": [self.daemon.registry.info(n) for n in self.daemon.registry.names]})

    async def reload(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await self.body(request)
        data = parse_json(body) if body.strip() else {}
        package = data.get("package") if isinstance(data, dict) else None
        if package is not None and not isinstance(package, str):
            raise BadRequest(f"package is {package!r}; expected a path on the device")
        info = await offload(self.daemon.swap, name, package)
        return JSONResponse(info)

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.daemon.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


INT64_MAX = 2 ** 63 - 1  # event ids are SQLite integers


def _int_param(value: str | None, what: str, default: int | None, lo: int, hi: int | None) -> Any:
    """An ASCII decimal ``lo <= n <= hi`` (``hi`` at most SQLite's int64 maximum), else 400 naming it."""
    if value is None:
        return default
    top = INT64_MAX if hi is None else hi
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or not lo <= int(value) <= top:
        raise BadRequest(f"{what} is {value[:40]!r}; expected an integer >= {lo} and <= {top}")
    return int(value)


def _idempotency_key(value: str | None) -> str | None:
    """The client's ``Idempotency-Key``: 1-255 visible ASCII characters (a UUID is typical), else 400."""
    if value is None:
        return None
    if not (1 <= len(value) <= 255 and value.isascii() and value.isprintable() and " " not in value):
        raise BadRequest(f"Idempotency-Key {value[:40]!r} is not valid; expected 1-255 visible ASCII characters",
                         hint="send a fresh UUID per request, and the same one when retrying it")
    return value


def _float_param(value: str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise BadRequest(f"{what} is {value[:40]!r}; expected a UNIX timestamp in seconds")
    return number


def _event(event: Any) -> dict[str, Any]:
    return {"id": event.id, "asset": event.asset_id, "fault": event.fault, "confidence": event.confidence,
            "timestamp": event.timestamp, "snapshot": event.snapshot is not None, "diagnosis": event.payload,
            "acknowledged_at": event.acknowledged_at, "acknowledged_by": event.acknowledged_by}


ROUTES: list[tuple[str, str, str, str]] = [  # (method, path, handler, summary)
    ("GET", "/v2/health/live", "live", "The server is running (no token needed)."),
    ("GET", "/v2/health/ready", "ready", "Every model is loaded and verified (no token needed)."),
    ("GET", "/v2", "server", "Server metadata (KServe v2)."),
    ("GET", "/v2/models/{name}", "model", "Model metadata: inputs, outputs, platform (KServe v2)."),
    ("GET", "/v2/models/{name}/ready", "model_ready", "Model readiness (KServe v2)."),
    ("POST", "/v2/models/{name}/infer", "infer", "Run the graph on JSON tensors (KServe v2)."),
    ("GET", "/v2/models/{name}/versions/{version}", "model", "Model metadata of the served version (KServe v2)."),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready", "Readiness of the served version."),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "infer", "Run the served version (KServe v2)."),
    ("GET", "/v1/models", "models", "Served models with backend, precision and package."),
    ("POST", "/v1/models/{name}/predict", "predict", "Predict an image (body: JPEG/PNG bytes) or texts (JSON)."),
    ("POST", "/v1/models/{name}/reload", "reload", "Hot swap to a package (JSON {package}); the old one serves on failure."),
    ("POST", "/v1/diagnose", "diagnose", "Diagnose a text (JSON {asset, text}) or an image (bytes, ?asset=)."),
    ("GET", "/v1/events", "events", "Stored events, newest first (?asset, fault, since, before, limit)."),
    ("GET", "/v1/events/{id}", "event", "One event."),
    ("GET", "/v1/events/{id}/snapshot", "snapshot", "The event's snapshot image (JPEG)."),
    ("POST", "/v1/events/{id}/acknowledge", "acknowledge", "Acknowledge an event (the first acknowledgement is kept)."),
    ("GET", "/v1/sources", "sources", "Sources' state: frames, drops, reconnects, errors."),
    ("GET", "/v1/dead-letters", "dead_letters", "MQTT messages the broker rejected, with the reason (?limit, before)."),
    ("GET", "/metrics", "metrics", "Prometheus metrics."),
    ("GET", "/openapi.json", "openapi", "This document."),
]


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, handler, summary in ROUTES:
        operation: dict[str, Any] = {"summary": summary, "operationId": handler,
                                     "responses": {"200": {"description": "OK"}, "4XX": {"description": "error"}}}
        if path not in PUBLIC:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method.lower()] = operation
    return {"openapi": "3.0.3", "info": {"title": "edge-sdk daemon", "version": __version__}, "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def create_app(daemon: Daemon) -> Starlette:
    """The ASGI app over a started (or starting) daemon."""
    api = Api(daemon)
    token = daemon.config.server.token.encode()
    console = Console(daemon, daemon.config.server.token, _status)

    def refuse(request: Request) -> Response | None:
        """None when the bearer token (or else the console's session cookie) admits the request."""
        if request.url.path in PUBLIC:
            return None
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if auth and not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)):
            return error(401, "missing or wrong bearer token",
                         hint="send Authorization: Bearer <token> (server.token or server.token_file)")
        if auth:
            request.scope[AUTH_SCOPE] = "token"
            return None
        denied = console.denial(request)
        if denied is not None:
            return error(*denied)
        request.scope[AUTH_SCOPE] = "console"
        return None

    def counted(name: str, handler: Handler) -> Handler:
        """A console handler (it checks its own session), refused while shutting down, counted in metrics."""
        async def endpoint(request: Request) -> Response:
            response = await api.guard(request, lambda: handler(request))
            daemon.metrics.count_request(name, response.status_code)
            return response

        return endpoint

    def guarded(name: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            response = await api.guard(request, lambda: _answer(request, handler, refuse))
            daemon.metrics.count_request(name, response.status_code)
            log.debug("%s %s -> %d in %.1f ms", request.method, request.url.path, response.status_code,
                      (time.perf_counter() - started) * 1e3)
            return response

        return endpoint

    routes = [Route(path, guarded(handler, getattr(api, handler)), methods=[method])
              for method, path, handler, _ in ROUTES]
    routes += [Route(path, counted(name, handler), methods=[method]) for method, path, name, handler in console.routes()]

    async def no_route(request: Request, exc: Exception) -> Response:
        """Unknown paths and methods answer JSON like every other error (KServe clients parse the body)."""
        status = int(getattr(exc, "status_code", 404))
        what = "no such route" if status == 404 else f"method {request.method} is not allowed on this route"
        return error(status, f"{what}: {request.method} {request.url.path}",
                     hint="GET /openapi.json lists the routes")

    app = Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})
    app.state.api = api  # edge_sdk.daemon.server calls api.begin_shutdown on SIGTERM
    return app


async def _answer(request: Request, handler: Handler, refuse: Callable[[Request], Response | None]) -> Response:
    refused = refuse(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except Busy as exc:
        return error(503, exc.message, exc.hint, headers={"Retry-After": str(exc.retry_after_s)})
    except EdgeSDKError as exc:
        status = _status(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error(status, exc.message, exc.hint)
    except ClientDisconnect:  # the client went away mid-body: nothing to answer, nothing broken
        log.info("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
        return error(400, "the client disconnected before sending the whole body")
    except Exception:  # our bug: logged with its traceback, answered without internals
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal error; the daemon's log has the details")

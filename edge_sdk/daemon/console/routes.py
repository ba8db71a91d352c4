"""The console's routes and its cookie authentication.

Public: ``GET /console/login`` (the login page), ``POST /console/login`` (form field ``token``),
``GET /console/static/console.css`` (the login page's style). Everything else needs the session
cookie that a good login sets: ``GET /`` (redirects to the login page without one), the console's
script, ``GET /console/session`` (the CSRF token for the page's script), ``GET /console/state``
(sources, models, device health), ``GET /console/sources/{name}/frame.jpg`` (the latest frame,
drawn), ``GET /console/models/{name}/report`` (the conversion report) and ``POST /console/logout``.

A request with the cookie instead of a bearer token may also use the ``/v1`` API; a mutating one
(POST) must then carry the session's CSRF token in ``X-CSRF-Token`` and an ``Origin`` (or
``Referer``) of this host. Every console answer has a Content-Security-Policy without inline
script, ``X-Frame-Options: DENY`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from edge_sdk.daemon.console.sessions import COOKIE, CSRF_HEADER, LoginThrottle, Session, Sessions, csrf_ok
from edge_sdk.errors import EdgeSDKError

log = logging.getLogger(__name__)

__all__ = ["Console", "REPORT_MEMBER"]

#: Where a package carries its conversion report; a ``report.html`` next to the package also counts.
REPORT_MEMBER = "reports/report.html"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# The report is a document of its own, written at conversion time: styles and embedded images only.
REPORT_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
PUBLIC_STATIC = ("console.css",)
Handler = Callable[[Request], Awaitable[Response]]


def _static(name: str) -> bytes:
    return (resources.files("edge_sdk.daemon.console") / "static" / name).read_bytes()


def _secure(response: Response) -> Response:
    """``response`` with the console's security headers (those it sets itself are kept)."""
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def _json_error(status: int, message: str, hint: str | None = None) -> Response:
    body = {"error": message, **({"hint": hint} if hint else {})}
    return _secure(JSONResponse(body, status_code=status))


def _same_origin(request: Request) -> bool:
    """``Origin`` (or, without it, ``Referer``) names this very scheme, host and port."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    if referer is None:
        return False
    parts = urllib.parse.urlsplit(referer)
    return f"{parts.scheme}://{parts.netloc}" == own


class Console:
    """The console over one daemon: its sessions, its routes, and cookie checks for the API."""

    def __init__(self, daemon: Any, token: str, status_of: Callable[[EdgeSDKError], int]) -> None:
        self.daemon = daemon
        self._status_of = status_of  # the API's mapping of errors to HTTP statuses
        self.sessions = Sessions(token)
        self.throttle = LoginThrottle()

    # -- authentication ---------------------------------------------------------------------
    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def denial(self, request: Request) -> tuple[int, str, str] | None:
        """None when the request's session cookie admits it, else (status, message, hint). A mutating request
        also needs the session's CSRF token in ``X-CSRF-Token`` and this host as its Origin."""
        session = self.session(request)
        if session is None:
            return (401, "missing or wrong bearer token (or console session)",
                    "send Authorization: Bearer <token>, or log in at /console/login")
        if request.method not in ("GET", "HEAD"):
            if not csrf_ok(session, request.headers.get(CSRF_HEADER)):
                return (403, f"missing or wrong {CSRF_HEADER} header for this console session",
                        "reload the console page; its script sends the token")
            if not _same_origin(request):
                return (403, "cross-origin request refused: the Origin (or Referer) is not this console",
                        "use the console page served by this daemon")
        return None

    def refuse(self, request: Request) -> Response | None:
        denied = self.denial(request)
        return None if denied is None else _json_error(*denied)

    def _logged_in(self, handler: Handler, *, page: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            if page and self.session(request) is None:
                return _secure(RedirectResponse("/console/login", status_code=303))
            refused = self.refuse(request)
            if refused is not None:
                return refused
            try:
                return _secure(await handler(request))
            except EdgeSDKError as exc:
                return _json_error(self._status_of(exc), exc.message, exc.hint)

        return endpoint

    # -- login ------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        return _secure(Response(_static("login.html"), media_type=STATIC_TYPES[".html"]))

    async def login(self, request: Request) -> Response:
        wait = self.throttle.locked()
        if wait:
            return self._login_failed(429, "too many wrong tokens; wait a minute and try again",
                                      {"Retry-After": str(int(wait) + 1)})
        if request.headers.get("origin") is not None and not _same_origin(request):
            return self._login_failed(403, "cross-origin login refused")
        token = await _form_field(request, "token")
        if not self.sessions.check_token(token):
            self.throttle.failed()
            log.warning("console: a login with a wrong token from %s", request.client.host if request.client else "?")
            await asyncio.sleep(self.throttle.fail_delay_s)
            return self._login_failed(401, "wrong token: enter the daemon's token (server.token or server.token_file)")
        session = self.sessions.create()
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session.id, max_age=int(self.sessions.ttl_s), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return _secure(response)

    def _login_failed(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        page = _static("login.html").replace(b'<p id="error" class="error" hidden></p>',
                                             b'<p id="error" class="error">' + _html(message) + b"</p>")
        return _secure(Response(page, status_code=status, media_type=STATIC_TYPES[".html"], headers=headers))

    async def logout(self, request: Request) -> Response:
        session = self.session(request)
        if session is not None:
            self.sessions.end(session.id)
        response = JSONResponse({"logged_out": True})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    # -- pages and data ---------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return Response(_static("index.html"), media_type=STATIC_TYPES[".html"])

    async def asset(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in ("console.js", "console.css"):
            return _json_error(404, f"no console file {name[:60]!r}", hint="the console has console.js and console.css")
        if name not in PUBLIC_STATIC:
            refused = self.refuse(request)
            if refused is not None:
                return refused
        return _secure(Response(_static(name), media_type=STATIC_TYPES[Path(name).suffix]))

    async def session_info(self, request: Request) -> Response:
        session = self.session(request)
        assert session is not None  # _logged_in checked it
        return JSONResponse({"csrf": session.csrf, "expires_in_s": max(session.expires - time.monotonic(), 0.0)})

    async def state(self, request: Request) -> Response:
        return JSONResponse(await _offload(self._state))

    def _state(self) -> dict[str, Any]:
        from edge_sdk.daemon.console.views import health, models, sources

        return {"sources": sources(self.daemon), "models": models(self.daemon, REPORT_MEMBER),
                "health": health(self.daemon)}

    async def frame(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.daemon.config.sources:
            return _json_error(404, f"no source {name[:60]!r}", hint="GET /v1/sources lists the sources")
        data = await _offload(self.daemon.live.jpeg, name)
        if data is None:
            return _json_error(404, f"source {name!r} has delivered no frame yet")
        return Response(data, media_type="image/jpeg")

    async def report(self, request: Request) -> Response:
        from edge_sdk.daemon.console.views import report_html

        name = request.path_params["name"]
        html = await _offload(report_html, self.daemon, name, REPORT_MEMBER)
        if html is None:
            return _json_error(404, f"no report in this package (model {name!r})",
                               hint=f"convert with a report ({REPORT_MEMBER} in the package, or report.html "
                                    "next to it)")
        response = Response(html, media_type=STATIC_TYPES[".html"])
        response.headers["Content-Security-Policy"] = REPORT_CSP
        return response

    def routes(self) -> list[tuple[str, str, str, Handler]]:
        """(method, path, name, handler) of every console route; each handler checks its own session."""
        logged_in = self._logged_in
        return [
            ("GET", "/", "console_page", logged_in(self.index, page=True)),
            ("GET", "/console/login", "console_login_page", self.login_page),
            ("POST", "/console/login", "console_login", self.login),
            ("POST", "/console/logout", "console_logout", logged_in(self.logout)),
            ("GET", "/console/static/{file}", "console_static", self.asset),
            ("GET", "/console/session", "console_session", logged_in(self.session_info)),
            ("GET", "/console/state", "console_state", logged_in(self.state)),
            ("GET", "/console/sources/{name}/frame.jpg", "console_frame", logged_in(self.frame)),
            ("GET", "/console/models/{name}/report", "console_report", logged_in(self.report)),
        ]


async def _form_field(request: Request, name: str) -> str:
    """One field of a small urlencoded form (at most 4 KiB), "" when absent or the body is too large."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 4096:
            return ""
    values = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get(name)
    return values[0] if values else ""


def _html(text: str) -> bytes:
    import html

    return html.escape(text).encode()


async def _offload(func: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(functools.partial(func, *args), abandon_on_cancel=True)

"""Why a stream URL does not open: OpenCV only says that it did not, so ask the server ourselves.

:func:`why_not_open` resolves the host, connects, and for ``rtsp://`` sends the ``DESCRIBE`` FFmpeg
would (answering a Basic or Digest challenge with the URL's credentials), for ``http(s)://`` a ``GET``;
the answer names the cause a line engineer can act on: an unknown host, a refused or silent port, a
wrong path (404), wrong or missing credentials (401). Never raises; credentials never appear in it.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import ssl
from base64 import b64encode
from urllib.parse import unquote, urlsplit

from runtime.sources._spec import split_userinfo

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}


def why_not_open(url: str, timeout: float = 3.0) -> str | None:
    """A short reason ``url`` cannot be opened, or None when the server answers as if it could."""
    scheme, userinfo, rest = split_userinfo(url)
    parts = urlsplit(f"{scheme}{rest}")
    kind = parts.scheme.lower()
    if kind not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname
    try:
        port = parts.port or DEFAULT_PORTS[kind]
    except ValueError:
        return f"the port in {parts.netloc!r} is not a number"
    where = f"{host}:{port}"
    user, _, password = (unquote(p) for p in (userinfo or "").partition(":"))
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"the host name {host!r} cannot be resolved (check the address, or the device's DNS)"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return f"connection refused by {where} (nothing listens there: is the camera on, the port right?)"
    except (socket.timeout, TimeoutError):
        return f"no answer from {where} within {timeout:g} s (the camera is off, unreachable or firewalled)"
    except OSError as exc:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    try:
        if kind in ("rtsp", "rtsps"):
            if kind == "rtsps":
                sock = ssl._create_unverified_context().wrap_socket(sock, server_hostname=host)
            status = _rtsp_describe(sock, f"{kind}://{parts.netloc}{parts.path or '/'}", user, password, timeout)
        else:
            sock.close()
            status = _http_get(kind, host, port, parts.path or "/", user, password, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{where} accepted the connection but its answer could not be read ({type(exc).__name__})"
    finally:
        sock.close()
    path = parts.path or "/"
    if status == 401:
        return ("the server refused the user name and password (401 Unauthorized): check them"
                if userinfo else "the server needs a user name and password (401 Unauthorized): "
                                 "put them in the URL (rtsp://user:password@host/...)")
    if status == 403:
        return f"the server forbids access to {path} (403 Forbidden) for this user"
    if status == 404:
        return f"the server has no stream at {path} (404 Not Found): check the path"
    if status is None:
        return f"{where} does not answer as an {kind.upper()} server"
    if status >= 400:
        return f"the server answered {status} for {path}"
    return None


def _rtsp_describe(sock: socket.socket, url: str, user: str, password: str, timeout: float) -> int | None:
    sock.settimeout(timeout)
    status, headers = _rtsp_request(sock, url, 1, "")
    if status == 401 and user:
        challenge = headers.get("www-authenticate", "")
        status, _ = _rtsp_request(sock, url, 2, _authorization(challenge, user, password, "DESCRIBE", url))
    return status


def _rtsp_request(sock: socket.socket, url: str, cseq: int, authorization: str) -> tuple[int | None, dict[str, str]]:
    lines = [f"DESCRIBE {url} RTSP/1.0", f"CSeq: {cseq}", "Accept: application/sdp", "User-Agent: edge-sdk"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    found = re.match(r"RTSP/\d\.\d (\d{3})", head[0] if head else "")
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    body = int(headers.get("content-length", "0") or 0)  # read the body so the connection can be reused
    rest = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
    while len(rest) < body:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return (int(found.group(1)) if found else None), headers


def _authorization(challenge: str, user: str, password: str, method: str, uri: str) -> str:
    """The ``Authorization`` header answering a Basic or Digest (MD5, RFC 2617 without qop) challenge."""
    if challenge.lower().startswith("digest"):
        fields = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge[6:]))
        realm, nonce = fields.get("realm", ""), fields.get("nonce", "")
        md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731  (the protocol's hash)
        response = md5(f"{md5(f'{user}:{realm}:{password}')}:{nonce}:{md5(f'{method}:{uri}')}")
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{response}"')
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


def _http_get(kind: str, host: str, port: int, path: str, user: str, password: str, timeout: float) -> int | None:
    connection: http.client.HTTPConnection
    if kind == "https":
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"User-Agent": "edge-sdk"}
        if user:
            headers["Authorization"] = _authorization("basic", user, password, "GET", path)
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()

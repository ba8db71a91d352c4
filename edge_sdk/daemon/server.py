"""``edge-sdk serve``: start the daemon, serve HTTP with uvicorn, stop cleanly on SIGTERM.

Order on start: load the configuration (errors name the key), start the daemon (models
verified, store opened, MQTT and sources started), then listen; systemd is told READY only
then, and the watchdog is pinged while the daemon is healthy. On SIGTERM/SIGINT uvicorn stops
accepting requests and finishes those in flight (new ones get 503; those still running after
``server.shutdown_grace_s`` get 503 too); then the streams drain, their events are stored, and the
MQTT outbox is flushed before the process exits.

Connections are guarded (edge_sdk.daemon.limits): header, body and keep-alive timeouts, at most
``server.max_connections`` open, repeated log lines suppressed, the open-files limit raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from edge_sdk.daemon.config import DaemonConfig
from edge_sdk.daemon.limits import http_protocol, install_repeat_filter, raise_open_files_limit

log = logging.getLogger(__name__)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind_warning(host: str) -> str | None:
    """What to tell the operator when the daemon listens beyond this machine: it speaks plain HTTP."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (f"serving plain HTTP on {host}: the bearer token and every upload cross the network unencrypted; "
            "bind 127.0.0.1 and put a TLS reverse proxy (nginx, caddy) in front, or keep the network closed")


def serve(config_path: str | os.PathLike[str], *, log_level: str = "info") -> int:
    import uvicorn

    from edge_sdk.daemon.app import create_app
    from edge_sdk.daemon.core import Daemon
    from edge_sdk.daemon.service import SystemdNotifier

    config = DaemonConfig.load(Path(config_path))
    warning = bind_warning(config.server.host)
    if warning:
        log.warning("%s", warning)
    limits = raise_open_files_limit()
    if limits is not None and limits[0] < 4 * config.server.max_connections:
        log.warning("the open-files limit is %d, close to server.max_connections = %d: raise LimitNOFILE",
                    limits[0], config.server.max_connections)
    notifier = SystemdNotifier()
    daemon = Daemon(config)
    notifier.status("loading models")
    try:
        daemon.start()
        s = config.server
        app = create_app(daemon)
        server = _Server(uvicorn.Config(app, host=s.host, port=s.port, log_level=log_level, access_log=False,
                                        lifespan="off", http=http_protocol(s.header_timeout_s, s.max_connections),
                                        timeout_keep_alive=s.idle_timeout_s,  # type: ignore[arg-type]
                                        # the app answers 503 at the grace; uvicorn's own cut comes after
                                        timeout_graceful_shutdown=int(s.shutdown_grace_s) + 3),
                         on_exit=app.state.api.begin_shutdown)
        install_repeat_filter("uvicorn", "uvicorn.error")  # after uvicorn.Config set up its loggers
        stop_watchdog = threading.Event()
        threading.Thread(target=_notify_when_up, args=(server, daemon, notifier, stop_watchdog),
                         name="edge-sdk-watchdog", daemon=True).start()
        server.run()
        stop_watchdog.set()
    finally:
        notifier.stopping()
        daemon.stop()
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT only stop it: uvicorn re-raises the captured signal
        after shutting down, which would kill the process before the daemon drains and flushes."""

        on_exit: Any = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.on_exit is not None and not self.should_exit:
                import asyncio
                try:
                    self.on_exit(asyncio.get_running_loop())
                except RuntimeError:  # no loop (not serving yet): nothing to cut
                    pass
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config: Any, on_exit: Any = None) -> Any:  # noqa: N802 - a factory standing in for the class
    server = _server_class()(config)
    server.on_exit = on_exit  # called with the event loop on SIGTERM/SIGINT
    return server


def _notify_when_up(server: object, daemon: object, notifier: object, stop: threading.Event) -> None:
    """READY=1 once uvicorn listens; WATCHDOG=1 at systemd's interval while the daemon is ready."""
    while not getattr(server, "started", False):
        if stop.wait(0.05):
            return
    notifier.ready()  # type: ignore[attr-defined]
    notifier.status("serving")  # type: ignore[attr-defined]
    log.info("edge-sdk daemon listening")
    interval = notifier.watchdog_interval()  # type: ignore[attr-defined]
    if interval is None:
        return
    while not stop.wait(interval):
        if getattr(daemon, "ready", False):
            notifier.watchdog()  # type: ignore[attr-defined]

"""``edge-sdk serve``: the on-device daemon (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import importlib.util
import logging

from edge_sdk.errors import BackendUnavailableError

DEFAULT_CONFIG = "/etc/edge-sdk/edge-sdk.toml"


def add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the on-device daemon: HTTP (KServe v2), sources, events, MQTT, metrics")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from edge_sdk.daemon.config import DaemonConfig

    config = DaemonConfig.load(args.config)
    if args.check:
        print(f"{args.config}: ok ({len(config.models)} models, {len(config.sources)} sources, "
              f"mqtt {'on' if config.mqtt else 'off'}, listening on {config.server.host}:{config.server.port})")
        return 0
    missing = [m for m in ("uvicorn", "starlette", "paho", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"edge-sdk serve needs the 'serve' extra ({', '.join(missing)} missing)",
                                      hint="pip install 'edge-sdk[serve]'")
    from edge_sdk.daemon.server import serve

    logging.getLogger().setLevel(args.log_level.upper())  # the daemon's own log, at the level asked
    return serve(args.config, log_level=args.log_level)

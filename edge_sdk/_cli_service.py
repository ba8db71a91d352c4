"""``edge-sdk service install``: run the daemon under systemd.

Thin glue over ``edge_sdk.daemon.service``. It writes the unit and prints the ``systemctl``
commands to run; it runs them itself only with ``--enable``. ``--print`` writes the unit to
stdout and installs nothing.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from edge_sdk.errors import DaemonError

SYSTEM_CONFIG = "/etc/edge-sdk/edge-sdk.toml"


def _default_config(user_mode: bool) -> Path:
    if not user_mode:
        return Path(SYSTEM_CONFIG)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edge-sdk" / "edge-sdk.toml"


def _edge_sdk_executable(explicit: str | None) -> Path:
    """--exec, else the edge-sdk script next to this interpreter (its venv), else the one on PATH."""
    if explicit:
        return Path(explicit).absolute()
    beside = Path(sys.executable).parent / "edge-sdk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("edge-sdk")
    if found:
        return Path(found).absolute()
    raise DaemonError("cannot find the edge-sdk executable next to this Python or on PATH",
                      hint="pass --exec /path/to/edge-sdk")


def _cmd_service_install(args: argparse.Namespace) -> int:
    from edge_sdk.daemon.service import enable_commands, install_unit, render_unit

    config = Path(args.config).absolute() if args.config else _default_config(args.user)
    text = render_unit(exec_path=_edge_sdk_executable(args.exec_path), config_path=config, user=args.run_as,
                       user_mode=args.user)
    if args.print:
        sys.stdout.write(text)
        return 0
    path = install_unit(text, user_mode=args.user, unit_dir=args.unit_dir, enable=args.enable)
    print(f"installed {path}")
    if not config.is_file():
        print(f"note: {config} does not exist yet; write it before starting the service", file=sys.stderr)
    commands = enable_commands(user_mode=args.user)
    if args.enable:
        print("enabled and started: " + " && ".join(shlex.join(c) for c in commands))
    else:
        print("to start it now and at every boot, run:")
        prefix = "" if args.user else "sudo "
        for command in commands:
            print(f"  {prefix}{shlex.join(command)}")
    if args.user:
        print(f"to keep it running without a login session: sudo loginctl enable-linger {getpass.getuser()}")
    return 0


def add_service_parser(sub: Any) -> None:
    """Register ``edge-sdk service install`` on the top-level subparsers."""
    p = sub.add_parser("service", help="run the daemon under systemd")
    service = p.add_subparsers(dest="service_command", required=True)
    p = service.add_parser("install", help="write a systemd unit for 'edge-sdk serve'")
    p.add_argument("--user", action="store_true",
                   help="a user unit in ~/.config/systemd/user (no root needed) instead of /etc/systemd/system")
    p.add_argument("--config", help=f"daemon config file (default: {SYSTEM_CONFIG}, or "
                                    "~/.config/edge-sdk/edge-sdk.toml with --user)")
    p.add_argument("--unit-dir", help="write the unit into this directory instead")
    p.add_argument("--print", action="store_true", help="print the unit to stdout and install nothing")
    p.add_argument("--enable", action="store_true", help="also run systemctl daemon-reload and enable --now")
    p.add_argument("--run-as", metavar="USER", help="system unit: run as this user (added to the video group)")
    p.add_argument("--exec", dest="exec_path", metavar="PATH",
                   help="the edge-sdk executable (default: the one installed with this Python)")
    p.set_defaults(func=_cmd_service_install)

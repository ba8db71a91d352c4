"""A fleet inventory (TOML): the devices to deploy to, their groups and expected profiles.

    [defaults]
    path = "/opt/edge-sdk"                      # deployment root on each device
    config = "/etc/edge-sdk/edge-sdk.toml"      # the daemon to reload (omit: no reload)
    edge_sdk = "edge-sdk"                       # how to run edge-sdk on the devices
    identity = "~/.ssh/edge_fleet"
    known_hosts = "~/.ssh/known_hosts"

    [devices.press-4]
    address = "ssh://edge@10.0.0.11"            # or ssh://user@host:port/path, or a local directory
    group = "line1"
    profile = "orin-nano"                       # the preflight refuses another kind of device
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from urllib.parse import urlsplit

from edge_sdk.deploy.transport import DeployError, Target, parse_target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ROOT = "/opt/edge-sdk"
_DEFAULT_KEYS = ("path", "config", "edge_sdk", "identity", "known_hosts")
_DEVICE_KEYS = ("address", "group", "profile", *_DEFAULT_KEYS)


@dataclass(frozen=True)
class Device:
    name: str
    target: Target
    group: str = ""
    profile: str | None = None
    config: str | None = None
    edge_sdk: str | None = None
    identity: str | None = None
    known_hosts: str | None = None


def _strings(table: Mapping[str, Any], keys: tuple[str, ...], where: str) -> dict[str, str]:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise DeployError(f"{where} has unknown key(s) {unknown}", hint=f"allowed: {', '.join(keys)}")
    for key, value in table.items():
        if not isinstance(value, str) or not value.strip():
            raise DeployError(f"{where}.{key} is {value!r}; expected a non-empty string")
    return dict(table)


def load_inventory(path: str | os.PathLike[str], group: str | None = None) -> list[Device]:
    """The inventory's devices (those of ``group`` when given), in file order."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeployError(f"inventory {str(file)!r} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"inventory {str(file)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"defaults", "devices"})
    if unknown:
        raise DeployError(f"inventory has unknown table(s) {unknown}", hint="tables: [defaults], [devices.NAME]")
    defaults = _strings(data.get("defaults", {}), _DEFAULT_KEYS, "defaults")
    devices = data.get("devices")
    if not isinstance(devices, Mapping) or not devices:
        raise DeployError(f"inventory {str(file)!r} lists no [devices.NAME]")
    out = []
    for name, table in devices.items():
        where = f"devices.{name}"
        if not isinstance(table, Mapping):
            raise DeployError(f"{where} is {table!r}; expected a table")
        spec = {**defaults, **_strings(table, _DEVICE_KEYS, where)}
        if "address" not in spec:
            raise DeployError(f"{where} has no address", hint='add address = "ssh://user@host" or a directory')
        address = spec["address"]
        if address.startswith("ssh://") and urlsplit(address).path in ("", "/"):  # the root from path=
            address = address.rstrip("/") + "/" + spec.get("path", DEFAULT_ROOT).lstrip("/")
        target = parse_target(address)
        out.append(Device(str(name), target, spec.get("group", ""), spec.get("profile"), spec.get("config"),
                          spec.get("edge_sdk"), spec.get("identity"), spec.get("known_hosts")))
    if group is not None:
        out = [d for d in out if d.group == group]
        if not out:
            raise DeployError(f"no device of the inventory is in group {group!r}")
    return out

"""``edge-sdk deploy``: one command from the workstation to many devices."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import replace
from typing import Any, Sequence

from edge_sdk.errors import EdgeSDKError


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("deploy", help="deploy a package to devices (ssh:// or local directories), verified, "
                                      "with automatic rollback")
    p.add_argument("package", nargs="?", help="the .edgepkg to deploy (not needed with --rollback/--status)")
    p.add_argument("--to", action="append", default=[], metavar="TARGET",
                   help="ssh://user@host[:port]/path or a local directory (repeatable)")
    p.add_argument("--inventory", help="TOML inventory of devices (instead of --to)")
    p.add_argument("--group", help="only the inventory's devices in this group")
    p.add_argument("--rollback", action="store_true",
                   help="verify every target's previous version there, switch back to it and reload the daemon "
                        "(with --config); a version the daemon refused is never switched to")
    p.add_argument("--status", action="store_true",
                   help="show current/previous versions, the daemon's health, what it serves and its backends")
    p.add_argument("--config", help="the daemon's config on the devices; the daemon is reloaded and waited for")
    p.add_argument("--model", action="append", default=[], help="daemon model(s) to reload (default: all)")
    p.add_argument("--parallel", type=_at_least(1), default=4, help="devices deployed at once")
    p.add_argument("--canary", type=_at_least(0), default=0,
                   help="deploy to the first N devices first; stop if any fails")
    p.add_argument("--keep", type=_at_least(0), default=3, metavar="N",
                   help="each device keeps current, previous and the newest N versions; older ones and the "
                        "files only they used are removed (before uploading too, when space is short)")
    p.add_argument("--backend", default="auto", help="backend policy for the device preflight")
    p.add_argument("--allow-engine-build", action="store_true", help="build a TensorRT engine on devices lacking one")
    p.add_argument("--edge-sdk", help="how to run edge-sdk on the devices (default: edge-sdk on their PATH)")
    p.add_argument("--identity", help="ssh private key")
    p.add_argument("--known-hosts", help="ssh known_hosts file to check host keys against")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust a device's host key on first use (checked ever after)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_deploy)


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value

    return parse


def _jobs(args: argparse.Namespace) -> list[Any]:
    from edge_sdk.deploy.deploy import Options
    from edge_sdk.deploy.inventory import load_inventory
    from edge_sdk.deploy.transport import LocalTransport, parse_target

    base = Options(config=args.config, models=tuple(args.model), backend=args.backend,
                   allow_engine_build=args.allow_engine_build, keep=args.keep)
    if args.inventory and args.to:
        raise EdgeSDKError("pass either --to targets or --inventory, not both")
    devices = load_inventory(args.inventory, args.group) if args.inventory else []
    specs = [(parse_target(t), None) for t in args.to] + [(d.target, d) for d in devices]
    if not specs:
        raise EdgeSDKError("no target", hint="pass --to ssh://user@host/opt/edge-sdk (or a directory), or --inventory")
    seen: dict[str, int] = {}
    for target, _ in specs:
        seen[target.display] = seen.get(target.display, 0) + 1
    twice = [t for t, n in seen.items() if n > 1]
    if twice:
        raise EdgeSDKError(f"target {twice[0]} is listed {seen[twice[0]]} times",
                           hint="list each device once (check --to and the inventory's addresses)")
    jobs: list[tuple[Any, Any]] = []
    for target, device in specs:
        options = base if device is None else replace(base, profile=device.profile, config=args.config or device.config)
        edge = args.edge_sdk or (device.edge_sdk if device else None)
        if target.kind == "local":
            jobs.append((LocalTransport(target, edge_sdk=edge), options))
        else:
            from edge_sdk.deploy.ssh import SshTransport

            jobs.append((SshTransport(target, identity=args.identity or (device.identity if device else None),
                                      known_hosts=args.known_hosts or (device.known_hosts if device else None),
                                      accept_new_host_key=args.accept_new_host_key,
                                      edge_sdk=edge or "edge-sdk"), options))
    return jobs


def _printer(quiet: bool) -> Any:
    lock = threading.Lock()

    def report(target: str, message: str) -> None:
        if quiet:
            return
        with lock:
            print(f"[{target}] {message}", file=sys.stderr, flush=True)

    return report


def _cmd_deploy(args: argparse.Namespace) -> int:
    if args.rollback and args.status:
        raise EdgeSDKError("--rollback and --status are separate actions; pass one")
    jobs = _jobs(args)
    try:
        return _run(args, jobs)
    except KeyboardInterrupt:
        print("edge-sdk: interrupted; every device keeps the version it served (a partial upload resumes on the "
              "next deploy; run `edge-sdk deploy --status` to check)", file=sys.stderr)
        return 130
    finally:
        for transport, _ in jobs:
            transport.close()


def _run(args: argparse.Namespace, jobs: list[Any]) -> int:
    from edge_sdk.deploy.deploy import deploy, rollback_all, status_all

    if args.status:
        rows = status_all(jobs, parallel=args.parallel)
        _print_status(rows, args.json)
        return 0 if all(r["ok"] for r in rows) else 1
    if args.rollback:
        results = rollback_all(jobs, parallel=args.parallel)
    else:
        if not args.package:
            raise EdgeSDKError("no package given", hint="edge-sdk deploy PKG --to TARGET")
        results = deploy(args.package, jobs, parallel=args.parallel, canary=args.canary, report=_printer(args.json))
    _print_results(results, args.json)
    return 0 if all(r.ok for r in results) else 1


def _print_results(results: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    rows = [("target", "result", "step", "version", "backend", "uploaded", "time", "message")]
    for r in results:
        result = "ok" if r.ok else ("rolled back" if r.rolled_back else "skipped" if r.step == "skipped" else "FAILED")
        rows.append((r.target, result, r.step, r.version or "-", r.backend or "-", f"{r.uploaded_bytes / 1e6:.1f} MB",
                     f"{r.seconds:.1f} s", r.message[:80]))
    _table(rows)
    for r in results:
        if not r.ok and r.step != "skipped" and (len(r.message) > 80 or r.hint):
            print(f"{r.target}: {r.message}" + (f"\n  hint: {r.hint}" if r.hint else ""))
    failed = [r.target for r in results if not r.ok and r.step != "skipped"]
    skipped = [r.target for r in results if r.step == "skipped"]
    print(f"{len(results) - len(failed) - len(skipped)} of {len(results)} devices succeeded"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; not attempted (a canary failed): {', '.join(skipped)}" if skipped else ""))


def _print_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = [("target", "current", "previous", "daemon", "serving", "backends")]
    unreachable = []
    for r in rows:
        if not r["ok"]:
            table.append((r["target"], "unreachable", "-", "-", "-", "see below"))
            unreachable.append(f"{r['target']}: {r['error']}"  # whole: the reason is the point
                               + (f"\n  hint: {r['hint']}" if r.get("hint") else ""))
            continue
        cur, prev, daemon = r.get("current"), r.get("previous"), r.get("daemon")
        health = "-" if daemon is None else ("ready" if daemon.get("ready") else "NOT READY")
        models = (daemon or {}).get("models", [])
        serving = ", ".join(f"{m['name']} {m.get('version')}" for m in models) or "-"
        if cur and any(m.get("version") != cur.get("version") for m in models if m.get("model") == cur.get("name")):
            serving += " (NOT current)"
        backends = ", ".join(f"{m['name']}: {m['backend']} {m.get('precision', '')}".rstrip() for m in models) or "-"
        table.append((r["target"], _version(cur), _version(prev), health, serving, backends))
    _table(table)
    for line in unreachable:
        print(line)


def _version(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    return f"{v.get('name')} {v.get('version')} {v.get('precision') or ''} ({v['package'][:8]})".replace("  ", " ")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))

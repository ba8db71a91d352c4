"""Benchmark: a fresh, a no-change and a resumed ``edge-sdk deploy`` over real OpenSSH on loopback.

    python -m bench.deploy [--out build/bench/deploy.json] [--mb 80]

Device: a real ``sshd`` on a loopback port (``tests.sshd.Sshd``: its own host and client keys) and
a deployment root under a temporary directory; the device's ``edge-sdk`` is this interpreter's
``-m edge_sdk.cli``. No daemon is configured (no ``--config``): the figures are the transport, the
content store and the switch (upload, verify, assemble, parity, flip), not a reload.

Packages: a small image classifier (``tests.builders.image_model``) carrying ``--mb`` MB (80) of
random bytes as a report file, so the upload dominates as it does for a real model; version 2 has
another 80 MB blob (nothing to reuse but the model and the manifest's unchanged files).

Rows (wall time of ``edge_sdk.deploy.deploy.deploy`` as a user's ``edge-sdk deploy`` runs it, and
the bytes it sent):

1. **rsync floor** (the baseline): ``rsync`` of the 80 MB package file alone over the same ssh
   options into an empty directory: what moving the bytes costs with nothing else;
2. **fresh**: version 1 to an empty root;
3. **no change**: version 1 again (nothing to send: the store has every file);
4. **resumed**: version 2, whose first attempt was killed (SIGKILL of the deploying process, rsync
   throttled to 20 MB/s so that the kill lands mid-file) once about half its blob had arrived; the
   row is the second attempt, which sends only the rest.

Ratios are to the rsync floor measured in the same run. The machine is shared and noisy: each row
is run ``--repeat`` times (3) on fresh roots and the median kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._log import Log

DRIVER = """
import sys
from edge_sdk.deploy.deploy import Options, deploy
from edge_sdk.deploy.ssh import SshTransport
from edge_sdk.deploy.transport import parse_target
target, identity, known, edge, rsync, package = sys.argv[1:]
t = SshTransport(parse_target(target), identity=identity, known_hosts=known, edge_sdk=edge, rsync=rsync)
deploy(package, [(t, Options())])
"""


def _package(tmp: Path, version: str, mb: int) -> Path:
    import onnx

    import edge_sdk
    from runtime.package import Package, write_package
    from tests import builders

    model = tmp / "model.onnx"
    onnx.save(builders.image_model(), model)
    small = tmp / f"small-{version}.edgepkg"
    edge_sdk.convert(model, small, task="image-classification", labels=builders.COLOR_LABELS, name="colors",
                     version=version, preprocess=builders.preprocess_dict())
    source = Package.open(small)
    out = tmp / f"colors-{version}.edgepkg"
    write_package(source.manifest, {**{n: source.read_bytes(n) for n in source.manifest.files},
                                    "reports/blob.bin": os.urandom(mb * 1_000_000)}, out)
    return out


def _partial_bytes(root: Path) -> int:
    objects = root / "objects"
    if not objects.is_dir():
        return 0
    return sum(p.stat().st_size for p in objects.iterdir() if p.name.endswith(".partial"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/deploy.json"))
    parser.add_argument("--mb", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    log = Log("deploy")
    from bench.int8 import isa_info
    from edge_sdk.deploy.deploy import Options, deploy
    from edge_sdk.deploy.ssh import SshTransport
    from edge_sdk.deploy.transport import parse_target
    from tests.sshd import Sshd, sshd_binary

    if sshd_binary() is None or shutil.which("rsync") is None:
        print("bench.deploy needs OpenSSH's sshd and rsync (apt-get install openssh-server rsync)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-deploy-"))
    edge = f"{sys.executable} -m edge_sdk.cli"
    rows: dict[str, list[dict[str, float]]] = {"rsync floor": [], "fresh": [], "no change": [], "resumed": []}
    try:
        v1, v2 = _package(tmp, "1", args.mb), _package(tmp, "2", args.mb)
        log(f"packages: {v1.stat().st_size / 1e6:.1f} MB and {v2.stat().st_size / 1e6:.1f} MB")
        slow = tmp / "slow-rsync"
        slow.write_text('#!/bin/sh\n[ "$1" = --version ] && exec rsync --version\n'
                        'exec rsync --bwlimit=20000 "$@"\n')
        slow.chmod(0o755)
        with Sshd(tmp / "sshd") as server:
            ssh_cmd = (f"ssh -p {server.port} -i {server.identity} -o IdentitiesOnly=yes "
                       f"-o UserKnownHostsFile={server.known_hosts} -o BatchMode=yes")

            def transport(root: Path, rsync: str = "rsync") -> SshTransport:
                return SshTransport(parse_target(server.url(str(root))), identity=str(server.identity),
                                    known_hosts=str(server.known_hosts), edge_sdk=edge, rsync=rsync)

            def timed(name: str, root: Path, package: Path) -> None:
                with transport(root) as t:
                    t0 = time.perf_counter()
                    [result] = deploy(package, [(t, Options())])
                    wall = time.perf_counter() - t0
                if not result.ok:
                    raise SystemExit(f"{name}: deploy failed at {result.step}: {result.message}")
                rows[name].append({"wall_s": wall, "sent_mb": result.uploaded_bytes / 1e6})
                log(f"{name}: {wall:.2f} s, sent {result.uploaded_bytes / 1e6:.1f} MB")

            for attempt in range(args.repeat):
                root = tmp / f"device-{attempt}"
                floor = tmp / f"floor-{attempt}"
                floor.mkdir()
                t0 = time.perf_counter()
                subprocess.run(["rsync", "-e", ssh_cmd, str(v1), f"{server.user}@127.0.0.1:{floor}/"], check=True)
                rows["rsync floor"].append({"wall_s": time.perf_counter() - t0, "sent_mb": v1.stat().st_size / 1e6})
                log(f"rsync floor: {rows['rsync floor'][-1]['wall_s']:.2f} s")
                timed("fresh", root, v1)
                timed("no change", root, v1)
                killed = subprocess.Popen([sys.executable, "-c", DRIVER, server.url(str(root)), str(server.identity),
                                           str(server.known_hosts), edge, str(slow), str(v2)])
                deadline = time.monotonic() + 120
                while _partial_bytes(root) < args.mb * 500_000 and killed.poll() is None:
                    if time.monotonic() > deadline:
                        killed.kill()
                        raise SystemExit("resumed: the throttled upload never reached half the package")
                    time.sleep(0.02)
                killed.send_signal(signal.SIGKILL)
                killed.wait(10)
                log(f"resumed: first attempt killed with {_partial_bytes(root) / 1e6:.1f} MB partial")
                timed("resumed", root, v2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor_s = statistics.median(r["wall_s"] for r in rows["rsync floor"])
    summary: dict[str, Any] = {"isa": isa_info()["label"], "package_mb": args.mb, "repeat": args.repeat, "rows": {}}
    print(f"\nISA: {summary['isa']}; package {args.mb} MB; medians of {args.repeat}; ratio = wall / rsync floor")
    print(f"{'row':<12} {'wall s':>8} {'sent MB':>8} {'ratio':>6}")
    for name, samples in rows.items():
        wall = statistics.median(r["wall_s"] for r in samples)
        sent = statistics.median(r["sent_mb"] for r in samples)
        summary["rows"][name] = {"wall_s": wall, "sent_mb": sent, "ratio": wall / floor_s, "samples": samples}
        print(f"{name:<12} {wall:>8.2f} {sent:>8.1f} {wall / floor_s:>5.2f}x")
    log.write(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

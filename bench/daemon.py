"""Benchmark: image and text diagnosis over the daemon's HTTP API against in-process predict, in one run.

    python -m bench.daemon [--out build/bench/daemon.json] [--quick] [--requests 300] [--precision fp32]

Models: the demo models under ``build/demo`` (built with ``bench.prune.ensure_built`` when missing),
converted by ``edge_sdk.convert`` into packages cached under ``build/bench/daemon/`` (reused while the
model is unchanged; ``--precision int8`` calibrates on the demo's calibration data):
``surface-defects`` (EfficientNet-Lite0 + 5 classes, inputs: the held-out PNGs of ``data/test/*/``,
256x256, sent as file bytes) and ``fault-reports`` (MiniLM-L6 + 8 classes, max_length 128, inputs:
the texts of ``data/test.tsv``). Each row cycles through the same inputs.

Daemon: ``edge-sdk serve --config`` as a child process on a loopback port, configured as a user would:
both models on ``onnxruntime-cpu`` at the same precision and ``threads`` as the baseline (default:
every core), a ``[fusion]`` rule mapping both label sets onto one vocabulary (``ok``/``normal`` ->
``none``, the text faults to themselves, every image defect to ``surface_defect``), ``[events]``
with ``cooldown_s = 3600`` so that at most one event (and one JPEG snapshot) per asset and fault is
written in the whole run: event writes do not dominate, but the event rules still run on every
request. Storage under a temporary directory, token from a file, no ``[mqtt]`` (no broker, so no
publisher thread), no ``[sources]``; the ``[server]`` limits at their defaults (max_in_flight 16).

Rows, per model, ``--requests`` each (300; 60 with ``--quick``):

1. **in-process predict** (the baseline): ``edge_sdk.load(pkg, backend="onnxruntime-cpu",
   threads=T).predict(x)``, sequential, on the same inputs (image *bytes*, so decoding is included as
   in the daemon);
2. **in-process engine diagnose**: ``edge_sdk.daemon.core.Daemon`` started in this process on the same
   configuration (own storage), ``decode_upload`` + ``Daemon.diagnose_image`` / ``diagnose_text``:
   what the daemon does for a diagnosis without HTTP (fusion, event rules, metrics);
3. **HTTP GET /v2/health/live**: the transport's floor (no auth, no model, no thread hop);
4. **HTTP predict c1**: ``POST /v1/models/{name}/predict``, sequential;
5. **HTTP diagnose c1**: ``POST /v1/diagnose?asset=`` (image bytes) or JSON ``{asset, text}``, sequential;
6. **HTTP diagnose c4, c8, c32**: the same from 4, 8 and 32 client threads. The daemon bounds the work
   in flight per model (``server.max_in_flight``, default 16): beyond it a request is answered 503 with
   ``Retry-After`` at once. "503 %" is the share of requests so refused (not retried: the figure is the
   push-back itself); req/s and latencies count the answered ones.

Then **peak memory under large uploads**: ``UPLOAD_CLIENTS`` (16) clients each send a 16-bit RGB
PNG of 3000x4000 pixels (a grid on black: 0.6 MB on the wire, ~100 MB to decode) to the image model
at once, twice;
the daemon's peak RSS (``VmHWM``) growth is reported in MB and in "decodes" (what one decode alone
grows a fresh process by), against the baseline: a fresh process decoding the same 16 at once with
OpenCV and no bound;
and the answers by status (413/503 where the daemon's decode bounds refuse).

The machine is shared and noisy, so the rows are interleaved: ``--rounds`` rounds (3), each running
every row for its share of the requests, after a wait (at most 5 s) for the other processes to go
quiet and 5 untimed warm-up calls; a chunk during which they kept more than 0.3 cores busy is
measured again (3 attempts at most, the quietest kept: "retries"). A row's figures pool its chunks.

Every HTTP row uses persistent (keep-alive) connections, one ``http.client.HTTPConnection`` per client
thread, new ones per chunk (``edge_sdk.Client`` uses ``urllib``, which opens a connection per request:
that is not what is measured here). req/s is requests over the row's wall time; latency is per request
as the client sees it (p99 of 60 samples is close to the maximum). "+p50" is the row's p50 minus the
baseline's: the HTTP (or engine) overhead per request. "pipeline" is the p50 of the prediction's own
``timings_ms.total`` (preprocess + inference + postprocess inside the pipeline; an upload is decoded
before it in the daemon, inside it in-process); "outside" is the p50 of each request's latency minus
its own pipeline time: what the request spent outside the model, paired per request and so less
sensitive to the model's speed varying with the machine's load. CPU ms/req: the daemon process's and this (client)
process's CPU time over the row, per request; "others" is what the rest of the machine kept busy
(cores, from ``/proc/stat``): the noise. "agree" is top-1 agreement with the baseline's labels.

At the end the daemon is stopped with SIGTERM; its exit code and shutdown time are reported. The
machine is shared: read the ratios. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench._log import Log
import edge_sdk
from bench.prune import _fmt, _short, ensure_built

IMAGE, TEXT = "surface-defects", "fault-reports"
TEXT_FAULTS = ("bearing_wear", "overheating", "lubrication", "misalignment", "electrical_fault", "sensor_failure",
               "leak")
RULE: dict[str, Any] = {
    "faults": ["none", *TEXT_FAULTS, "surface_defect"],
    "normal": "none",
    "models": {
        IMAGE: {"map": {"ok": "none", "*": "surface_defect"}},
        TEXT: {"map": {"normal": "none", **{f: f for f in TEXT_FAULTS}}},
    },
}
ASSETS = {"image": "press-4", "text": "pump-7"}
COOLDOWN_S = 3600
ROUNDS = 3
WARMUP = 5  # untimed calls before every chunk
CLIENTS = (4, 8, 32)  # client threads of the concurrent diagnose rows
UPLOAD_CLIENTS = 16  # concurrent large uploads in the memory section
UPLOAD_SIZE = (3000, 4000)  # height, width of the 16-bit PNG sent (a legal upload that decodes large)
# Other processes share the cores: a chunk starts once they keep < QUIET_CORES busy (waiting at most
# QUIET_WAIT_S). The wait (0.3 s at least) also lets a thread pool that still spins go idle first.
# A chunk during which they kept > NOISY_CORES busy is measured again (ATTEMPTS in all; the quietest kept).
QUIET_CORES = 0.2
QUIET_WAIT_S = 5.0
NOISY_CORES = 0.3
ATTEMPTS = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")
log = Log("daemon")


# --- packages and inputs -------------------------------------------------------------------------


def package_for(kind: str, root: Path, precision: str, work: Path) -> Path:
    """The demo model as a package, converted once and reused while the model is unchanged."""
    model = root / "model.onnx"
    name = IMAGE if kind == "image" else TEXT
    target = work / f"{name}.{precision}.edgepkg"
    if target.exists() and target.stat().st_mtime >= model.stat().st_mtime:
        return target
    if kind == "image":
        kwargs: dict[str, Any] = dict(task="image-classification", labels=root / "labels.txt",
                                      preprocess=root / "preprocess.json", calibration=root / "data" / "calib")
    else:
        kwargs = dict(task="text-classification", labels=root / "labels.txt", tokenizer=root / "tokenizer.json",
                      max_length=128, calibration=root / "data" / "calib.txt")
    if precision == "int8":
        kwargs["quantize"] = "int8"
    else:
        kwargs.pop("calibration")
    log(f"converting {model} ({precision}) -> {target}")
    report = edge_sdk.convert(model, target, name=name, **kwargs)
    return Path(report.package)


def load_inputs(root: Path, kind: str) -> list[Any]:
    if kind == "image":
        paths = sorted((root / "data" / "test").glob("*/*.png"))
        # <label>_<n>.png: interleave the labels, so that any stretch of requests holds every class
        paths.sort(key=lambda p: (p.stem.rsplit("_", 1)[-1], p.parent.name))
        inputs: list[Any] = [p.read_bytes() for p in paths]
    else:
        lines = (root / "data" / "test.tsv").read_text(encoding="utf-8").splitlines()
        inputs = [text for _, _, text in (line.partition("\t") for line in lines) if text.strip()]
    if not inputs:
        raise SystemExit(f"no held-out {kind} inputs under {root / 'data'}; run `make demo`")
    return inputs


def write_config(tmp: Path, port: int, packages: dict[str, Path], precision: str, threads: int) -> Path:
    token = tmp / "token"
    token.write_text(os.urandom(24).hex() + "\n")
    token.chmod(0o600)
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", f"token_file = {q(str(token))}", "",
             "[storage]", f"dir = {q(str(tmp / 'state'))}", "",
             "[events]", "min_confidence = 0.5", f"cooldown_s = {COOLDOWN_S}", "snapshots = true", ""]
    for name, package in packages.items():
        lines += [f"[models.{name}]", f"package = {q(str(package.resolve()))}", 'backend = "onnxruntime-cpu"',
                  f"precision = {q(precision)}", f"threads = {threads}", ""]
    lines += ["[fusion]", f"faults = {q(RULE['faults'])}", f"normal = {q(RULE['normal'])}", ""]
    for name, spec in RULE["models"].items():
        table = ", ".join(f"{q(k)} = {q(v)}" for k, v in spec["map"].items())
        lines += [f"[fusion.models.{name}]", f"map = {{{table}}}", ""]
    path = tmp / "edge-sdk.toml"
    path.write_text("\n".join(lines))
    return path


# --- the daemon process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int | None) -> float:
    """utime + stime of a process, every thread included (0 without a pid)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Meter:
    """Wall time, CPU seconds of this process and of the daemon, and the cores other processes kept busy."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._wall, self._cpu, self._daemon, self._ticks = (time.perf_counter(), time.process_time(),
                                                             proc_cpu_s(pid), _machine_ticks())

    def stop(self) -> tuple[float, float, float, float]:
        """(wall s, this process's CPU s, the daemon's CPU s, other processes' cores)."""
        wall, cpu, daemon = (time.perf_counter() - self._wall, time.process_time() - self._cpu,
                             proc_cpu_s(self.pid) - self._daemon)
        busy, total = (now - then for now, then in zip(_machine_ticks(), self._ticks))
        machine = (os.cpu_count() or 1) * busy / total if total else 0.0
        return wall, cpu, daemon, max(0.0, machine - (cpu + daemon) / wall)


def wait_quiet(pid: int | None) -> float:
    """Wait up to QUIET_WAIT_S for 0.3 s in which other processes keep < QUIET_CORES busy; their load."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        meter = Meter(pid)
        time.sleep(0.3)
        load = meter.stop()[3]
        if load < QUIET_CORES or time.monotonic() >= deadline:
            return load


class DaemonProcess:
    """``edge-sdk serve --config`` as a child process; its log goes to a file next to the config."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port, self.log = config, port, config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk.cli", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 180.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the daemon was not ready after {timeout:.0f} s:\n{self.tail()}")

    def terminate(self, timeout: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM, then wait: (exit code, seconds to exit); (None, ...) if it had to be killed."""
        if self.proc is None:
            return None, 0.0
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = None
        return code, time.perf_counter() - started

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# --- measurement -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One way of serving the model, measured in chunks over the rounds; its figures pool the chunks."""

    kind: str
    name: str
    concurrency: int
    make_call: Callable[[], Call] = field(repr=False)
    pid: int | None = None  # the daemon's, when the row goes through it
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    pipeline_ms: list[float] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)  # per request: latency - pipeline ms
    labels: dict[int, str] = field(default_factory=dict)  # request index -> label
    round_rps: list[float] = field(default_factory=list)
    daemon_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    others_core_s: float = 0.0
    errors: int = 0
    refused: int = 0  # of the errors: 503 (server.max_in_flight reached)
    first_error: str | None = None
    retries: int = 0

    @property
    def rps(self) -> float | None:
        return len(self.latencies_ms) / self.wall_s if self.wall_s and self.latencies_ms else None

    @property
    def p50(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else None

    def summary(self, base: Row) -> dict[str, Any]:
        lat, n = np.asarray(self.latencies_ms), max(len(self.latencies_ms), 1)
        p50, rps = self.p50, self.rps
        common = sorted(set(base.labels) & set(self.labels))
        return {
            "kind": self.kind, "row": self.name, "concurrency": self.concurrency, "ok": len(lat),
            "errors": self.errors, "refused_503": self.refused,
            "refused_pct": 100.0 * self.refused / (len(lat) + self.errors) if len(lat) + self.errors else None,
            "first_error": self.first_error, "wall_s": self.wall_s, "retries": self.retries,
            "req_per_s": rps, "req_per_s_by_round": self.round_rps,
            "x_in_process": rps / base.rps if rps and base.rps else None,
            "p50_ms": p50, "p90_ms": float(np.percentile(lat, 90)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None,
            "overhead_p50_ms": p50 - base.p50 if p50 is not None and base.p50 is not None else None,
            "pipeline_p50_ms": statistics.median(self.pipeline_ms) if self.pipeline_ms else None,
            "outside_pipeline_p50_ms": statistics.median(self.outside_ms) if self.outside_ms else None,
            "daemon_cpu_ms_per_req": 1e3 * self.daemon_cpu_s / n if self.pid else None,
            "client_cpu_ms_per_req": 1e3 * self.client_cpu_s / n,
            "others_cores": self.others_core_s / self.wall_s if self.wall_s else None,
            "agree_pct": (100.0 * sum(base.labels[i] == self.labels[i] for i in common) / len(common)
                          if common else None),
        }


Call = Callable[[Any], tuple[str | None, float | None]]  # input -> (label, pipeline ms)


@dataclass
class Chunk:
    wall_s: float
    client_cpu_s: float
    daemon_cpu_s: float
    others_cores: float
    results: list[tuple[int, float, str | None, float | None]]  # (request index, ms, label, pipeline ms)
    errors: list[str]


def measure_chunk(row: Row, inputs: list[Any], first: int, count: int) -> Chunk:
    """Requests ``first .. first + count - 1`` (inputs cycled) from ``row.concurrency`` threads, each with
    its own call (connection: new ones every chunk, so none outlives the server's keep-alive timeout)."""
    wait_quiet(row.pid)  # first: a wait longer than the server's keep-alive timeout would close the connections
    calls = [row.make_call() for _ in range(row.concurrency)]
    for i in range(WARMUP):
        calls[i % len(calls)](inputs[(first + i) % len(inputs)])
    results: list[tuple[int, float, str | None, float | None]] = []
    errors: list[str] = []
    todo = iter(range(first, first + count))
    lock = threading.Lock()

    def worker(call: Call) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                label, pipeline_ms = call(inputs[i % len(inputs)])
            except Exception as exc:  # recorded, not fatal: the row shows its errors
                errors.append(_short(exc))
                continue
            results.append((i, (time.perf_counter() - start) * 1e3, label, pipeline_ms))

    meter = Meter(row.pid)
    threads = [threading.Thread(target=worker, args=(c,)) for c in calls[1:]]
    for t in threads:
        t.start()
    worker(calls[0])
    for t in threads:
        t.join()
    return Chunk(*meter.stop(), results=sorted(results), errors=errors)


def run_chunk(row: Row, inputs: list[Any], first: int, count: int) -> None:
    """Measure one chunk of ``row``; again (ATTEMPTS in all) while other processes kept more than
    NOISY_CORES busy, the quietest attempt kept."""
    attempts = [measure_chunk(row, inputs, first, count)]
    while attempts[-1].others_cores > NOISY_CORES and len(attempts) < ATTEMPTS:
        attempts.append(measure_chunk(row, inputs, first, count))
    chunk = min(attempts, key=lambda c: c.others_cores)
    row.retries += len(attempts) - 1
    row.wall_s += chunk.wall_s
    row.client_cpu_s += chunk.client_cpu_s
    row.daemon_cpu_s += chunk.daemon_cpu_s
    row.others_core_s += chunk.others_cores * chunk.wall_s
    row.errors += len(chunk.errors)
    row.refused += sum(" -> 503:" in e for e in chunk.errors)
    row.first_error = row.first_error or next(iter(chunk.errors), None)
    row.round_rps.append(len(chunk.results) / chunk.wall_s)
    for i, ms, label, pipeline_ms in chunk.results:
        row.latencies_ms.append(ms)
        if label is not None:
            row.labels[i] = label
        if pipeline_ms is not None:
            row.pipeline_ms.append(pipeline_ms)
            row.outside_ms.append(ms - pipeline_ms)


class Http:
    """One keep-alive connection with the bearer token; a response other than 200 raises."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        headers = {**self.headers, **({"Content-Type": content_type} if content_type else {})}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path} -> {response.status}: {data[:200]!r}")
        return json.loads(data)


def http_calls(kind: str, port: int, token: str) -> dict[str, Callable[[], Call]]:
    """Per route, a factory of calls that each hold their own keep-alive connection."""
    model = IMAGE if kind == "image" else TEXT
    predict_path = f"/v1/models/{model}/predict"
    diagnose_path = "/v1/diagnose" + (f"?asset={urllib.parse.quote(ASSETS[kind])}" if kind == "image" else "")

    def body(x: Any, **fields: str) -> tuple[bytes, str]:
        return (x, "image/png") if kind == "image" else (json.dumps({**fields, "text": x}).encode(), "application/json")

    def live() -> Call:
        h = Http(port, token)

        def call(x: Any) -> tuple[None, None]:
            h.call("GET", "/v2/health/live")
            return None, None

        return call

    def predict() -> Call:
        h = Http(port, token)

        def call(x: Any) -> tuple[str, float]:
            p = h.call("POST", predict_path, *body(x))["predictions"][0]
            return p["label"], p["timings_ms"]["total"]

        return call

    def diagnose() -> Call:
        h = Http(port, token)
        fields = {} if kind == "image" else {"asset": ASSETS[kind]}

        def call(x: Any) -> tuple[str, float]:
            p = h.call("POST", diagnose_path, *body(x, **fields))["prediction"]
            return p["label"], p["timings_ms"]["total"]

        return call

    return {"live": live, "predict": predict, "diagnose": diagnose}


def bench_kind(kind: str, package: Path, inputs: list[Any], daemon: DaemonProcess, engine: Any, token: str,
               args: argparse.Namespace) -> dict[str, Any]:
    from edge_sdk.daemon.uploads import decode_upload

    pid = daemon.proc.pid if daemon.proc else None
    with edge_sdk.load(package, backend="onnxruntime-cpu", threads=args.threads, precision=args.precision) as model:
        def in_process() -> Call:
            return lambda x: (lambda p: (p.label, p.timings.total_ms))(model.predict(x))

        def in_engine() -> Call:
            def call(x: Any) -> tuple[str, float]:
                outcome = (engine.diagnose_image(ASSETS[kind], decode_upload(x)) if kind == "image"
                           else engine.diagnose_text(ASSETS[kind], x))
                return outcome.prediction.label, outcome.prediction.timings.total_ms
            return call

        calls = http_calls(kind, daemon.port, token)
        rows = [Row(kind, "in-process predict", 1, in_process),
                Row(kind, "in-process engine diagnose", 1, in_engine),
                Row(kind, "HTTP GET /v2/health/live", 1, calls["live"], pid),
                Row(kind, "HTTP predict", 1, calls["predict"], pid),
                Row(kind, "HTTP diagnose", 1, calls["diagnose"], pid),
                *(Row(kind, "HTTP diagnose", c, calls["diagnose"], pid) for c in CLIENTS)]
        per_round = [args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)]
        for r, count in enumerate(per_round):
            first = sum(per_round[:r])
            for row in rows:
                run_chunk(row, inputs, first, count)
            figures = ", ".join(f"{row.name} c{row.concurrency} {row.round_rps[-1]:.0f}" for row in rows)
            log(f"{kind}: round {r + 1}/{args.rounds} (req/s): {figures}")
    base = rows[0]
    return {"package": str(package), "inputs": len(inputs), "asset": ASSETS[kind], "rounds": per_round,
            "rows": [r.summary(base) for r in rows]}


# --- report -------------------------------------------------------------------------------------------


def print_table(kind: str, result: dict[str, Any], meta: dict[str, Any]) -> None:
    print(f"\n== {kind}: {result['package']} ({meta['precision']}, onnxruntime-cpu, threads {meta['threads']}), "
          f"{meta['requests']} requests per row in {len(result['rounds'])} interleaved rounds, cycling "
          f"{result['inputs']} held-out inputs ==")
    print(f"{'row':<28}{'conc':>5}{'req/s':>8}{'x base':>8}{'p50 ms':>8}{'p99 ms':>8}{'+p50 ms':>9}"
          f"{'pipeline':>9}{'outside':>8}{'daemon CPU':>11}{'client CPU':>11}{'others':>7}{'agree':>7}{'retry':>6}"
          f"{'503':>6}  errors")
    print(f"{'':<28}{'':>5}{'':>8}{'':>8}{'':>8}{'':>8}{'':>9}{'p50 ms':>9}{'p50 ms':>8}{'ms/req':>11}{'ms/req':>11}"
          f"{'cores':>7}{'%':>7}{'':>6}{'%':>6}")
    for s in result["rows"]:
        print(f"{s['row']:<28}{s['concurrency']:>5}{_fmt(s['req_per_s'], '.1f'):>8}{_fmt(s['x_in_process'], '.2f'):>8}"
              f"{_fmt(s['p50_ms'], '.2f'):>8}{_fmt(s['p99_ms'], '.2f'):>8}{_fmt(s['overhead_p50_ms'], '+.2f'):>9}"
              f"{_fmt(s['pipeline_p50_ms'], '.2f'):>9}{_fmt(s['outside_pipeline_p50_ms'], '.2f'):>8}"
              f"{_fmt(s['daemon_cpu_ms_per_req'], '.2f'):>11}"
              f"{_fmt(s['client_cpu_ms_per_req'], '.2f'):>11}{_fmt(s['others_cores'], '.2f'):>7}"
              f"{_fmt(s['agree_pct'], '.1f'):>7}{s['retries']:>6}{_fmt(s['refused_pct'], '.1f'):>6}  "
              f"{s['errors'] or ''} {s['first_error'] or '' if s['errors'] != s['refused_503'] else ''}")


def vm_kib(pid: int | None, key: str) -> int | None:
    """``VmHWM``/``VmRSS`` of ``pid`` in KiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def upload_memory(daemon: DaemonProcess, token: str) -> dict[str, Any]:
    """Peak RSS of the daemon while UPLOAD_CLIENTS clients send a large legal image at once (two waves)."""
    import cv2

    h, w = UPLOAD_SIZE
    image = np.zeros((h, w, 3), np.uint16)  # a grid on black: a small file that decodes large
    image[::97], image[:, ::89, 1] = 65535, 30000
    ok, data = cv2.imencode(".png", image)
    body = data.tobytes()
    pid = daemon.proc.pid if daemon.proc else None
    before_hwm, before_rss = vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def send() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
        try:
            conn.request("POST", f"/v1/models/{IMAGE}/predict", body=body,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
            status = str(conn.getresponse().status)
        except OSError as exc:
            status = type(exc).__name__
        finally:
            conn.close()
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    for _ in range(2):
        threads = [threading.Thread(target=send) for _ in range(UPLOAD_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after_hwm = vm_kib(pid, "VmHWM")
    one, unbounded = unbounded_growth_mb(body, 1), unbounded_growth_mb(body, UPLOAD_CLIENTS)
    log(f"uploads: {UPLOAD_CLIENTS} x 2 of {len(body) / 2 ** 20:.1f} MB -> {statuses}; peak RSS "
        f"{(before_hwm or 0) / 1024:.0f} -> {(after_hwm or 0) / 1024:.0f} MB")
    growth = ((after_hwm or 0) - (before_hwm or 0)) / 1024
    return {"clients": UPLOAD_CLIENTS, "waves": 2, "image": f"{w}x{h} 16-bit RGB PNG", "body_mb": len(body) / 2 ** 20,
            "statuses": statuses, "wall_s": time.perf_counter() - started,
            "rss_before_mb": (before_rss or 0) / 1024, "peak_rss_before_mb": (before_hwm or 0) / 1024,
            "peak_rss_after_mb": (after_hwm or 0) / 1024, "daemon_growth_mb": growth,
            "one_decode_mb": one, "unbounded_growth_mb": unbounded,
            "daemon_growth_in_decodes": growth / one if one else None,
            "unbounded_growth_in_decodes": unbounded / one if one else None,
            "x_unbounded": growth / unbounded if unbounded else None}


UNBOUNDED = """
import sys, threading, cv2, numpy as np
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
data = np.frombuffer(sys.stdin.buffer.read(), np.uint8)
clients = int(sys.argv[1])
before, start = hwm(), threading.Barrier(clients)
def decode():
    start.wait()
    cv2.imdecode(data, cv2.IMREAD_COLOR)
threads = [threading.Thread(target=decode) for _ in range(clients)]
[t.start() for t in threads]
[t.join() for t in threads]
print((hwm() - before) / 1024)
"""


def unbounded_growth_mb(body: bytes, clients: int) -> float:
    """The baseline: peak RSS growth of a fresh process decoding ``clients`` copies at once with OpenCV
    and no bound (what the daemon did before its decode budget)."""
    out = subprocess.run([sys.executable, "-c", UNBOUNDED, str(clients)], input=body, capture_output=True,
                         check=True, timeout=300)
    return float(out.stdout.decode().strip())


def print_uploads(u: dict[str, Any]) -> None:
    print(f"\n== peak memory: {u['clients']} clients x {u['waves']} waves, each a {u['image']} "
          f"({u['body_mb']:.1f} MB body; one decode alone grows a fresh process by {u['one_decode_mb']:.0f} MB) ==")
    print(f"answers {u['statuses']}; daemon RSS {u['rss_before_mb']:.0f} MB before, peak {u['peak_rss_before_mb']:.0f}"
          f" -> {u['peak_rss_after_mb']:.0f} MB: +{u['daemon_growth_mb']:.0f} MB = "
          f"{_fmt(u['daemon_growth_in_decodes'], '.1f')} decodes; baseline (OpenCV, {u['clients']} at once, no "
          f"bound): +{u['unbounded_growth_mb']:.0f} MB = {_fmt(u['unbounded_growth_in_decodes'], '.1f')} decodes; "
          f"daemon/baseline {_fmt(u['x_unbounded'], '.2f')}x")


def http_stack() -> str:
    """The daemon's HTTP stack: uvicorn with h11 under edge_sdk.daemon.limits' guards."""
    import starlette
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {uvicorn.__version__} (h11 + timeouts/connection guard, {loop}), starlette {starlette.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/daemon.json"))
    parser.add_argument("--build", type=Path, default=Path("build/demo"), help="where the demo models are (built)")
    parser.add_argument("--work", type=Path, default=Path("build/bench/daemon"), help="package cache")
    parser.add_argument("--requests", type=int, help="requests per row (default 300; 60 with --quick)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="onnxruntime threads per model, in-process and in the daemon (default: every core)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rows interleaved in this many chunks each")
    parser.add_argument("--models", default="image,text", help="comma-separated subset of image,text")
    parser.add_argument("--quick", action="store_true", help="60 requests per row")
    args = parser.parse_args(argv)
    args.requests = args.requests or (60 if args.quick else 300)
    kinds = [k for k in args.models.split(",") if k]
    ensure_built(args.build)
    args.work.mkdir(parents=True, exist_ok=True)
    packages = {IMAGE if k == "image" else TEXT: package_for(k, args.build / k, args.precision, args.work)
                for k in kinds}
    meta: dict[str, Any] = {"precision": args.precision, "threads": args.threads, "cores": os.cpu_count(),
                            "requests": args.requests, "rounds": args.rounds, "warmup_per_chunk": WARMUP,
                            "quick": args.quick,
                            "http": http_stack(), "client": "http.client.HTTPConnection, keep-alive, one per thread",
                            "events_cooldown_s": COOLDOWN_S, "mqtt": False}
    results: dict[str, Any] = {**meta, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        config = write_config(tmp, port, packages, args.precision, args.threads)
        token = (tmp / "token").read_text().strip()
        daemon = DaemonProcess(config, port)
        log(f"starting the daemon ({meta['http']}) on port {daemon.port}; config {config}")
        daemon.start()
        engine = None
        try:
            from edge_sdk.daemon.config import DaemonConfig
            from edge_sdk.daemon.core import Daemon

            cfg = DaemonConfig.load(config)
            engine = Daemon(dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, dir=tmp / "engine")))
            engine.start()  # loads while the daemon loads: not timed
            daemon.wait_ready()
            log("daemon ready")
            inputs = {k: load_inputs(args.build / k, k) for k in kinds}
            for kind in kinds:
                package = packages[IMAGE if kind == "image" else TEXT]
                result = bench_kind(kind, package, inputs[kind], daemon, engine, token, args)
                results["models"][kind] = result
                print_table(kind, result, meta)
            results["events_written"] = len(Http(daemon.port, token).call("GET", "/v1/events?limit=1000")["events"])
            if "image" in kinds:
                results["uploads"] = upload_memory(daemon, token)
                print_uploads(results["uploads"])
        finally:
            if engine is not None:
                engine.stop()
            code, stop_s = daemon.terminate()
            results["daemon_exit_code"], results["daemon_stop_s"] = code, stop_s
            results["daemon_log_tail"] = daemon.tail(2000)
    print(f"\nHTTP: {meta['http']}; client {meta['client']}; events: cooldown {COOLDOWN_S} s, "
          f"{results.get('events_written', '-')} written by the daemon; no MQTT")
    print(f"daemon stopped with SIGTERM: exit code {code} after {stop_s:.2f} s")
    log.write(results, args.out)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

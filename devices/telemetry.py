"""Live device telemetry: memory, CPU and GPU load, temperatures and power rails.

On a Jetson, ``tegrastats`` prints one line per interval; :func:`parse_tegrastats` reads the
formats of JetPack 4, 5 and 6 (and L4T 38) into a frozen :class:`Telemetry`. Elsewhere (x86,
or a Jetson whose ``tegrastats`` died) :func:`read_sysfs` reads the thermal zones under
``sys/class/thermal``, ``proc/meminfo`` and the per-core counters of ``proc/stat`` (load between
two polls) relative to a root path, so tests use a fake root and any Linux machine still reports
temperatures, memory and CPU load.

:class:`TelemetrySampler` keeps the latest reading: it runs ``tegrastats --interval MS`` as a
subprocess with a reader thread when the binary is on ``PATH``, else polls sysfs. A line it
cannot read is logged once and skipped; nothing in the sampler raises into the daemon.

Zone names are lower-cased and lose the ``-therm``/``-thermal``/``_tegra`` suffixes, so
JetPack 5's ``CPU@41C``, JetPack 6's ``cpu@41C`` and sysfs ``CPU-therm`` all become ``cpu``.
Sensors that are switched off (tegrastats prints ``-256C``) and the PMIC's fixed placeholder
reading (``PMIC@100C`` / ``PMIC-Die``: a constant, not a measurement) are left out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any

from edge_sdk.errors import DeviceError

__all__ = ["Telemetry", "TelemetrySampler", "cpu_percent", "parse_tegrastats", "read_cpu_times", "read_sysfs"]

_log = logging.getLogger(__name__)

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]", re.IGNORECASE)
_CORE = re.compile(r"^(\d+(?:\.\d+)?)%")
_GPU = re.compile(r"\bGR3D(?:_FREQ)? (\d+(?:\.\d+)?)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# "VDD_IN 4316mW/4316mW" (JetPack 5/6) or "POM_5V_IN 2636/2636" (JetPack 4): current/average.
# The lookahead keeps "RAM 2448/7772MB" and "SWAP 0/3886MB" out.
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = frozenset({"NC"})  # AGX Orin lists unconnected INA channels as "NC 0mW/0mW"
_NOT_SENSORS = frozenset({"pmic", "pmic-die"})  # a fixed value from the PMIC's trip driver
_SENSOR_OFF_BELOW_C = -100.0  # tegrastats prints -256C for a switched-off sensor
_ZONE_SUFFIXES = ("-thermal", "-therm", "_tegra")
_THERMAL = "sys/class/thermal"
_MEMINFO = "proc/meminfo"
_MAX_READ = 64 * 1024


@dataclass(frozen=True)
class Telemetry:
    """One reading of the device. ``None`` / empty means "not reported by this source"."""

    timestamp: float  # time.time() when the reading was taken
    source: str  # "tegrastats" or "sysfs"
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    cpu_percent: tuple[float | None, ...] = ()  # per core; None = core offline
    gpu_percent: float | None = None
    temperatures: Mapping[str, float] = field(default_factory=dict)  # {zone: celsius}
    power_mw: Mapping[str, int] = field(default_factory=dict)  # {rail: current mW}

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", MappingProxyType(dict(self.temperatures)))
        object.__setattr__(self, "power_mw", MappingProxyType(dict(self.power_mw)))

    @property
    def cpu_mean_percent(self) -> float | None:
        """Mean load of the online cores, or None when no core was reported."""
        online = [value for value in self.cpu_percent if value is not None]
        return sum(online) / len(online) if online else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "timestamp": self.timestamp,
            "source": self.source,
            "ram_used_mb": self.ram_used_mb,
            "ram_total_mb": self.ram_total_mb,
            "cpu_percent": list(self.cpu_percent),
            "cpu_mean_percent": self.cpu_mean_percent,
            "gpu_percent": self.gpu_percent,
            "temperatures": dict(self.temperatures),
            "power_mw": dict(self.power_mw),
        }


def _zone_name(raw: str) -> str:
    name = raw.strip().lower()
    for suffix in _ZONE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _cores(line: str) -> tuple[float | None, ...]:
    match = _CPU.search(line)
    if match is None:
        return ()
    cores: list[float | None] = []
    for entry in match.group(1).split(","):
        core = _CORE.match(entry.strip())
        cores.append(float(core.group(1)) if core else None)  # "off"
    return tuple(cores)


def _temperatures(line: str) -> dict[str, float]:
    temperatures: dict[str, float] = {}
    for raw, value in _TEMP.findall(line):
        name, celsius = _zone_name(raw), float(value)
        if name not in _NOT_SENSORS and celsius > _SENSOR_OFF_BELOW_C:
            temperatures.setdefault(name, celsius)
    return temperatures


def _power(line: str) -> dict[str, int]:
    rails: dict[str, int] = {}
    for name, current, _average in _POWER.findall(line):
        if name not in _NOT_RAILS:
            rails.setdefault(name, int(current))
    return rails


def parse_tegrastats(line: str, timestamp: float | None = None) -> Telemetry:
    """Read one ``tegrastats`` line (any JetPack). Raises ``DeviceError`` without a RAM field."""
    ram = _RAM.search(line)
    if ram is None:
        shown = line.strip()[:120]
        raise DeviceError(
            f"tegrastats line {shown!r} has no 'RAM used/totalMB' field; expected a line such as "
            "'RAM 2448/7772MB (lfb 1x4MB) SWAP 0/3886MB CPU [12%@1190,...] ...'",
            hint="run 'tegrastats --interval 1000' by hand to see what this device prints",
        )
    gpu = _GPU.search(line)
    return Telemetry(
        timestamp=time.time() if timestamp is None else timestamp,
        source="tegrastats",
        ram_used_mb=int(ram.group(1)),
        ram_total_mb=int(ram.group(2)),
        cpu_percent=_cores(line),
        gpu_percent=float(gpu.group(1)) if gpu else None,
        temperatures=_temperatures(line),
        power_mw=_power(line),
    )


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(_MAX_READ).decode("utf-8", errors="replace")
    except OSError as exc:  # a disabled zone answers EINVAL or ENODATA
        _log.debug("telemetry: cannot read %s: %s", path, exc.strerror or type(exc).__name__)
        return None


def _zone_number(path: Path) -> int:
    digits = path.name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else -1


def _sysfs_temperatures(root: Path) -> dict[str, float]:
    temperatures: dict[str, float] = {}
    for zone in sorted((root / _THERMAL).glob("thermal_zone*"), key=_zone_number):
        kind, temp = _read(zone / "type"), _read(zone / "temp")
        if not kind or not kind.strip() or temp is None:
            continue
        try:
            celsius = int(temp.strip()) / 1000.0
        except ValueError:
            _log.debug("telemetry: %s/temp holds %r, not millidegrees", zone, temp.strip()[:40])
            continue
        name = _zone_name(kind)
        if name in _NOT_SENSORS or celsius <= _SENSOR_OFF_BELOW_C:
            continue
        if name in temperatures:  # two zones of one type, e.g. "acpitz" twice on a PC
            name = f"{name}_{_zone_number(zone)}"
        temperatures[name] = celsius
    return temperatures


def _sysfs_memory(root: Path) -> tuple[int | None, int | None]:
    """(used MB, total MB) from meminfo: used = MemTotal - MemAvailable, as ``free`` shows."""
    text = _read(root / _MEMINFO)
    if text is None:
        return None, None
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    total = kb.get("MemTotal")
    if total is None:
        return None, None
    available = kb.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(kb.get(key, 0) for key in ("MemFree", "Buffers", "Cached"))
    return (total - available) // 1024, total // 1024


#: ``proc/stat`` per-core counters: cpuN user nice system idle iowait irq softirq steal ...
_CPU_LINE = re.compile(r"^cpu(\d+)\s+(.*)$")
CpuTimes = dict[int, tuple[int, int]]  # core -> (busy jiffies, total jiffies)


def read_cpu_times(root: str | os.PathLike[str] = "/") -> CpuTimes:
    """Each core's busy and total time so far from ``proc/stat`` under ``root`` (idle and iowait
    are not busy; guest time is already inside user). Empty when the file cannot be read."""
    text = _read(Path(os.fspath(root)) / "proc" / "stat")
    out: CpuTimes = {}
    for line in (text or "").splitlines():
        match = _CPU_LINE.match(line)
        if not match:
            continue
        try:
            fields = [int(v) for v in match.group(2).split()[:8]]
        except ValueError:
            continue
        if len(fields) < 4:
            continue
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields)
        out[int(match.group(1))] = (total - idle, total)
    return out


def cpu_percent(before: CpuTimes, after: CpuTimes) -> tuple[float | None, ...]:
    """Per-core load between two ``read_cpu_times`` readings, cores in order; None for a core
    missing from either reading (offline) or with no time elapsed."""
    if not after:
        return ()
    loads: list[float | None] = []
    for core in range(max(after) + 1):
        if core not in before or core not in after:
            loads.append(None)
            continue
        busy, total = after[core][0] - before[core][0], after[core][1] - before[core][1]
        loads.append(min(max(100.0 * busy / total, 0.0), 100.0) if total > 0 else None)
    return tuple(loads)


def read_sysfs(root: str | os.PathLike[str] = "/", timestamp: float | None = None,
               cpu_before: CpuTimes | None = None) -> Telemetry:
    """Temperatures and memory from ``sys/class/thermal`` and ``proc/meminfo`` under ``root``;
    with ``cpu_before`` (an earlier ``read_cpu_times``) also each core's load since then."""
    base = Path(os.fspath(root))
    used, total = _sysfs_memory(base)
    return Telemetry(
        timestamp=time.time() if timestamp is None else timestamp,
        source="sysfs",
        ram_used_mb=used,
        ram_total_mb=total,
        cpu_percent=cpu_percent(cpu_before, read_cpu_times(base)) if cpu_before is not None else (),
        temperatures=_sysfs_temperatures(base),
    )


class TelemetrySampler:
    """Keeps the latest :class:`Telemetry`: from ``tegrastats`` when it is on ``path``, else sysfs.

    ``path`` is the search path for ``tegrastats`` and the child's ``PATH`` (default: this
    process's ``PATH``); ``tegrastats`` may also be an absolute path. Use ``start()``/``stop()``
    or a ``with`` block. If ``tegrastats`` exits on its own, the sampler falls back to sysfs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        interval_s: float = 1.0,
        tegrastats: str = "tegrastats",
        *,
        path: str | None = None,
    ) -> None:
        if not interval_s > 0:
            raise DeviceError(f"telemetry interval_s={interval_s!r} is not a positive number of seconds",
                              hint="pass interval_s=1.0 for one reading a second")
        self.root = Path(os.fspath(root))
        self.interval_s = interval_s
        self._path = path
        self._executable = shutil.which(tegrastats, path=path)
        self._latest: Telemetry | None = None
        self._mode = "stopped"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[str] | None = None
        self._warned = False

    @property
    def mode(self) -> str:
        """"tegrastats", "sysfs" or "stopped"."""
        return self._mode

    def latest(self) -> Telemetry | None:
        """The newest reading, or None before the first one."""
        return self._latest

    def start(self) -> TelemetrySampler:
        if self._thread is not None:
            return self
        self._stop.clear()
        process = self._spawn() if self._executable else None
        target: Callable[[], None]
        if process is not None:
            self._process, self._mode = process, "tegrastats"
            target = self._read_tegrastats
        else:
            self._mode, target = "sysfs", self._poll_sysfs
        self._thread = threading.Thread(target=target, name="edge-sdk-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sampling; terminates ``tegrastats`` (then kills it after ``timeout_s``)."""
        self._stop.set()
        process, self._process = self._process, None
        if process is not None:
            _end(process, timeout_s)  # the reader thread then sees the end of the pipe
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if process is not None and process.stdout is not None:
            process.stdout.close()
        self._mode = "stopped"

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _spawn(self) -> subprocess.Popen[str] | None:
        interval_ms = max(1, round(self.interval_s * 1000))
        env = dict(os.environ) if self._path is None else {**os.environ, "PATH": self._path}
        command = [str(self._executable), "--interval", str(interval_ms)]
        try:
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        except OSError as exc:
            _log.warning("telemetry: cannot start %s (%s); reading sysfs instead", command[0], exc)
            return None

    def _read_tegrastats(self) -> None:
        process = self._process
        stdout: IO[str] | None = process.stdout if process else None
        if process is None or stdout is None:
            return
        try:
            for line in stdout:
                if self._stop.is_set():
                    return
                self._accept(line)
        except (OSError, ValueError) as exc:  # a pipe error: treat it as the end of the output
            _log.debug("telemetry: reading tegrastats failed: %s", exc)
        code = process.wait()
        if not self._stop.is_set():
            _log.warning("telemetry: tegrastats exited with code %s; reading sysfs instead", code)
            self._mode = "sysfs"
            self._poll_sysfs()

    def _accept(self, line: str) -> None:
        if not line.strip():
            return
        try:
            self._latest = parse_tegrastats(line)
        except DeviceError as exc:
            self._warn_once("telemetry: skipping a tegrastats line: %s", exc)
        except Exception:  # noqa: BLE001 - a parser bug must not stop the daemon
            self._warn_once("telemetry: failed to parse tegrastats line %r", line.strip()[:120], exc_info=True)

    def _poll_sysfs(self) -> None:
        before = read_cpu_times(self.root)
        while not self._stop.is_set():
            try:
                self._latest = read_sysfs(self.root, cpu_before=before)
                before = read_cpu_times(self.root)
            except Exception:  # noqa: BLE001 - same reason as in _accept
                self._warn_once("telemetry: reading sysfs under %s failed", self.root, exc_info=True)
            self._stop.wait(self.interval_s)

    def _warn_once(self, message: str, *args: object, exc_info: bool = False) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        _log.log(level, message, *args, exc_info=exc_info)


def _end(process: subprocess.Popen[str], timeout_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

"""Detect what machine this is by reading files under a root directory.

``detect()`` reads ``/proc``, ``/sys``, ``/etc`` and ``/usr/local/cuda`` relative to
``root`` (so tests point it at a fake root in ``tmp_path``) and, on the live machine
only unless asked, imports the optional Python modules (onnxruntime, tensorrt, pycuda,
cuda-python) to read their versions and asks the CUDA driver for the GPU's compute capability. A probe that fails never raises: its reason goes
into ``DeviceInfo.probe_errors`` and the debug log. Nothing heavy is imported at module
import time.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_sdk.errors import DeviceError

from .cpu import DOT_PRODUCT_FEATURES, CpuInfo, parse_cpuinfo
from .jetson import (
    is_jetson_model,
    jetpack_for_l4t,
    jetson_family,
    module_dla_cores,
    module_gpu,
    parse_l4t_release,
)

__all__ = ["DeviceInfo", "detect"]

_log = logging.getLogger(__name__)

_MAX_READ = 4 * 1024 * 1024
_DT_MODELS = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
_L4T_RELEASE = "etc/nv_tegra_release"
_CPUINFO = "proc/cpuinfo"
_MEMINFO = "proc/meminfo"
_CUDA_JSON = "usr/local/cuda/version.json"
_CUDA_TXT = "usr/local/cuda/version.txt"
_NVIDIA_GPUS = "proc/driver/nvidia/gpus/*/information"
_DLA_GLOBS = tuple("sys/devices/platform/" + "*/" * depth + "*dla*" for depth in range(3))
_DLA_NODE = re.compile(r"(^|\.)(nv)?dla\d*$")
_CUDA_TXT_LINE = re.compile(r"CUDA Version\s+(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about one machine. ``None`` means "not found"; ``probe_errors`` says why."""

    arch: str = "unknown"
    root: str = "/"
    board_model: str | None = None  # raw device-tree model, Jetson or not
    jetson_module: str | None = None  # board_model when it names an NVIDIA Jetson
    jetson_family: str | None = None  # "orin-nano", "xavier-nx", ...; see devices.jetson
    l4t_release: str | None = None  # "36.3.0"
    jetpack: str | None = None  # from devices.jetson.JETPACK_FOR_L4T; None if not listed
    cpu_model: str | None = None
    cpu_count: int = 0  # processors listed in cpuinfo (online ones); 0 when unknown
    cpu_flags: frozenset[str] = frozenset()  # int8-relevant ISA features only
    memory_total_mb: int | None = None
    memory_available_mb: int | None = None
    gpu_name: str | None = None  # driver's name on x86; module table on Jetson (see inferred)
    gpu_compute_capability: str | None = None  # the CUDA driver (live), else the Jetson module table
    dla_cores: int | None = None  # sysfs nvdla nodes, else module table (see inferred)
    cuda_version: str | None = None  # as usr/local/cuda/version.{json,txt} says: "12.2.20230823"
    tensorrt_version: str | None = None
    pycuda_version: str | None = None
    cuda_python_version: str | None = None
    onnxruntime_version: str | None = None
    onnxruntime_providers: tuple[str, ...] = ()
    openvino_version: str | None = None  # the installed distribution's (not imported: the CPU backend's extra)
    opencv_version: str | None = None
    opencv_gstreamer: bool | None = None  # this OpenCV can open GStreamer pipelines (CSI cameras on Jetson)
    opencv_location: str | None = None  # where cv2 was imported from: a pip wheel, or the system's (JetPack's)
    modules_probed: bool = False  # False: the four *_version fields above were not looked at
    inferred: tuple[str, ...] = field(default=())  # fields filled from a table, not measured
    probe_errors: tuple[str, ...] = field(default=())

    @property
    def is_jetson(self) -> bool:
        return self.jetson_module is not None

    @property
    def int8_dot_product(self) -> bool:
        """The CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or Arm SDOT)."""
        return bool(self.cpu_flags & DOT_PRODUCT_FEATURES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (sets as sorted lists), with the derived properties."""
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["is_jetson"] = self.is_jetson
        data["int8_dot_product"] = self.int8_dot_product
        return data

    def summary_lines(self) -> list[str]:
        """Human-readable ``key: value`` lines for the CLI's text output."""
        return [
            *self._platform_lines(),
            *self._accelerator_lines(),
            *self._module_lines(),
            *(f"inferred: {note}" for note in self.inferred),
            *(f"probe error: {error}" for error in self.probe_errors),
        ]

    def _platform_lines(self) -> list[str]:
        if self.is_jetson:
            family = f" ({self.jetson_family})" if self.jetson_family else ""
            device = f"{self.jetson_module}{family}"
        else:
            device = f"not a Jetson ({self.board_model})" if self.board_model else "not a Jetson"
        jetpack = f" (JetPack {self.jetpack})" if self.jetpack else ""
        flags = ", ".join(sorted(self.cpu_flags)) or "none"
        total = _or_unknown(self.memory_total_mb, " MB")
        available = _or_unknown(self.memory_available_mb, " MB")
        return [
            f"device: {device}",
            f"l4t: {self.l4t_release or 'none'}{jetpack}",
            f"arch: {self.arch}",
            f"cpu: {self.cpu_model or 'unknown'}, {self.cpu_count} processors",
            f"cpu int8 features: {flags} (int8 dot product: {'yes' if self.int8_dot_product else 'no'})",
            f"memory: {total} total, {available} available",
        ]

    def _accelerator_lines(self) -> list[str]:
        gpu = self.gpu_name or "none found"
        if self.gpu_compute_capability:
            gpu += f" (compute capability {self.gpu_compute_capability})"
        return [
            f"gpu: {gpu}",
            f"dla cores: {_or_unknown(self.dla_cores)}",
            f"cuda: {self.cuda_version or 'not found'}",
        ]

    def _module_lines(self) -> list[str]:
        def show(version: str | None) -> str:
            if not self.modules_probed:
                return "not probed"
            return version or "not available"

        providers = ", ".join(self.onnxruntime_providers) or "none"
        return [
            f"tensorrt: {show(self.tensorrt_version)}",
            f"pycuda: {show(self.pycuda_version)}",
            f"cuda-python: {show(self.cuda_python_version)}",
            f"onnxruntime: {show(self.onnxruntime_version)}",
            f"onnxruntime providers: {providers if self.modules_probed else 'not probed'}",
            f"openvino: {show(self.openvino_version)}",
            f"opencv: {show(self.opencv_version)}" + (
                f" (GStreamer: {'yes' if self.opencv_gstreamer else 'no'}; {self.opencv_location})"
                if self.opencv_version else ""),
        ]


def _or_unknown(value: int | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value}{unit}"


class _Problems:
    """Collects why probes failed; each reason is also logged at debug level."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, what: str, reason: str) -> None:
        message = f"{what}: {reason}"
        self.items.append(message)
        _log.debug("device probe failed: %s", message)


def _read_text(root: Path, relative: str, problems: _Problems | None) -> str | None:
    """The file's text, or None with the reason recorded (when ``problems`` is given)."""
    try:
        with open(root / relative, "rb") as handle:
            data = handle.read(_MAX_READ)
    except FileNotFoundError:
        reason = "not found"
    except PermissionError:
        reason = "permission denied"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    else:
        return data.decode("utf-8", errors="replace")
    if problems is not None:
        problems.add(relative, reason)
    return None


def _read_model(root: Path, problems: _Problems) -> str | None:
    """Device-tree model; real Jetsons end it with a NUL byte."""
    for relative in _DT_MODELS:
        text = _read_text(root, relative, None)
        if text is not None:
            return text.replace("\x00", "").strip() or None
    problems.add(", ".join(_DT_MODELS), "not found")
    return None


def _read_l4t(root: Path, problems: _Problems) -> str | None:
    text = _read_text(root, _L4T_RELEASE, problems)
    if text is None:
        return None
    release = parse_l4t_release(text)
    if release is None:
        first = text.strip().splitlines()[0] if text.strip() else ""
        problems.add(_L4T_RELEASE, f"unrecognised first line {first[:80]!r}")
    return release


def _read_cpu(root: Path, problems: _Problems) -> CpuInfo:
    text = _read_text(root, _CPUINFO, problems)
    if text is None:
        return CpuInfo(arch=None, model=None, count=0, flags=frozenset())
    return parse_cpuinfo(text)


def _read_meminfo(root: Path, problems: _Problems) -> tuple[int | None, int | None]:
    text = _read_text(root, _MEMINFO, problems)
    if text is None:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) // 1024  # meminfo counts kB
    for key in ("MemTotal", "MemAvailable"):
        if key not in values:
            problems.add(_MEMINFO, f"no {key} line")
    return values.get("MemTotal"), values.get("MemAvailable")


def _cuda_json_version(text: str) -> str | None:
    try:
        version = json.loads(text)["cuda"]["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(version) if version else None


def _read_cuda_version(root: Path, problems: _Problems) -> str | None:
    """CUDA toolkit version: version.json (CUDA >= 11.1), else version.txt (older)."""
    json_text = _read_text(root, _CUDA_JSON, None)
    if json_text is not None:
        version = _cuda_json_version(json_text)
        if version:
            return version
        problems.add(_CUDA_JSON, "no cuda.version entry")
    txt_text = _read_text(root, _CUDA_TXT, None)
    if txt_text is not None:
        match = _CUDA_TXT_LINE.search(txt_text)
        if match:
            return match.group(1)
        problems.add(_CUDA_TXT, "no 'CUDA Version' line")
    elif json_text is None:
        problems.add(f"{_CUDA_JSON}, {_CUDA_TXT}", "not found")
    return None


def _count_dla_nodes(root: Path) -> int:
    """Distinct nvdla device nodes under sys/devices/platform, up to three levels deep."""
    nodes: set[str] = set()
    for pattern in _DLA_GLOBS:
        for path in glob.glob(os.path.join(glob.escape(str(root)), pattern)):
            if _DLA_NODE.search(os.path.basename(path)) and os.path.isdir(path):
                nodes.add(path)
    return len(nodes)


def _dla_cores(
    root: Path, family: str | None, jetson: bool, problems: _Problems, inferred: list[str]
) -> int | None:
    """Measured nvdla nodes win; else the module table; a non-Jetson has no DLA."""
    found = _count_dla_nodes(root)
    if found or not jetson:
        return found
    from_table = module_dla_cores(family) if family else None
    if from_table is not None:
        inferred.append(f"dla_cores: {from_table} for {family} (module table; no nvdla node in sysfs)")
        return from_table
    if (root / "sys/devices/platform").is_dir():
        return 0
    problems.add("dla_cores", f"no sys/devices/platform and no table entry for {family or 'this module'}")
    return None


def _gpu(
    root: Path, family: str | None, problems: _Problems, inferred: list[str], live: bool
) -> tuple[str | None, str | None]:
    """(GPU name, compute capability): the CUDA driver on the live machine, else the NVIDIA driver's
    proc entry (name only), else the Jetson module table."""
    if live:
        from .gpu import query_cuda_python, query_driver, query_nvidia_smi

        for query in (query_driver, query_cuda_python, query_nvidia_smi):
            gpus, reason = query()
            if gpus:
                return gpus[0].name, gpus[0].compute_capability
            problems.add(f"gpu ({query.__name__})", reason or "no GPU")
    for path in sorted(glob.glob(os.path.join(glob.escape(str(root)), _NVIDIA_GPUS))):
        text = _read_text(root, os.path.relpath(path, root), problems) or ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model" and value.strip():
                return value.strip(), None
    table = module_gpu(family) if family else None
    if table is not None:
        inferred.append(f"gpu_name, gpu_compute_capability: {family} iGPU (module table)")
        return table
    problems.add("proc/driver/nvidia/gpus", "no NVIDIA GPU listed")
    return None, None


@dataclass(frozen=True)
class _ModuleProbe:
    label: str  # the name used in reports
    import_name: str
    version_attrs: tuple[str, ...]
    distributions: tuple[str, ...]  # metadata fallback when the module has no version attribute


_MODULE_PROBES = (
    _ModuleProbe("tensorrt", "tensorrt", ("__version__",), ("tensorrt",)),
    _ModuleProbe("pycuda", "pycuda", ("VERSION_TEXT", "__version__"), ("pycuda",)),
    _ModuleProbe("cuda-python", "cuda", ("__version__",), ("cuda-python", "cuda-bindings")),
    _ModuleProbe("onnxruntime", "onnxruntime", ("__version__",), ("onnxruntime", "onnxruntime-gpu")),
)


def _import(probe: _ModuleProbe, problems: _Problems) -> ModuleType | None:
    try:
        spec = importlib.util.find_spec(probe.import_name)
    except (ImportError, ValueError) as exc:
        problems.add(probe.label, f"cannot locate: {exc}")
        return None
    if spec is None:
        problems.add(probe.label, "not installed")
        return None
    try:
        return importlib.import_module(probe.import_name)
    except Exception as exc:  # noqa: BLE001 - a broken native library raises anything
        problems.add(probe.label, f"import failed: {type(exc).__name__}: {exc}")
        return None


def _version(probe: _ModuleProbe, module: ModuleType, problems: _Problems) -> str | None:
    for attr in probe.version_attrs:
        value = getattr(module, attr, None)
        if isinstance(value, str) and value:
            return value
    from importlib import metadata  # lazy: metadata pulls in email, zipfile, csv

    for distribution in probe.distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    problems.add(probe.label, "imported but reports no version")
    return None


def _providers(module: ModuleType, problems: _Problems) -> tuple[str, ...]:
    try:
        return tuple(str(name) for name in module.get_available_providers())
    except Exception as exc:  # noqa: BLE001 - same reason as in _import
        problems.add("onnxruntime providers", f"{type(exc).__name__}: {exc}")
        return ()


def _probe_modules(problems: _Problems) -> tuple[dict[str, str | None], tuple[str, ...]]:
    """{label: version} for the optional Python modules, and onnxruntime's providers."""
    versions: dict[str, str | None] = {}
    providers: tuple[str, ...] = ()
    for probe in _MODULE_PROBES:
        module = _import(probe, problems)
        versions[probe.label] = _version(probe, module, problems) if module else None
        if module is not None and probe.label == "onnxruntime":
            providers = _providers(module, problems)
    return versions, providers


def _distribution_version(name: str) -> str | None:
    """An installed distribution's version from its metadata, without importing it (importing OpenVINO
    costs a quarter of a second, and every backend selection probes the device once)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _probe_opencv(problems: _Problems) -> tuple[str | None, bool | None, str | None]:
    """OpenCV's version, whether it was built with GStreamer, and where it was imported from."""
    try:
        import cv2
    except ImportError:
        return None, None, None
    except Exception as exc:  # e.g. a system cv2 built for another numpy
        problems.add("opencv", f"{type(exc).__name__}: {exc}")
        return None, None, None
    try:
        build = cv2.getBuildInformation()
    except Exception as exc:
        problems.add("opencv", f"getBuildInformation: {type(exc).__name__}: {exc}")
        build = ""
    found = re.search(r"^\s*GStreamer:\s*(\S+)", build, re.MULTILINE)
    return (str(getattr(cv2, "__version__", "unknown")), bool(found and found.group(1).upper() == "YES"),
            os.path.dirname(str(getattr(cv2, "__file__", "") or "")) or None)


def _checked_root(root: str | os.PathLike[str]) -> Path:
    path = Path(os.fspath(root))
    hint = "pass the directory that holds proc/, sys/ and etc/; the default '/' inspects this machine"
    if not path.exists():
        raise DeviceError(f"device root {str(path)!r} does not exist", hint=hint)
    if not path.is_dir():
        raise DeviceError(f"device root {str(path)!r} is not a directory", hint=hint)
    return path


def detect(
    root: str | os.PathLike[str] = "/",
    *,
    machine: str | None = None,
    probe_modules: bool | None = None,
) -> DeviceInfo:
    """Read the facts of the machine whose filesystem is mounted at ``root``.

    ``machine`` overrides the CPU architecture (otherwise ``platform.machine()`` on the
    live root, or what the root's cpuinfo implies). ``probe_modules`` imports onnxruntime,
    tensorrt, pycuda and cuda-python to read their versions; None means "only when ``root``
    is this machine's '/'", so a fake root gives the same answer whatever is installed.
    Raises DeviceError only when ``root`` is not an existing directory.
    """
    base = _checked_root(root)
    live = base.resolve() == Path("/")
    problems = _Problems()
    inferred: list[str] = []

    board = _read_model(base, problems)
    module = board if board is not None and is_jetson_model(board) else None
    family = jetson_family(module) if module else None
    l4t = _read_l4t(base, problems)
    cpu = _read_cpu(base, problems)
    arch = machine or (platform.machine() if live else cpu.arch) or "unknown"
    if arch == "unknown":
        problems.add("arch", "cpuinfo shows neither x86 flags nor Arm Features")
    cpu_count = cpu.count or ((os.cpu_count() or 0) if live else 0)
    total_mb, available_mb = _read_meminfo(base, problems)
    probed = live if probe_modules is None else probe_modules
    gpu_name, capability = _gpu(base, family, problems, inferred, probed and live)
    dla = _dla_cores(base, family, module is not None, problems, inferred)
    cuda = _read_cuda_version(base, problems)

    versions, providers = _probe_modules(problems) if probed else ({}, ())
    opencv, gstreamer, opencv_at = _probe_opencv(problems) if probed else (None, None, None)
    return DeviceInfo(
        arch=arch,
        root=str(base),
        board_model=board,
        jetson_module=module,
        jetson_family=family,
        l4t_release=l4t,
        jetpack=jetpack_for_l4t(l4t) if l4t else None,
        cpu_model=cpu.model,
        cpu_count=cpu_count,
        cpu_flags=cpu.flags,
        memory_total_mb=total_mb,
        memory_available_mb=available_mb,
        gpu_name=gpu_name,
        gpu_compute_capability=capability,
        dla_cores=dla,
        cuda_version=cuda,
        tensorrt_version=versions.get("tensorrt"),
        pycuda_version=versions.get("pycuda"),
        cuda_python_version=versions.get("cuda-python"),
        onnxruntime_version=versions.get("onnxruntime"),
        onnxruntime_providers=providers,
        openvino_version=_distribution_version("openvino") if probed else None,
        opencv_version=opencv,
        opencv_gstreamer=gstreamer,
        opencv_location=opencv_at,
        modules_probed=probed,
        inferred=tuple(inferred),
        probe_errors=tuple(problems.items),
    )

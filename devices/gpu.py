"""The CUDA GPU's name and compute capability, asked of the driver itself.

A TensorRT engine is built for one compute capability (``sm``), so the device fingerprint needs it
on every machine, x86 desktops included. The driver library (``libcuda.so.1``, present wherever
an NVIDIA driver is: x86 and Jetson alike) answers through ``cuDeviceGetAttribute`` without any
Python CUDA binding; cuda-python's ``cudaGetDeviceProperties`` (when installed) and
``nvidia-smi --query-gpu=name,compute_cap`` (driver >= 510) are the fallbacks.
Each source that fails gives its reason; nothing here raises.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["CudaGpu", "query_driver", "query_cuda_python", "query_nvidia_smi", "parse_nvidia_smi"]

_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR} in cuda.h
_LIBRARIES = ("libcuda.so.1", "libcuda.so")


@dataclass(frozen=True)
class CudaGpu:
    name: str
    compute_capability: str  # "8.7"
    source: str  # "libcuda", "cuda-python" or "nvidia-smi"


def _load(library: str | None) -> tuple[ctypes.CDLL | None, str]:
    errors = []
    for name in (library,) if library else _LIBRARIES:
        try:
            return ctypes.CDLL(name), ""
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    return None, "; ".join(errors)


def query_driver(library: str | None = None) -> tuple[list[CudaGpu], str | None]:
    """Every CUDA device the driver lists, and why none could be read (None when it answered)."""
    lib, error = _load(library)
    if lib is None:
        return [], f"no CUDA driver library ({error})"
    try:
        status = lib.cuInit(0)
        if status != 0:
            return [], f"cuInit failed with CUresult {status} (no usable GPU, or the driver is not loaded)"
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return [], "cuDeviceGetCount failed"
        gpus = [gpu for ordinal in range(count.value) if (gpu := _device(lib, ordinal)) is not None]
    except AttributeError as exc:  # a library without the driver API symbols
        return [], f"the CUDA driver library lacks {exc}"
    return gpus, None if gpus else "the CUDA driver lists no device"


def _device(lib: ctypes.CDLL, ordinal: int) -> CudaGpu | None:
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        return None
    if (lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) != 0):
        return None
    lib.cuDeviceGetName(name, len(name), device)
    return CudaGpu(name.value.decode("utf-8", "replace").strip() or f"CUDA device {ordinal}",
                   f"{major.value}.{minor.value}", "libcuda")


def query_cuda_python() -> tuple[list[CudaGpu], str | None]:
    """Every device cuda-python's runtime API lists (needs cuda-python; imports it)."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError:
        return [], "cuda-python is not installed"
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0:
            return [], f"cudaGetDeviceCount failed with {getattr(err, 'name', err)}"
        gpus = []
        for ordinal in range(count):
            err, props = cudart.cudaGetDeviceProperties(ordinal)
            if int(err) == 0:
                name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
                gpus.append(CudaGpu(name.strip("\x00 ") or f"CUDA device {ordinal}", f"{props.major}.{props.minor}",
                                    "cuda-python"))
    except Exception as exc:  # noqa: BLE001 - a broken binding raises anything
        return [], f"cuda-python failed: {type(exc).__name__}: {exc}"
    return gpus, None if gpus else "cuda-python lists no device"


def parse_nvidia_smi(text: str) -> list[CudaGpu]:
    """``name, compute_cap`` CSV lines (``--format=csv,noheader``) -> GPUs; malformed lines are skipped."""
    gpus = []
    for line in text.splitlines():
        name, sep, cc = line.rpartition(",")
        cc = cc.strip()
        if sep and name.strip() and cc.count(".") == 1 and cc.replace(".", "").isdigit():
            gpus.append(CudaGpu(name.strip(), cc, "nvidia-smi"))
    return gpus


def query_nvidia_smi(timeout_s: float = 5.0) -> tuple[list[CudaGpu], str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "nvidia-smi is not on PATH"
    try:
        done = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}"
    gpus = parse_nvidia_smi(done.stdout) if done.returncode == 0 else []
    return gpus, None if gpus else f"nvidia-smi gave no compute capability (exit {done.returncode})"

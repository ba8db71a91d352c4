"""API stand-in for ``cuda.bindings.runtime`` (cuda-python >= 12.6): every call returns
``(cudaError_t, *values)``. Not a GPU: see tests/standin/README.md."""

from __future__ import annotations

import enum
import itertools
from types import SimpleNamespace
from typing import Any

import _standin_gpu as gpu


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


_streams: set[int] = set()
_ids = itertools.count(1)
OK = cudaError_t.cudaSuccess


def _usable() -> cudaError_t:
    if gpu.RUNTIME_VERSION // 1000 > gpu.DRIVER_VERSION // 1000:
        return cudaError_t.cudaErrorInsufficientDriver
    if not gpu.WORKING or gpu.DEVICES == 0:
        return cudaError_t.cudaErrorNoDevice
    return OK


def cudaDriverGetVersion() -> tuple[cudaError_t, int]:
    return OK, gpu.DRIVER_VERSION


def cudaRuntimeGetVersion() -> tuple[cudaError_t, int]:
    return OK, gpu.RUNTIME_VERSION


def cudaGetDeviceCount() -> tuple[cudaError_t, int]:
    err = _usable()
    return (err, 0) if err != OK else (OK, gpu.DEVICES)


def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, Any]:
    err = _usable()
    if err != OK or device >= gpu.DEVICES:
        return err if err != OK else cudaError_t.cudaErrorInvalidValue, None
    major, minor = gpu.COMPUTE_CAPABILITY
    return OK, SimpleNamespace(name=gpu.NAME.encode(), major=major, minor=minor)


def cudaSetDevice(device: int) -> tuple[cudaError_t]:
    if _usable() != OK or device >= gpu.DEVICES:
        return (cudaError_t.cudaErrorNoDevice,)
    gpu.set_device(device)
    return (OK,)


def cudaMalloc(nbytes: int) -> tuple[cudaError_t, int]:
    return OK, gpu.alloc(nbytes)


def cudaMallocHost(nbytes: int) -> tuple[cudaError_t, int]:
    return OK, gpu.alloc(nbytes)


def cudaFree(pointer: int) -> tuple[cudaError_t]:
    gpu.free(pointer)
    return (OK,)


def cudaFreeHost(pointer: int) -> tuple[cudaError_t]:
    gpu.free(pointer)
    return (OK,)


def cudaMemcpyAsync(dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: int) -> tuple[cudaError_t]:
    if stream not in _streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if not gpu.has_current_context():
        gpu.violation("cudaMemcpyAsync on a thread with no current CUDA context")
    gpu.copy(dst, src, nbytes)
    return (OK,)


def cudaStreamCreate() -> tuple[cudaError_t, int]:
    handle = next(_ids)
    _streams.add(handle)
    return OK, handle


def cudaStreamDestroy(stream: int) -> tuple[cudaError_t]:
    if stream not in _streams:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    _streams.discard(stream)
    return (OK,)


def cudaStreamSynchronize(stream: int) -> tuple[cudaError_t]:
    return (OK,) if stream in _streams else (cudaError_t.cudaErrorInvalidResourceHandle,)


def live_streams() -> int:
    return len(_streams)

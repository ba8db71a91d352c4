"""API stand-in for ``pycuda.driver``: a context stack per thread, as pycuda keeps (thread-local
``context_stack`` in pycuda's cuda.hpp). Not a GPU: see tests/standin/README.md."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import _standin_gpu as gpu


class Error(Exception):
    pass


class LogicError(Error):
    pass


def init() -> None:
    if not gpu.WORKING:
        raise Error("cuInit failed: no CUDA-capable device is detected")


class Device:
    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal

    @staticmethod
    def count() -> int:
        return gpu.DEVICES

    def retain_primary_context(self) -> Context:
        return Context()


class Context:
    def push(self) -> None:
        gpu.push(self)

    @staticmethod
    def pop() -> None:
        gpu.pop()

    def detach(self) -> None:
        return None


def _require_context(what: str) -> None:
    if not gpu.has_current_context():
        raise LogicError(f"{what} failed: invalid device context - cannot {what} without a current context")


class DeviceAllocation:
    def __init__(self, nbytes: int) -> None:
        self.address = gpu.alloc(nbytes)
        self.freed = False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        if not self.freed:
            gpu.free(self.address)
            self.freed = True


def mem_alloc(nbytes: int) -> DeviceAllocation:
    _require_context("mem_alloc")
    return DeviceAllocation(nbytes)


class HostAllocation(np.ndarray):
    pass


def pagelocked_empty(count: int, dtype: Any) -> np.ndarray:
    _require_context("pagelocked_empty")
    return np.empty(count, dtype)


_ids = itertools.count(1)


class Stream:
    def __init__(self) -> None:
        _require_context("Stream")
        self.handle = next(_ids)

    def synchronize(self) -> None:
        _require_context("synchronize")


def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
    _require_context("memcpy_htod_async")
    gpu.copy(int(dst), src.ctypes.data, src.nbytes)


def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
    _require_context("memcpy_dtoh_async")
    gpu.copy(dst.ctypes.data, int(src), dst.nbytes)

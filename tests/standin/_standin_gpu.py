"""Shared state of the API stand-ins: "device" memory, the per-thread current CUDA context, rule
violations. Not a GPU: see README.md beside this file."""

from __future__ import annotations

import ctypes
import threading

COMPUTE_CAPABILITY = (8, 7)
NAME = "API stand-in GPU"
DRIVER_VERSION = 12060  # CUDA 12.6, as cudaDriverGetVersion encodes it
RUNTIME_VERSION = 12060
DEVICES = 1
WORKING = True  # False: cuInit / createInferRuntime fail, as with a broken driver

_lock = threading.Lock()
_buffers: dict[int, ctypes.Array] = {}  # address -> buffer; device and pinned host memory alike
_current = threading.local()
violations: list[str] = []
executions = 0


def alloc(nbytes: int) -> int:
    buffer = ctypes.create_string_buffer(max(nbytes, 1))
    with _lock:
        _buffers[ctypes.addressof(buffer)] = buffer
    return ctypes.addressof(buffer)


def free(address: int) -> None:
    with _lock:
        if _buffers.pop(address, None) is None:
            violation(f"free of {address:#x}, which is not allocated")


def live_allocations() -> int:
    with _lock:
        return len(_buffers)


def copy(dst: int, src: int, nbytes: int) -> None:
    ctypes.memmove(dst, src, nbytes)


def violation(message: str) -> None:
    with _lock:
        violations.append(message)


def push(context: object) -> None:
    stack = getattr(_current, "stack", None)
    if stack is None:
        stack = _current.stack = []
    stack.append(context)


def pop() -> object:
    stack = getattr(_current, "stack", [])
    if not stack:
        raise RuntimeError("cuCtxPopCurrent failed: no context on this thread's stack")
    return stack.pop()


def set_device(device: int) -> None:
    _current.device = device


def has_current_context() -> bool:
    return bool(getattr(_current, "stack", None)) or getattr(_current, "device", None) is not None


def reset() -> None:
    global executions, WORKING, DEVICES, DRIVER_VERSION, RUNTIME_VERSION, COMPUTE_CAPABILITY, _current
    _current = threading.local()
    with _lock:
        _buffers.clear()
        violations.clear()
    executions = 0
    WORKING, DEVICES, DRIVER_VERSION, RUNTIME_VERSION, COMPUTE_CAPABILITY = True, 1, 12060, 12060, (8, 7)

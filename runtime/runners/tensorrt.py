"""TensorRT runner: runs a serialized engine on an NVIDIA GPU or DLA core (Jetson or desktop).

tensorrt and a CUDA binding (cuda-python or pycuda, :mod:`runtime.runners.cuda`) are imported on
``activate()``, never at module import, so this module imports on a CPU-only machine.

* **One engine, many contexts.** TensorRT objects are not thread safe: an execution context must
  be driven by one thread at a time. Each call checks out an execution context (with its own
  CUDA stream and buffers) from a pool of at most ``max_contexts``, with the CUDA context current
  in the calling thread; replicas of the same engine share one deserialized engine.
* **Profiles.** Each call runs in the profile that holds its shapes
  (:mod:`runtime.runners.trt_shapes`), switching the context with
  ``set_optimization_profile_async`` first; batches beyond every profile are split. Before
  TensorRT 10 two contexts may not hold the same profile at once, so there each profile gets
  its own context.
* **I/O API** is feature-detected: the named-tensor API (TensorRT >= 8.5, the only one in 10.x)
  when present, else the binding API (``execute_async_v2``, bindings repeated per profile).
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, EdgeSDKError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec
from runtime.runners.base import Feeds, Runner
from runtime.runners.cuda import CUDA_BINDINGS, Cuda, load_cuda
from runtime.runners.trt_shapes import Chunk, ProfileShapes, describe, plan_chunks

log = logging.getLogger(__name__)

_REBUILD = "rebuild the engine on this device with `edge-sdk engine build`"
# DataType name -> numpy; not trt.nptype, which fails on numpy >= 1.24 in TensorRT 8.5.1/8.5.2 (JetPack 5).
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
          "BOOL": np.bool_, "UINT8": np.uint8}


@dataclass(frozen=True)
class EngineIO:
    """One engine I/O tensor: its name, direction, numpy dtype and (profile 0) binding index."""

    name: str
    is_input: bool
    dtype: np.dtype
    index: int


def numpy_dtype(name: str, dtype: Any) -> np.dtype:
    """The numpy dtype of a TensorRT DataType, or a clear refusal (bf16, fp8, int4 have none)."""
    label = str(getattr(dtype, "name", dtype)).rpartition(".")[2].upper()
    if label not in _NUMPY:
        raise BackendUnavailableError(
            f"engine tensor '{name}' has TensorRT type {label}, which numpy cannot hold",
            hint=f"build the engine with float32, float16 or integer inputs and outputs; {_REBUILD}")
    return np.dtype(_NUMPY[label])


def discover_io(engine: Any, trt: Any) -> tuple[list[EngineIO], bool]:
    """The engine's I/O tensors and whether the named-tensor API (TensorRT >= 8.5) is in use."""
    if hasattr(engine, "num_io_tensors"):
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [EngineIO(n, engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                         numpy_dtype(n, engine.get_tensor_dtype(n)), i) for i, n in enumerate(names)], True
    count = engine.num_bindings // max(1, getattr(engine, "num_optimization_profiles", 1))
    return [EngineIO(engine.get_binding_name(i), engine.binding_is_input(i),
                     numpy_dtype(engine.get_binding_name(i), engine.get_binding_dtype(i)), i)
            for i in range(count)], False


def read_profiles(engine: Any, io: Sequence[EngineIO], named: bool) -> list[ProfileShapes]:
    """Every optimization profile's (min, opt, max) per input, as the engine reports them."""
    count = int(getattr(engine, "num_optimization_profiles", 1))
    per_profile = len(io)
    profiles: list[ProfileShapes] = []
    for p in range(count):
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        for t in (t for t in io if t.is_input):
            dims = (engine.get_tensor_profile_shape(t.name, p) if named
                    else engine.get_profile_shape(p, p * per_profile + t.index))
            lo, opt, hi = (tuple(int(d) for d in s) for s in dims)
            shapes[t.name] = (lo, opt, hi)
        profiles.append(shapes)
    return profiles


def check_io_names(io: Sequence[EngineIO], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Raise unless the engine's input and output names are exactly the declared ones."""
    for kind, declared, found in (
        ("inputs", sorted(s.name for s in inputs), sorted(t.name for t in io if t.is_input)),
        ("outputs", sorted(s.name for s in outputs), sorted(t.name for t in io if not t.is_input)),
    ):
        if declared != found:
            raise InferenceError(
                f"the TensorRT engine's {kind} are {found}; the package declares {declared}",
                hint=f"the engine was built from a different model; {_REBUILD}",
            )


class BufferPool:
    """Pinned host + device buffers per tensor, grown only when a shape needs more than the capacity."""

    def __init__(self, cuda: Cuda) -> None:
        self._cuda = cuda
        self._slots: dict[str, tuple[np.ndarray, int]] = {}  # name -> (flat pinned host, device pointer)

    def capacity(self, name: str) -> int:
        """Elements the buffers of ``name`` hold now (0 when none are allocated)."""
        return self._slots[name][0].size if name in self._slots else 0

    def get(self, name: str, shape: Sequence[int], dtype: np.dtype) -> tuple[np.ndarray, int]:
        """A host view shaped ``shape`` and the device pointer for tensor ``name``."""
        count = math.prod(shape)
        if count > self.capacity(name) or name not in self._slots:
            self._release(name)
            size = max(count, 1)
            host = self._cuda.alloc_host(size, dtype)
            self._slots[name] = (host, self._cuda.alloc_device(size * dtype.itemsize))
            log.debug("allocated %d elements of %s for tensor %s", size, dtype, name)
        host, device = self._slots[name]
        return host[:count].reshape(tuple(shape)), device

    def _release(self, name: str) -> None:
        if name in self._slots:
            host, device = self._slots.pop(name)
            self._cuda.free(device, host)

    def clear(self) -> None:
        for name in list(self._slots):
            self._release(name)


def _as_engine_dtype(name: str, value: np.ndarray, want: np.dtype) -> np.ndarray:
    """``value`` in the engine's dtype, when only the width differs (int64 -> int32, float32 -> float16)."""
    if value.dtype == want:
        return value
    if value.dtype.kind != want.kind:
        raise InputMismatchError(
            f"input '{name}' has dtype {value.dtype}, but the TensorRT engine takes {want}",
            hint=f"the engine does not match the package's input specs; {_REBUILD}",
        )
    cast = value.astype(want)
    if want.kind in "iu" and not np.array_equal(cast, value):
        raise InputMismatchError(f"input '{name}' has values that do not fit the engine's {want}")
    return cast


class _SharedEngine:
    """One deserialized engine per (engine bytes, DLA core) in the process, counted by its runners."""

    _lock = threading.Lock()
    _live: dict[tuple[str, int | None], _SharedEngine] = {}

    def __init__(self, key: tuple[str, int | None], runtime: Any, engine: Any) -> None:
        self.key, self.runtime, self.engine, self.users = key, runtime, engine, 0

    @classmethod
    def acquire(cls, trt: Any, data: bytes, dla_core: int | None) -> _SharedEngine:
        key = (hashlib.sha256(data).hexdigest(), dla_core)
        with cls._lock:
            shared = cls._live.get(key)
            if shared is None:
                shared = cls(key, *_deserialize(trt, data, dla_core))
                cls._live[key] = shared
            shared.users += 1
            return shared

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self._live.pop(self.key, None)
                self.engine = None  # engine before runtime: TensorRT 10 frees on release
                self.runtime = None


def _deserialize(trt: Any, data: bytes, dla_core: int | None) -> tuple[Any, Any]:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if dla_core is not None:
        runtime.DLA_core = dla_core  # before deserializing: the core the engine runs on
    try:
        engine = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # noqa: BLE001 - TensorRT raises untyped errors or returns None
        log.debug("deserialize_cuda_engine raised %s", exc)
        engine = None
    if engine is None:
        raise InferenceError(
            "TensorRT could not deserialize the engine: it was built for another GPU, DLA core or TensorRT version",
            hint=_REBUILD,
        )
    return runtime, engine


@dataclass
class _Slot:
    """An execution context with its own stream and buffers; used by one thread at a time."""

    context: Any
    stream: Any
    pool: BufferPool
    profile: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine; ``cuda`` picks the binding that manages memory and streams."""

    backend = "tensorrt"

    def __init__(
        self, engine: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, cuda: str = "auto",
        dla_core: int | None = None, max_contexts: int = 2,
    ) -> None:
        super().__init__(inputs, outputs)
        if cuda not in CUDA_BINDINGS:
            raise BackendUnavailableError(f"cuda is {cuda!r}; expected one of {list(CUDA_BINDINGS)}")
        if isinstance(max_contexts, bool) or not isinstance(max_contexts, int) or max_contexts < 1:
            raise BackendUnavailableError(f"max_contexts is {max_contexts!r}; expected an int >= 1")
        self._engine_bytes = engine
        self.cuda = cuda
        self.dla_core = dla_core
        self.max_contexts = max_contexts
        self._batched = all(len(s.shape) > 0 and isinstance(s.shape[0], str) for s in (*inputs, *outputs))
        self._reset()

    def _reset(self) -> None:
        self._cuda: Cuda | None = None
        self._shared: _SharedEngine | None = None
        self._io: list[EngineIO] = []
        self._named = True
        self._profiles: list[ProfileShapes] = []
        self._per_profile = True  # before TensorRT 10, one context per profile
        self._slots: list[_Slot] = []
        self._free: queue.LifoQueue[_Slot] = queue.LifoQueue()
        self._slots_lock = threading.Lock()

    # --- activation -------------------------------------------------------------------------

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError(
                "tensorrt is not installed",
                hint="pip install 'edge-sdk[tensorrt]'; on a Jetson, JetPack ships tensorrt (python3-libnvinfer)",
            ) from None
        self._cuda = load_cuda(self.cuda)
        try:
            with self._cuda.bound():
                self._load(trt)
        except EdgeSDKError:
            self._deactivate_impl()
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. "factory function returned nullptr": CUDA init failed
            self._deactivate_impl()
            raise BackendUnavailableError(
                f"TensorRT could not start on this GPU: {type(exc).__name__}: {exc}",
                hint="TensorRT could not initialise CUDA: check the driver matches the CUDA TensorRT was built "
                     "for, and that this user can open /dev/nvidia* (Jetson: is in the video and render groups)",
            ) from exc

    def _load(self, trt: Any) -> None:
        self._shared = _SharedEngine.acquire(trt, self._engine_bytes, self.dla_core)
        engine = self._shared.engine
        self._io, named = discover_io(engine, trt)
        check_io_names(self._io, self.inputs, self.outputs)
        self._profiles = read_profiles(engine, self._io, named)
        version = tuple(int(p) for p in str(trt.__version__).split(".")[:2] if p.isdigit())
        self._per_profile = version < (10, 0)  # one context per profile, even for an engine with one
        self._slots.append(self._new_slot(0))  # fail now, not on the first request
        self._named = named and hasattr(self._slots[0].context, "execute_async_v3")
        self._free.put(self._slots[0])

    def _new_slot(self, profile: int) -> _Slot:
        assert self._cuda is not None and self._shared is not None
        context = self._shared.engine.create_execution_context()
        if context is None:
            raise InferenceError("TensorRT could not create an execution context (out of GPU memory?)")
        stream = self._cuda.stream()
        slot = _Slot(context, stream, BufferPool(self._cuda), profile=-1)
        self._switch(slot, profile)
        return slot

    def _switch(self, slot: _Slot, profile: int) -> None:
        if slot.profile == profile:
            return
        if len(self._profiles) > 1 or profile != 0:
            assert self._cuda is not None
            if not slot.context.set_optimization_profile_async(profile, self._cuda.handle(slot.stream)):
                raise InferenceError(f"TensorRT refused to switch the execution context to profile {profile}")
        slot.profile = profile

    # --- inference --------------------------------------------------------------------------

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        assert self._cuda is not None
        values = {t.name: _as_engine_dtype(t.name, feeds[t.name], t.dtype) for t in self._io if t.is_input}
        chunks = plan_chunks(self._profiles, {n: v.shape for n, v in values.items()}, self._batched)
        if chunks is None:
            shapes = {n: list(v.shape) for n, v in values.items()}
            raise InputMismatchError(
                f"inputs {shapes} fit none of the engine's optimization profiles ({describe(self._profiles)})",
                hint=f"feed shapes within a profile, or {_REBUILD} with wider profiles")
        try:
            with self._cuda.bound():
                if len(chunks) == 1 and chunks[0].batch == chunks[0].stop - chunks[0].start:
                    return self._run_in_profile(values, chunks[0].profile)
                return self._run_chunks(values, chunks)
        except EdgeSDKError:
            raise
        except Exception as exc:  # noqa: BLE001 - CUDA bindings and TensorRT raise their own types
            raise InferenceError(f"TensorRT inference failed: {type(exc).__name__}: {exc}") from exc

    def _run_chunks(self, values: dict[str, np.ndarray], chunks: list[Chunk]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in self.outputs}
        for c in chunks:
            sub = {}
            for name, value in values.items():
                part = value[c.start:c.stop]
                pad = c.batch - len(part)
                sub[name] = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)]) if pad else part
            for name, out in self._run_in_profile(sub, c.profile).items():
                parts[name].append(out[: c.stop - c.start])
        return {name: np.concatenate(p) for name, p in parts.items()}

    def _run_in_profile(self, values: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        slot = self._checkout(profile)
        try:
            with slot.lock:
                self._switch(slot, profile)
                return self._execute(slot, values)
        finally:
            if not self._per_profile:
                self._free.put(slot)

    def _checkout(self, profile: int) -> _Slot:
        """A context for ``profile``: its own one before TensorRT 10, else any free one of the pool."""
        if self._per_profile:
            with self._slots_lock:
                found = next((s for s in self._slots if s.profile == profile), None)
                if found is None:
                    found = self._new_slot(profile)
                    self._slots.append(found)
                return found
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._slots_lock:
            if len(self._slots) < self.max_contexts:
                slot = self._new_slot(profile)
                self._slots.append(slot)
                return slot
        return self._free.get()  # every context is busy: wait for one

    def _execute(self, slot: _Slot, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx = self._cuda, slot.context
        assert cuda is not None
        base = slot.profile * len(self._io)  # binding API: bindings repeat per profile
        for t in self._io:
            if t.is_input and not self._set_shape(ctx, t, base, values[t.name].shape):
                raise InputMismatchError(
                    f"input '{t.name}' has shape {list(values[t.name].shape)}, outside optimization profile "
                    f"{slot.profile}", hint=f"{_REBUILD} with a wider profile")
        pointers: dict[str, int] = {}
        hosts: dict[str, np.ndarray] = {}
        for t in self._io:
            shape = values[t.name].shape if t.is_input else self._shape(ctx, t, base)
            hosts[t.name], pointers[t.name] = slot.pool.get(t.name, shape, t.dtype)
            if t.is_input:
                np.copyto(hosts[t.name], values[t.name])
                cuda.htod(pointers[t.name], hosts[t.name], slot.stream)
        handle = cuda.handle(slot.stream)
        if self._named:
            for name, pointer in pointers.items():
                ctx.set_tensor_address(name, pointer)
            ok = ctx.execute_async_v3(handle)
        else:
            bindings = [0] * (len(self._io) * max(1, len(self._profiles)))
            for t in self._io:
                bindings[base + t.index] = pointers[t.name]
            ok = ctx.execute_async_v2(bindings, handle)
        if not ok:
            raise InferenceError("TensorRT failed to enqueue the engine; see the TensorRT log above")
        for t in self._io:
            if not t.is_input:
                cuda.dtoh(hosts[t.name], pointers[t.name], slot.stream)
        cuda.sync(slot.stream)
        return {s.name: hosts[s.name].astype(np.dtype(s.dtype)) for s in self.outputs}  # astype copies

    def _set_shape(self, ctx: Any, t: EngineIO, base: int, shape: tuple[int, ...]) -> bool:
        if self._named:
            return bool(ctx.set_input_shape(t.name, shape))
        return bool(ctx.set_binding_shape(base + t.index, shape))

    def _shape(self, ctx: Any, t: EngineIO, base: int) -> tuple[int, ...]:
        dims = ctx.get_tensor_shape(t.name) if self._named else ctx.get_binding_shape(base + t.index)
        shape = tuple(int(d) for d in dims)
        if any(d < 0 for d in shape):
            raise InferenceError(
                f"output '{t.name}' has data-dependent shape {list(shape)}, which this runner does not support")
        return shape

    @property
    def contexts(self) -> int:
        """Execution contexts created so far (at most ``max_contexts``, or one per profile before TensorRT 10)."""
        return len(self._slots)

    # --- release ----------------------------------------------------------------------------

    def _deactivate_impl(self) -> None:
        cuda = self._cuda
        try:
            if cuda is not None:
                with cuda.bound():
                    for slot in self._slots:
                        with slot.lock:
                            cuda.sync(slot.stream)
                            slot.pool.clear()
                            cuda.destroy_stream(slot.stream)
                            slot.context = None  # contexts before the engine
                cuda.release()
        finally:
            if self._shared is not None:
                self._shared.release()
            self._reset()

"""OpenVINO runner: the package's own ONNX graphs on OpenVINO's CPU plugin (the ``[openvino]`` extra).

OpenVINO reads the same files onnxruntime runs (no conversion step, nothing else in the package):
the fp32 graph, or the int8 Q/DQ graph this CPU computes exactly, whose QuantizeLinear /
DequantizeLinear pairs its low-precision transformations turn into integer kernels. It computes in
the precision the graph states: ``INFERENCE_PRECISION_HINT`` is f32, so a CPU with bf16 or AMX
does not quietly run an fp32 graph in bf16 (which the fp32 parity tolerance would refuse anyway),
and dynamic quantization of float weights is off. One compiled model serves every batch size (the
graph's batch axis stays dynamic); compiled blobs are cached under the runtime's cache directory
(``CACHE_DIR``) so a restart does not compile again. With a cache the graph is compiled from a file
there named by its sha256 (OpenVINO then finds its blob without reading and hashing the graph:
0.11 s instead of 0.30 s for the demo text graph's cached compile, 1.24 s uncached).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError
from runtime.files import write_atomic
from runtime.manifest import TensorSpec
from runtime.runners.base import Feeds, Runner, check_threads
from runtime.runners.onnxrt import GraphInput, check_graph_inputs

OPENVINO_MISSING = "the openvino Python package is not installed (pip install 'edge-sdk[openvino]')"

#: OpenVINO element type names -> the onnxruntime type strings check_graph_inputs compares with.
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)",
          "i8": "tensor(int8)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (no import of the runtime)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def compile_config(threads: int | None) -> dict[str, Any]:
    """The CPU plugin's properties for a package graph: one stream, latency first, exact precision."""
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoRunner(Runner):
    """Runs an ONNX graph with OpenVINO's CPU plugin."""

    backend = "openvino-cpu"

    def __init__(self, model: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                 threads: int | None = None, cache_dir: Path | None = None) -> None:
        super().__init__(inputs, outputs)
        self._model = model
        self.threads = check_threads(threads)
        self.cache_dir = cache_dir
        self._compiled: Any = None
        self._request: Any = None
        self._lock = threading.Lock()  # an infer request runs one inference at a time

    @property
    def compiled(self) -> Any:
        """The ``openvino.CompiledModel`` while active (None otherwise): a baseline for measurements."""
        return self._compiled

    def _activate_impl(self) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailableError(OPENVINO_MISSING) from None
        core = ov.Core()
        try:
            if self.cache_dir is None:
                self._compiled = core.compile_model(core.read_model(self._model), "CPU", compile_config(self.threads))
            else:
                core.set_property({"CACHE_DIR": str(self.cache_dir)})
                self._compiled = core.compile_model(str(self._graph_file(self.cache_dir)), "CPU",
                                                    compile_config(self.threads))
        except Exception as exc:  # OpenVINO raises RuntimeError for graphs its frontend or plugin refuses
            raise InferenceError(f"OpenVINO could not compile the model: {exc}") from None
        check_graph_inputs([_graph_input(port) for port in self._compiled.inputs], self.inputs)
        names = {name for port in self._compiled.outputs for name in port.get_names()}
        missing = [o.name for o in self.outputs if o.name not in names]
        if missing:
            raise InferenceError(f"OpenVINO's compiled model has no outputs {missing} (it has {sorted(names)})")
        self._request = self._compiled.create_infer_request()

    def _graph_file(self, cache: Path) -> Path:
        """The graph as a file in the cache, named by its content: written once, atomically, and rewritten
        when the file there no longer hashes to its name."""
        digest = hashlib.sha256(self._model).hexdigest()
        path = cache / "graphs" / f"{digest}.onnx"
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, self._model)
        return path

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        with self._lock:
            try:
                self._request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
                # the request's output memory is reused by the next inference: copy it out
                return {o.name: np.array(self._request.get_tensor(o.name).data, copy=True) for o in self.outputs}
            except Exception as exc:
                raise InferenceError(f"OpenVINO failed to run the model: {exc}") from None

    def _deactivate_impl(self) -> None:
        self._request = None
        self._compiled = None


def _graph_input(port: Any) -> GraphInput:
    """An OpenVINO input port as the (name, type, shape) check_graph_inputs reads."""
    kind = port.get_element_type().get_type_name()
    shape: list[int | str] = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
    return GraphInput(port.get_any_name(), _TYPES.get(kind, kind), shape)

"""OpenVINO runner: the package's own ONNX graphs on OpenVINO's CPU plugin (the ``[openvino]`` extra).

OpenVINO reads the same files onnxruntime runs (no conversion step, nothing else in the package):
the fp32 graph, or the int8 Q/DQ graph this CPU computes exactly, whose QuantizeLinear /
DequantizeLinear pairs its low-precision transformations turn into integer kernels. It computes in
the precision the graph states: ``INFERENCE_PRECISION_HINT`` is f32, so a CPU with bf16 or AMX
does not quietly run an fp32 graph in bf16 (which the fp32 parity tolerance would refuse anyway),
and dynamic quantization of float weights is off. One compiled model serves every batch size: the
batch axis is compiled bounded to [1, ``DEFAULT_MAX_BATCH``] (OpenVINO plans kernels and memory for a
bounded shape: EfficientNet-Lite0 ``u8s8`` at batch 1 ran in 2.4 ms against 4.4 ms with the axis
unbounded, MiniLM-L6 in 5.6 ms against 8.8 ms; x86-64 AVX-512 VNNI, 2 threads), and a larger batch runs
in chunks of that many rows. Compiled blobs are cached under the runtime's cache directory
(``CACHE_DIR``) so a restart does not compile again. With a cache the graph is compiled from OpenVINO IR
files there (the bounded model, saved once, named by the package graph's sha256 and checked against
the digests recorded beside them before each compile), so OpenVINO finds its blob without reading and
hashing the graph (0.09 s for a 59 MB MiniLM graph, against 0.22 s reading and bounding it first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError
from runtime.files import write_atomic
from runtime.manifest import TensorSpec
from runtime.runners.base import DEFAULT_MAX_BATCH, Feeds, Runner, check_threads
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


#: Names the prepared IR files in the cache: change it when what ``_prepared`` writes changes.
IR_LAYOUT = f"b{DEFAULT_MAX_BATCH}-v1"


def bound_batch(model: Any, max_batch: int = DEFAULT_MAX_BATCH) -> bool:
    """Bound axis 0 of every input of ``model`` (an ``openvino.Model``) to [1, ``max_batch``], in place,
    when it is a batch axis: dynamic on every input and output. Returns whether it did."""
    import openvino as ov

    ports = [*model.inputs, *model.outputs]
    shapes = [p.get_partial_shape() for p in ports]
    if not shapes or not all(s.rank.is_static and s.rank.get_length() > 0 and s[0].is_dynamic for s in shapes):
        return False
    model.reshape({port: ov.PartialShape([ov.Dimension(1, max_batch), *list(shape)[1:]])
                   for port, shape in zip(model.inputs, shapes)})
    return True


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        self._bounded = False  # the batch axis compiled as [1, DEFAULT_MAX_BATCH]: larger batches run in chunks
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
                model = core.read_model(self._model)
                self._bounded = bound_batch(model)
                self._compiled = core.compile_model(model, "CPU", compile_config(self.threads))
            else:
                core.set_property({"CACHE_DIR": str(self.cache_dir)})
                path, self._bounded = self._prepared(core, self.cache_dir)
                self._compiled = core.compile_model(str(path), "CPU", compile_config(self.threads))
        except Exception as exc:  # OpenVINO raises RuntimeError for graphs its frontend or plugin refuses
            raise InferenceError(f"OpenVINO could not compile the model: {exc}") from None
        check_graph_inputs([_graph_input(port) for port in self._compiled.inputs], self.inputs)
        names = {name for port in self._compiled.outputs for name in port.get_names()}
        missing = [o.name for o in self.outputs if o.name not in names]
        if missing:
            raise InferenceError(f"OpenVINO's compiled model has no outputs {missing} (it has {sorted(names)})")
        self._request = self._compiled.create_infer_request()

    def _prepared(self, core: Any, cache: Path) -> tuple[Path, bool]:
        """The bounded model as IR files in the cache (``<sha256 of the graph>.<layout>.xml`` / ``.bin``
        and a ``.json`` record of their digests): written once, the record last, and written again
        when a file no longer matches its record. Returns the ``.xml`` path and whether the batch axis
        is bounded."""
        import openvino as ov

        folder = cache / "graphs"
        stem = f"{hashlib.sha256(self._model).hexdigest()}.{IR_LAYOUT}"
        xml, weights, record = (folder / f"{stem}.{kind}" for kind in ("xml", "bin", "json"))
        try:
            saved = json.loads(record.read_text())
            if saved["xml"] == _sha256(xml) and saved["bin"] == _sha256(weights):
                return xml, bool(saved["bounded"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing, partly written or changed: prepare it again
        model = core.read_model(self._model)
        bounded = bound_batch(model)
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".ir-", dir=folder))
        try:
            ov.save_model(model, str(scratch / "model.xml"), compress_to_fp16=False)
            os.replace(scratch / "model.bin", weights)
            os.replace(scratch / "model.xml", xml)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_atomic(record, json.dumps({"xml": _sha256(xml), "bin": _sha256(weights), "bounded": bounded}).encode())
        return xml, bounded

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        rows = len(next(iter(feeds.values()))) if feeds else 0
        if not self._bounded or rows <= DEFAULT_MAX_BATCH:
            return self._run(feeds)
        parts = [self._run({k: v[s:s + DEFAULT_MAX_BATCH] for k, v in feeds.items()})
                 for s in range(0, rows, DEFAULT_MAX_BATCH)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
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

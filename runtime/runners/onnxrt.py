"""onnxruntime runner: the CPU fallback that runs any package anywhere.

The CUDA and TensorRT execution providers plug in through ``providers``;
selection decides whether they are usable on this machine.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from edge_sdk.errors import BackendUnavailableError, InferenceError, PackageError
from runtime.manifest import TensorSpec
from runtime.runners.base import Feeds, Runner, check_threads

log = logging.getLogger(__name__)

#: onnxruntime optimizers never run on a package's graphs. Since 1.20 ``WeightBiasQuantization``
#: gives int8 weights to a Conv/Gemm/MatMul left in float between a DequantizeLinear and a
#: QuantizeLinear, so a layer the converter returned to float (mixed precision) would silently run
#: in int8 with weights of onnxruntime's choosing. Unknown names are ignored by older versions.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)

_PROVIDER_BACKENDS = {
    "CPUExecutionProvider": "onnxruntime-cpu",
    "CUDAExecutionProvider": "onnxruntime-cuda",
    "TensorrtExecutionProvider": "onnxruntime-tensorrt",
}


def available_providers() -> tuple[str, ...]:
    """Execution providers this onnxruntime build offers (empty when onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ()
    return tuple(ort.get_available_providers())


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX graph with onnxruntime on the given providers (CPU by default)."""

    def __init__(
        self,
        model: bytes,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        provider_options: Sequence[dict[str, Any]] | None = None,
        threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(inputs, outputs)
        self._model = model
        self.providers = tuple(providers)
        self.provider_options = list(provider_options) if provider_options else None
        self.threads = check_threads(threads)
        self.session_config = dict(session_config or {})  # onnxruntime session config entries
        self.backend = _PROVIDER_BACKENDS.get(self.providers[0], self.providers[0])
        self._session: Any = None

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession`` while active (None otherwise): a baseline for measurements."""
        return self._session

    def _activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed", hint="pip install onnxruntime") from None
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: on a device serving a camera at 30 fps the idle spinning
        # of the thread pool burns a core (and power) for a few percent of latency.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # onnxruntime's own warnings (unused initializers) are not the user's concern
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, value)
        try:
            self._session = ort.InferenceSession(self._model, sess_options=options, providers=list(self.providers),
                                                 provider_options=self.provider_options,
                                                 disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"onnxruntime could not load the model: {exc}") from None
        used = self._session.get_providers()
        if used[0] != self.providers[0]:
            raise BackendUnavailableError(
                f"onnxruntime fell back from {self.providers[0]} to {used[0]}",
                hint="the provider's libraries are missing on this machine",
            )
        check_graph_inputs(self._session.get_inputs(), self.inputs)

    def _infer_impl(self, feeds: Feeds) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        try:
            values = self._session.run(names, dict(feeds))
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed to run the model: {exc}") from None
        return dict(zip(names, values))

    def _deactivate_impl(self) -> None:
        self._session = None


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
             "int32": "tensor(int32)", "int8": "tensor(int8)", "uint8": "tensor(uint8)", "bool": "tensor(bool)"}


class GraphInput(NamedTuple):
    """A graph input as a runtime reports it (the fields of onnxruntime's ``NodeArg`` that are checked)."""

    name: str
    type: str  # onnxruntime's type string, e.g. "tensor(float)"
    shape: Sequence[int | str | None]


def check_graph_inputs(graph: Sequence[Any], declared: Sequence[TensorSpec]) -> None:
    """The session's inputs (``InferenceSession.get_inputs()``, or :class:`GraphInput` from another runtime)
    are the declared ones: names, types, ranks and fixed sizes. A package whose manifest describes another
    graph is refused before it serves."""
    hint = "re-convert the model; the manifest's inputs must describe its graph"
    have = {i.name: i for i in graph}
    if set(have) != {d.name for d in declared}:
        raise PackageError(f"the graph's inputs are {sorted(have)} but the manifest declares "
                           f"{sorted(d.name for d in declared)}", hint=hint)
    for spec in declared:
        node = have[spec.name]
        if node.type != ORT_TYPES.get(spec.dtype):
            raise PackageError(f"graph input {spec.name!r} is {node.type} but the manifest declares {spec.dtype}",
                               hint=hint)
        shape = list(node.shape)
        if len(shape) != len(spec.shape) or any(
                isinstance(g, int) and isinstance(m, int) and g != m for g, m in zip(shape, spec.shape)):
            raise PackageError(f"graph input {spec.name!r} has shape {shape} but the manifest declares "
                               f"{list(spec.shape)}", hint=hint)

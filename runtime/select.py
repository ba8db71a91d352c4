"""Runner selection: walk a policy (an ordered list of backends), return the first that runs.

Every backend passed over is recorded with its reason, so a fallback is never
silent: the caller reports ``Selection.skipped`` next to each prediction's backend.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from edge_sdk.errors import BackendUnavailableError, EdgeSDKError
from runtime.package import Package
from runtime.parity import Parity, check_parity
from runtime.runners.base import Runner
from runtime.runners.onnxrt import OnnxRuntimeRunner, available_providers

log = logging.getLogger(__name__)

DEFAULT_POLICY = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
_ALIASES = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "trt": "tensorrt"}


@dataclass(frozen=True)
class Skipped:
    backend: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """The runner chosen (already active), the graph it runs, and why earlier backends were passed over."""

    backend: str
    runner: Runner
    skipped: tuple[Skipped, ...]
    graph: str = "fp32"  # "fp32" or the int8 variant ("u8s8", "s8s8")
    parity: Parity | None = None  # the golden-vector check the runner passed before serving

    @property
    def precision(self) -> str:
        return "fp32" if self.graph == "fp32" else "int8"


PRECISIONS = ("auto", "fp32", "int8")
# A probe returns why the backend cannot run this package here, or None when it can try.
Probe = Callable[[Package], "str | None"]
Factory = Callable[[Package, "int | None", str], "tuple[Runner, str]"]


def _probe_tensorrt(package: Package) -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install 'edge-sdk[tensorrt]' on a machine with an NVIDIA GPU)"
    if not package.manifest.engines:
        return "the package carries no TensorRT engine"
    return "this edge-sdk release has no TensorRT runner yet; engines in the package are not used"


def _ort_probe(provider: str) -> Probe:
    def probe(package: Package) -> str | None:
        providers = available_providers()
        if provider not in providers:
            return f"onnxruntime offers {list(providers) or 'no providers'}, not {provider}"
        return None

    return probe


def cpu_graph(package: Package, precision: str) -> str:
    """The graph the onnxruntime providers run: the U8S8 int8 graph when there is one, unless fp32 is asked."""
    has_int8 = "u8s8" in package.manifest.graphs
    if precision == "int8" and not has_int8:
        raise BackendUnavailableError(f"package {package.manifest.name} has no int8 graph for onnxruntime",
                                      hint="convert it with quantize='int8', or load it with precision='fp32'")
    return "u8s8" if has_int8 and precision != "fp32" else "fp32"


def _ort_factory(providers: tuple[str, ...]) -> Factory:
    def make(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
        m = package.manifest
        graph = cpu_graph(package, precision)
        model = package.read_bytes(m.model if graph == "fp32" else m.graphs[graph])
        return OnnxRuntimeRunner(model, m.inputs, m.outputs, providers=providers, threads=threads), graph

    return make


def _no_factory(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
    raise BackendUnavailableError("no runner for this backend")


BACKENDS: dict[str, tuple[Probe, Factory]] = {
    "tensorrt": (_probe_tensorrt, _no_factory),
    "onnxruntime-cuda": (
        _ort_probe("CUDAExecutionProvider"),
        _ort_factory(("CUDAExecutionProvider", "CPUExecutionProvider")),
    ),
    "onnxruntime-cpu": (_ort_probe("CPUExecutionProvider"), _ort_factory(("CPUExecutionProvider",))),
}


Registry = Mapping[str, "tuple[Probe, Factory]"]


def parse_policy(backend: str | Sequence[str], registry: Registry = BACKENDS) -> tuple[str, ...]:
    """``"auto"`` -> the default policy; ``"a,b"`` or a list -> that order. Aliases: cpu, cuda, trt."""
    if isinstance(backend, str):
        items = list(DEFAULT_POLICY) if backend == "auto" else backend.split(",")
    else:
        items = list(backend)
    policy = tuple(_ALIASES.get(b.strip(), b.strip()) for b in items)
    unknown = [b for b in policy if b not in registry]
    if unknown or not policy:
        raise BackendUnavailableError(
            f"backend {backend!r} is not known; expected 'auto' or a list of {', '.join(registry)}",
            hint="for example backend='onnxruntime-cpu' or backend='auto'",
        )
    return policy


def select_runner(
    package: Package, backend: str | Sequence[str] = "auto", *, threads: int | None = None, precision: str = "auto",
    verify: bool = True, registry: Registry = BACKENDS,
) -> Selection:
    """Activate and return the first backend in the policy that can run ``package`` here.

    ``precision`` is "auto" (int8 when the package has it), "fp32" or "int8". With ``verify``
    a backend must reproduce the package's golden outputs before it is chosen; one that fails
    is deactivated, recorded with the difference, and the next backend is tried.
    """
    if precision not in PRECISIONS:
        raise BackendUnavailableError(f"precision is {precision!r}; expected one of {', '.join(PRECISIONS)}")
    skipped: list[Skipped] = []
    for name in parse_policy(backend, registry):
        probe, factory = registry[name]
        reason = probe(package)
        if reason is None:
            try:
                runner, graph = factory(package, threads, precision)
                runner.activate()
            except EdgeSDKError as exc:
                reason = str(exc)
            else:
                try:
                    parity = check_parity(package, runner, graph) if verify else None
                except EdgeSDKError as exc:
                    runner.deactivate()
                    reason = f"failed the golden-vector check: {exc}"
                    log.warning("backend %s passed over: %s", name, reason)
                else:
                    for s in skipped:
                        log.info("backend %s skipped: %s", s.backend, s.reason)
                    log.info("selected backend %s (%s graph) for %s", name, graph, package.manifest.name)
                    return Selection(name, runner, tuple(skipped), graph, parity)
        skipped.append(Skipped(name, reason))
    details = "; ".join(f"{s.backend}: {s.reason}" for s in skipped)
    tried = {s.backend for s in skipped}
    raise BackendUnavailableError(
        f"no backend in the policy can run {package.manifest.name}: {details}",
        hint="add 'onnxruntime-cpu' to the policy" if "onnxruntime-cpu" not in tried
        else "every backend was tried; the reasons above say what to fix")

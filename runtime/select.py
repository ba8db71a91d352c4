"""Runner selection: walk a policy (an ordered list of backends), return the first that runs.

Every backend passed over is recorded with its reason, so a fallback is never
silent: the caller reports ``Selection.skipped`` next to each prediction's backend. Whatever a
backend raises while probing, building, activating or checking parity (a CUDA initialisation
failure, a pycuda error, an engine TensorRT cannot load) passes that backend over with the
reason; the next one is tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from edge_sdk.errors import BackendUnavailableError, EdgeSDKError
from runtime.backends import BACKENDS, Factory, Probe, Served, openvino_gives_way
from runtime.engine_spec import ENGINE_PRECISIONS
from runtime.package import Package
from runtime.parity import Parity, check_inputs, check_parity
from runtime.runners.base import Runner

log = logging.getLogger(__name__)

DEFAULT_POLICY = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "openvino-cpu", "onnxruntime-cpu")
_ALIASES = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "trt": "tensorrt", "trt-ep": "onnxruntime-tensorrt",
            "dla": "tensorrt-dla"}


@dataclass(frozen=True)
class Skipped:
    backend: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """The runner chosen (already active), what it serves, and why earlier backends were passed over."""

    backend: str
    runner: Runner
    skipped: tuple[Skipped, ...]
    served: Served = Served()
    parity: Parity | None = None  # the golden-vector check the runner passed before serving

    @property
    def graph(self) -> str:
        """The package graph served: "fp32" or the int8 variant ("u8s8", "u8s7", "s8s8")."""
        return self.served.graph

    @property
    def precision(self) -> str:
        """"fp32", "fp16" or "int8": what to ask the backend's factory for to get this again (replicas)."""
        return self.served.precision

    @property
    def precision_label(self) -> str:
        """What each prediction reports: "fp32", "fp16", or "int8-<graph>" (e.g. int8-u8s7)."""
        return self.served.label

    @property
    def graph_reason(self) -> str:
        """Why this graph serves (the CPU fact behind a CPU int8 graph)."""
        from runtime.backends import graph_reason

        return graph_reason(self.graph)


PRECISIONS = ("auto", *ENGINE_PRECISIONS)  # what load(precision=...) takes
_LOWER = {"int8": ("fp16", "fp32"), "fp16": ("fp32",), "fp32": ()}


Registry = Mapping[str, "tuple[Probe, Factory]"]

#: Under ``auto``, a backend that gives way to a later one where that one is measured faster on this CPU
#: for this package (the reason is recorded like any other); an explicit policy is walked as written.
GIVES_WAY: Mapping[str, Callable[[Package, str], "str | None"]] = {"openvino-cpu": openvino_gives_way}
#: Backends that run the very graphs a later one runs: when their int8 graph fails the golden vectors
#: and that one is later in the policy, it serves next (its int8 first, then its own fp32) instead of
#: this backend stepping down to fp32 while an exact int8 is still to be tried.
SAME_GRAPHS = {"openvino-cpu": "onnxruntime-cpu"}


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

    ``precision`` is "auto" (int8 when the package has it), "fp32", "fp16" (TensorRT) or "int8".
    With ``verify`` a backend must reproduce the package's golden outputs, within the tolerance of
    the precision it computes in, before it is chosen; one that fails is deactivated and recorded
    with the difference. With precision "auto" a failing int8 graph is followed by the same
    backend's fp16 then fp32 (a CPU whose int8 kernels diverge serves fp32, never a silently wrong
    int8), then by the next backend; a backend that runs the same graphs as a later one in the policy
    (:data:`SAME_GRAPHS`: OpenVINO before onnxruntime) passes a failing int8 graph on to it instead.
    """
    if precision not in PRECISIONS:
        raise BackendUnavailableError(f"precision is {precision!r}; expected one of {', '.join(PRECISIONS)}")
    check_inputs(package.manifest)  # a manifest at odds with its own preprocessing fits no backend
    skipped: list[Skipped] = []
    policy = parse_policy(backend, registry)
    for index, name in enumerate(policy):
        probe, factory = registry[name]
        try:
            reason = probe(package)
            if reason is None and backend == "auto" and name in GIVES_WAY:
                reason = GIVES_WAY[name](package, precision)
        except Exception as exc:  # noqa: BLE001 - a probe must never stop the walk
            reason = _failure("probe", exc)
        if reason is None:
            step_down = SAME_GRAPHS.get(name) not in policy[index + 1:]
            chosen = _try(package, name, factory, threads, precision, verify, skipped, step_down)
            if chosen is not None:
                return chosen
            continue
        skipped.append(Skipped(name, reason))
    details = "; ".join(f"{s.backend}: {s.reason}" for s in skipped)
    tried = {s.backend for s in skipped}
    raise BackendUnavailableError(
        f"no backend in the policy can run {package.manifest.name}: {details}",
        hint="add 'onnxruntime-cpu' to the policy" if "onnxruntime-cpu" not in tried
        else "every backend was tried; the reasons above say what to fix")


def _failure(stage: str, exc: BaseException) -> str:
    """The reason recorded for a backend that raised; our own errors read as their message."""
    if isinstance(exc, EdgeSDKError):
        return str(exc)
    log.warning("backend %s raised %s", stage, type(exc).__name__, exc_info=exc)
    return f"{stage} failed with {type(exc).__name__}: {exc}"


def _try(package: Package, name: str, factory: Factory, threads: int | None, precision: str, verify: bool,
         skipped: list[Skipped], step_down: bool = True) -> Selection | None:
    """Activate backend ``name`` and check its parity; with precision "auto" (and ``step_down``), a graph
    that fails the golden vectors is recorded and the same backend is tried at each lower precision it
    serves."""
    attempts = [precision]
    for attempt in attempts:
        runner: Runner | None = None
        try:
            runner, served = factory(package, threads, attempt)
            runner.activate()
        except Exception as exc:  # noqa: BLE001 - CUDA, TensorRT and bindings raise their own types
            if runner is not None:
                _quietly_deactivate(runner)
            if attempt == precision:  # the backend cannot serve at all
                skipped.append(Skipped(name, _failure("activation", exc)))
                return None
            log.debug("backend %s serves no %s: %s", name, attempt, exc)
            continue
        try:
            parity = check_parity(package, runner, served.graph, served.precision) if verify else None
        except Exception as exc:  # noqa: BLE001 - an inference error mid-check passes the backend over too
            _quietly_deactivate(runner)
            label = name if served.label == "fp32" else f"{name} ({served.label})"
            skipped.append(Skipped(label, f"failed the golden-vector check: {_failure('parity', exc)}"))
            log.warning("backend %s passed over: %s", label, skipped[-1].reason)
            if precision == "auto" and step_down:
                attempts.extend(p for p in _LOWER[served.precision] if p not in attempts)
            continue
        for s in skipped:
            log.info("backend %s skipped: %s", s.backend, s.reason)
        log.info("selected backend %s (%s) for %s", name, served.label, package.manifest.name)
        return Selection(name, runner, tuple(skipped), served, parity)
    return None


def _quietly_deactivate(runner: Runner) -> None:
    try:
        runner.deactivate()
    except Exception:  # noqa: BLE001 - already failing; the first error is the one reported
        log.debug("deactivating a failed %s runner raised", runner.backend, exc_info=True)


def replicate(
    package: Package, selection: Selection, count: int, *, threads: int | None = None, verify: bool = True,
    registry: Registry = BACKENDS,
) -> list[Runner]:
    """``count`` fresh, active runners of the selected backend and graph, for data-parallel serving.

    Each replica gets ``threads`` (split the cores between replicas on the CPU) and, with
    ``verify``, passes the same golden-vector check as the selected runner did.
    """
    if count < 1:
        raise BackendUnavailableError(f"replicas is {count}; expected at least 1")
    _, factory = registry[selection.backend]
    runners: list[Runner] = []
    try:
        for _ in range(count):
            runner, served = factory(package, threads, selection.precision)
            runners.append(runner.activate())
            if verify:
                check_parity(package, runner, served.graph, served.precision)
    except Exception as exc:
        for runner in runners:
            _quietly_deactivate(runner)
        if isinstance(exc, EdgeSDKError):
            raise
        raise BackendUnavailableError(f"a {selection.backend} replica failed: {_failure('replica', exc)}") from exc
    return runners

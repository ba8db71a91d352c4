"""The backends runner selection can choose from: how each checks it can run here, and builds its runner.

* ``tensorrt``: an engine for this device's fingerprint, carried by the package or built into
  the engine cache (``edge-sdk engine build``), run by the TensorRT runner.
* ``onnxruntime-tensorrt``: onnxruntime's TensorRT execution provider on the S8S8 (or fp32)
  graph, with its engine and timing caches under the runtime's cache directory.
* ``onnxruntime-cuda``: onnxruntime's CUDA provider on the fp32 graph.
* ``onnxruntime-cpu``: the CPU provider on the int8 graph this CPU computes exactly (see
  :func:`cpu_int8_graph`) when the package has one, else fp32.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any, Callable

from edge_sdk.errors import BackendUnavailableError
from runtime.package import Package
from runtime.runners.base import Runner
from runtime.runners.onnxrt import OnnxRuntimeRunner, available_providers

log = logging.getLogger(__name__)

# A probe returns why the backend cannot run this package here, or None when it can try.
Probe = Callable[[Package], "str | None"]
Factory = Callable[[Package, "int | None", str], "tuple[Runner, str]"]
TENSORRT_MISSING = ("the tensorrt Python package is not installed "
                    "(pip install 'edge-sdk[tensorrt]' on a machine with an NVIDIA GPU; JetPack ships it)")


@functools.lru_cache(maxsize=1)
def device_key() -> str:
    """This machine's engine fingerprint key (probed once per process)."""
    import devices

    return devices.fingerprint(devices.detect()).key


_TARGETS = {"u8s8": "onnxruntime's CPU provider", "u8s7": "onnxruntime's CPU provider", "s8s8": "TensorRT"}
VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_int8_graph(arch: str, cpu_flags: frozenset[str]) -> tuple[str, str]:
    """The int8 graph whose onnxruntime kernels are exact on this CPU family, and why.

    Measured by ``bench/int8_kernels.py`` (onnxruntime 1.32): x86 with VNNI and Arm64 run U8S8
    exactly; x86 without VNNI sums pairs of uint8 x int8 products in saturating int16, so it runs
    U8S7 (7-bit weights). An x86 CPU whose features cannot be read gets U8S7, exact on every x86."""
    if arch in ("aarch64", "arm64"):
        return "u8s8", "Arm64: int8 dot products accumulate in int32 (SDOT/UDOT or widening multiplies)"
    if arch in ("x86_64", "amd64", "AMD64"):
        vnni = sorted(cpu_flags & VNNI_FEATURES)
        if vnni:
            return "u8s8", f"x86-64 with {', '.join(vnni)}: VPDPBUSD accumulates uint8 x int8 in int32"
        return "u8s7", ("x86-64 without VNNI: uint8 x int8 pairs are summed in saturating int16 (VPMADDUBSW), "
                        "so the graph with 7-bit weights runs instead")
    return "u8s8", f"{arch}: no measured int8 kernel facts; U8S8, checked by the golden vectors"


@functools.lru_cache(maxsize=1)
def this_cpu_int8_graph() -> tuple[str, str]:
    """:func:`cpu_int8_graph` for this machine (probed once per process), its cpuinfo flags checked
    against CPUID, which is what onnxruntime's kernel dispatch reads."""
    import devices
    from devices.cpu import cpuid_features, reconcile_with_cpuid

    info = devices.detect()
    flags, note = (reconcile_with_cpuid(info.cpu_flags, cpuid_features()) if info.arch == "x86_64"
                   else (info.cpu_flags, None))
    graph, reason = cpu_int8_graph(info.arch, flags)
    return graph, f"{reason} ({note})" if note else reason


def pick_graph(package: Package, precision: str, variant: str) -> str:
    """``variant`` (the int8 graph for a target) when the package has it, unless fp32 is asked; else fp32."""
    has_int8 = variant in package.manifest.graphs
    if precision == "int8" and not has_int8:
        raise BackendUnavailableError(f"package {package.manifest.name} has no int8 graph for {_TARGETS[variant]}",
                                      hint="convert it with quantize='int8', or load it with precision='fp32'")
    return variant if has_int8 and precision != "fp32" else "fp32"


def cpu_graph(package: Package, precision: str) -> str:
    """The graph the onnxruntime CPU provider runs: the int8 graph exact on this CPU when the package
    has it (a package made before U8S7 existed offers U8S8, which the golden vectors then check)."""
    wanted, _ = this_cpu_int8_graph()
    graphs = package.manifest.graphs
    variant = wanted if wanted in graphs or "u8s8" not in graphs else "u8s8"
    return pick_graph(package, precision, variant)


def graph_reason(graph: str) -> str:
    """Why a graph serves: for a CPU int8 graph, the CPU fact that chose it."""
    if graph == "fp32":
        return "fp32 graph"
    if graph == "s8s8":
        return "TensorRT explicit-quantization graph"
    wanted, reason = this_cpu_int8_graph()
    return reason if graph == wanted else f"{graph}: the package has no {wanted} graph ({reason})"


def _gpu_graph(package: Package, precision: str) -> str:
    """The graph TensorRT (engine or provider) runs: the S8S8 Q/DQ graph when there is one."""
    return pick_graph(package, precision, "s8s8")


def _graph_bytes(package: Package, graph: str) -> bytes:
    m = package.manifest
    return package.read_bytes(m.model if graph == "fp32" else m.graphs[graph])


def _engine(package: Package) -> tuple[bytes, str] | None:
    """An engine for this device: carried by the package, else from the engine cache."""
    from runtime.engine_cache import EngineCache, default_cache_dir, package_engine

    key = device_key()
    carried = package_engine(package, key)
    if carried is not None:
        return carried, "package"
    cached = EngineCache(default_cache_dir()).get(package, key)
    return (cached, "engine cache") if cached is not None else None


def _probe_tensorrt(package: Package) -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return TENSORRT_MISSING
    if _engine(package) is None:
        carried = [e.get("key") for e in package.manifest.engines]
        return (f"no engine for this device ({device_key()}); the package carries {carried or 'none'}: "
                f"build one with `edge-sdk engine build {package.path}`")
    return None


def _tensorrt_factory(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
    from runtime.runners.tensorrt import TensorRTRunner

    found = _engine(package)
    if found is None:
        raise BackendUnavailableError(f"no TensorRT engine for this device ({device_key()})")
    m = package.manifest
    log.info("TensorRT engine for %s from the %s", device_key(), found[1])
    return TensorRTRunner(found[0], m.inputs, m.outputs), _gpu_graph(package, precision)


def _ort_probe(provider: str) -> Probe:
    def probe(package: Package) -> str | None:
        providers = available_providers()
        if provider not in providers:
            return f"onnxruntime offers {list(providers) or 'no providers'}, not {provider}"
        return None

    return probe


def _ort_cpu(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
    graph = cpu_graph(package, precision)
    m = package.manifest
    return OnnxRuntimeRunner(_graph_bytes(package, graph), m.inputs, m.outputs, threads=threads), graph


def _ort_cuda(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
    m = package.manifest  # CUDA kernels gain nothing from Q/DQ graphs: run fp32
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return OnnxRuntimeRunner(_graph_bytes(package, "fp32"), m.inputs, m.outputs, providers=providers,
                             threads=threads), "fp32"


def tensorrt_provider_options(package: Package, graph: str) -> dict[str, Any]:
    """onnxruntime TensorRT EP options: persistent engine and timing caches per package, int8 for Q/DQ."""
    from runtime.engine_cache import EngineCache, default_cache_dir

    cache = str(EngineCache(default_cache_dir()).ort_trt_cache_dir(package, device_key()))
    return {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
        "trt_fp16_enable": True, "trt_int8_enable": graph == "s8s8",
    }


def _ort_tensorrt(package: Package, threads: int | None, precision: str) -> tuple[Runner, str]:
    graph = _gpu_graph(package, precision)
    m = package.manifest
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    options: tuple[dict[str, Any], ...] = (tensorrt_provider_options(package, graph), {}, {})
    return OnnxRuntimeRunner(_graph_bytes(package, graph), m.inputs, m.outputs, providers=providers,
                             provider_options=options, threads=threads), graph


BACKENDS: dict[str, tuple[Probe, Factory]] = {
    "tensorrt": (_probe_tensorrt, _tensorrt_factory),
    "onnxruntime-tensorrt": (_ort_probe("TensorrtExecutionProvider"), _ort_tensorrt),
    "onnxruntime-cuda": (_ort_probe("CUDAExecutionProvider"), _ort_cuda),
    "onnxruntime-cpu": (_ort_probe("CPUExecutionProvider"), _ort_cpu),
}

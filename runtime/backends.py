"""The backends runner selection can choose from: how each checks it can run here, and builds its runner.

* ``tensorrt``: a GPU engine for this device's fingerprint, carried by the package or built into
  the engine cache (``edge-sdk engine build``), run by the TensorRT runner: int8 (S8S8 graph),
  else fp16, else fp32, as the precision asked allows.
* ``tensorrt-dla``: the same for an engine built for one of the device's DLA cores
  (``engine build --dla-core N``); not in the default policy: DLA is chosen, not guessed.
* ``onnxruntime-tensorrt``: onnxruntime's TensorRT execution provider on the S8S8 graph (int8),
  or the fp32 graph with fp16 kernels allowed (fp16) or not (fp32), with its engine and timing
  caches under the runtime's cache directory.
* ``onnxruntime-cuda``: onnxruntime's CUDA provider on the fp32 graph.
* ``openvino-cpu``: OpenVINO's CPU plugin (the ``[openvino]`` extra) on the same graph
  onnxruntime's CPU provider would run, compiled blobs cached under the runtime's cache directory.
* ``onnxruntime-cpu``: the CPU provider on the int8 graph this CPU computes exactly (see
  :func:`cpu_int8_graph`) when the package has one, else fp32.

A factory returns the runner and what it serves (:class:`Served`: graph and precision), which
parity judges with that precision's tolerance and every prediction reports.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edge_sdk.errors import BackendUnavailableError
from runtime.engine_spec import EngineSpec, engine_candidates, served_label
from runtime.manifest import ImagePreprocess
from runtime.package import Package
from runtime.runners.base import Runner
from runtime.runners.onnxrt import OnnxRuntimeRunner, available_providers

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import devices


@dataclass(frozen=True)
class Served:
    """What a runner serves: the package graph it runs and the precision it computes in."""

    graph: str = "fp32"  # "fp32" or an int8 graph ("u8s8", "u8s7", "s8s8")
    precision: str = "fp32"  # "fp32", "fp16" or "int8"
    engine: EngineSpec | None = None  # the TensorRT engine, for the tensorrt backends

    @property
    def label(self) -> str:
        """What each prediction reports: "fp32", "fp16", "int8-<graph>" (e.g. int8-u8s7)."""
        return served_label(self.graph, self.precision)

    @classmethod
    def of_graph(cls, graph: str) -> Served:
        """A graph served as it is: fp32 for the fp32 graph, int8 for a Q/DQ graph."""
        return cls(graph, "fp32" if graph == "fp32" else "int8")


# A probe returns why the backend cannot run this package here, or None when it can try.
Probe = Callable[[Package], "str | None"]
# A factory builds (not activates) a runner for a precision request: "auto", "fp32", "fp16" or "int8".
Factory = Callable[[Package, "int | None", str], "tuple[Runner, Served]"]
TENSORRT_MISSING = ("the tensorrt Python package is not installed "
                    "(pip install 'edge-sdk[tensorrt]' on a machine with an NVIDIA GPU; JetPack ships it)")


@functools.lru_cache(maxsize=1)
def device_info() -> devices.DeviceInfo:
    """This machine's facts (probed once per process)."""
    import devices

    return devices.detect()


def device_key() -> str:
    """This machine's engine fingerprint key, GPU part (``sm87-trt10.3.0``)."""
    import devices

    return devices.fingerprint(device_info()).key


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
    from devices.cpu import cpuid_features, reconcile_with_cpuid

    info = device_info()  # one probe per process (it asks the CUDA driver too)
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
    if precision == "fp16":
        raise BackendUnavailableError(f"{_TARGETS[variant]} runs no fp16 graph",
                                      hint="load with precision='fp32' or 'int8', or serve fp16 from TensorRT")
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


def _graph_bytes(package: Package, graph: str) -> bytes:
    m = package.manifest
    return package.read_bytes(m.model if graph == "fp32" else m.graphs[graph])


def _engine_specs(package: Package, precision: str, dla: bool) -> list[EngineSpec]:
    """The engines that would serve ``precision`` here, best first (every DLA core's for ``dla``)."""
    cores: list[int | None] = list(range(device_info().dla_cores or 0)) if dla else [None]
    graphs = set(package.manifest.graphs)
    calibrated = "scales.json" in package.manifest.files
    return [spec for core in cores for spec in engine_candidates(device_key(), graphs, precision, calibrated, core)]


def _find_engine(package: Package, precision: str, dla: bool) -> tuple[EngineSpec, bytes, str] | None:
    from runtime.engine_cache import EngineCache, default_cache_dir, find_engine

    return find_engine(package, _engine_specs(package, precision, dla), EngineCache(default_cache_dir()))


def _tensorrt_probe(dla: bool) -> Probe:
    def probe(package: Package) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return TENSORRT_MISSING
        if dla and not device_info().dla_cores:
            return "this device has no DLA core"
        if _find_engine(package, "auto", dla) is None:
            carried = [e.get("file") for e in package.manifest.engines if isinstance(e, dict)]
            flag = " --dla-core 0" if dla else ""
            return (f"no {'DLA ' if dla else ''}engine for this device ({device_key()}); the package carries "
                    f"{carried or 'none'}: build one with `edge-sdk engine build {package.path}{flag}`")
        return None

    return probe


def _tensorrt_factory(dla: bool) -> Factory:
    def factory(package: Package, threads: int | None, precision: str) -> tuple[Runner, Served]:
        from runtime.runners.tensorrt import TensorRTRunner

        found = _find_engine(package, precision, dla)
        if found is None:
            wanted = ", ".join(s.name for s in _engine_specs(package, precision, dla)) or "none can exist"
            raise BackendUnavailableError(f"no TensorRT engine serves precision {precision} here (looked for {wanted})")
        spec, data, source = found
        log.info("TensorRT engine %s from the %s", spec.name, source)
        m = package.manifest
        return (TensorRTRunner(data, m.inputs, m.outputs, dla_core=spec.dla_core),
                Served(spec.graph, spec.precision, spec))

    return factory


def _ort_probe(provider: str) -> Probe:
    def probe(package: Package) -> str | None:
        providers = available_providers()
        if provider not in providers:
            return f"onnxruntime offers {list(providers) or 'no providers'}, not {provider}"
        return None

    return probe


def _ort_cpu(package: Package, threads: int | None, precision: str) -> tuple[Runner, Served]:
    graph = cpu_graph(package, precision)
    m = package.manifest
    return OnnxRuntimeRunner(_graph_bytes(package, graph), m.inputs, m.outputs, threads=threads), Served.of_graph(graph)


def openvino_gives_way(package: Package, precision: str = "auto") -> str | None:
    """Why, under the ``auto`` policy, onnxruntime's CPU provider serves ``package`` at ``precision`` on
    this CPU rather than OpenVINO (None: OpenVINO is the faster of the two here).

    Measured by ``bench/cpu.py`` on the same graph files (onnxruntime 1.32, OpenVINO 2026.4, 2 threads,
    x86-64 with AVX-512 VNNI, OpenVINO's batch axis bounded as the backend compiles it): on transformers
    OpenVINO was faster at every batch size and precision (``u8s8`` MiniLM-L6 2.54x / 3.15x onnxruntime
    fp32 at batch 1 / 8 against 1.88x / 2.10x, the demo text model 2.74x / 3.20x against 2.00x / 2.18x;
    fp32 1.04-1.09x); on CNNs its int8 tied at batch 1 and won at batch 8 (the demo CNN 2.14x / 2.58x
    against 2.12x / 2.21x, EfficientNet-Lite0 2.17x / 2.60x against 2.16x / 2.21x) but its fp32 was
    slower (0.89-0.92x), and it computes an anomaly head after an int8 backbone wrongly (parity refuses
    it). Without VNNI OpenVINO ran the demo ``u8s8`` file 1.24x against onnxruntime's 1.73x, and on
    Arm64 it has not been timed: onnxruntime stays. ``precision`` is the one asked (every rule in
    ``select.GIVES_WAY`` takes it): for a CNN it decides whether an int8 graph would serve."""
    info = device_info()
    if info.arch not in ("x86_64", "amd64", "AMD64"):
        return f"onnxruntime's CPU provider is the measured choice on {info.arch} (OpenVINO not timed there)"
    graph, _ = this_cpu_int8_graph()
    if graph != "u8s8":
        return "onnxruntime's CPU provider is faster on x86-64 without VNNI (bench/cpu.py)"
    if isinstance(package.manifest.preprocess, ImagePreprocess):
        if package.manifest.postprocess.kind == "anomaly":
            return "onnxruntime's CPU provider serves anomaly models: OpenVINO computes their head after an int8 backbone wrongly"
        if cpu_graph(package, precision) == "fp32":
            return "onnxruntime's CPU provider runs fp32 CNN graphs faster on this CPU (bench/cpu.py)"
    return None


def _openvino_probe(package: Package) -> str | None:
    from runtime.runners.openvino import OPENVINO_MISSING, openvino_version

    return OPENVINO_MISSING if openvino_version() is None else None


def _openvino_cpu(package: Package, threads: int | None, precision: str) -> tuple[Runner, Served]:
    from runtime.engine_cache import EngineCache, default_cache_dir
    from runtime.runners.openvino import OpenVinoRunner

    graph = cpu_graph(package, precision)
    m = package.manifest
    cache = EngineCache(default_cache_dir()).openvino_cache_dir()
    return (OpenVinoRunner(_graph_bytes(package, graph), m.inputs, m.outputs, threads=threads, cache_dir=cache),
            Served.of_graph(graph))


def _ort_cuda(package: Package, threads: int | None, precision: str) -> tuple[Runner, Served]:
    if precision in ("int8", "fp16"):  # CUDA kernels gain nothing from Q/DQ graphs: the provider runs fp32
        raise BackendUnavailableError(f"onnxruntime's CUDA provider serves fp32 only, not {precision}")
    m = package.manifest
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return OnnxRuntimeRunner(_graph_bytes(package, "fp32"), m.inputs, m.outputs, providers=providers,
                             threads=threads), Served()


def tensorrt_provider_options(package: Package, served: Served) -> dict[str, Any]:
    """onnxruntime TensorRT EP options: persistent engine and timing caches per package, int8 for Q/DQ,
    fp16 kernels unless fp32 is what is served."""
    from runtime.engine_cache import EngineCache, default_cache_dir

    cache = str(EngineCache(default_cache_dir()).ort_trt_cache_dir(package, device_key()))
    return {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
        "trt_fp16_enable": served.precision != "fp32", "trt_int8_enable": served.graph == "s8s8",
    }


def _ort_tensorrt_served(package: Package, precision: str) -> Served:
    has_s8s8 = "s8s8" in package.manifest.graphs
    if precision == "int8" and not has_s8s8:
        raise BackendUnavailableError(f"package {package.manifest.name} has no int8 graph for TensorRT",
                                      hint="convert it with quantize='int8', or load it with precision='fp16'")
    if precision in ("auto", "int8") and has_s8s8:
        return Served("s8s8", "int8")
    return Served("fp32", "fp32" if precision == "fp32" else "fp16")


def _ort_tensorrt(package: Package, threads: int | None, precision: str) -> tuple[Runner, Served]:
    served = _ort_tensorrt_served(package, precision)
    m = package.manifest
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    options: tuple[dict[str, Any], ...] = (tensorrt_provider_options(package, served), {}, {})
    return OnnxRuntimeRunner(_graph_bytes(package, served.graph), m.inputs, m.outputs, providers=providers,
                             provider_options=options, threads=threads), served


BACKENDS: dict[str, tuple[Probe, Factory]] = {
    "tensorrt": (_tensorrt_probe(dla=False), _tensorrt_factory(dla=False)),
    "tensorrt-dla": (_tensorrt_probe(dla=True), _tensorrt_factory(dla=True)),
    "onnxruntime-tensorrt": (_ort_probe("TensorrtExecutionProvider"), _ort_tensorrt),
    "onnxruntime-cuda": (_ort_probe("CUDAExecutionProvider"), _ort_cuda),
    "openvino-cpu": (_openvino_probe, _openvino_cpu),
    "onnxruntime-cpu": (_ort_probe("CPUExecutionProvider"), _ort_cpu),
}

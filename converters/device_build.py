"""On-device engine builds: plan from the package and the device, guard memory, build, cache.

``edge-sdk engine build PKG`` runs this on the Jetson itself, where TensorRT is: by default an
int8 engine from the package's S8S8 Q/DQ graph (fp16 from the fp32 graph when there is none),
for this device's fingerprint, into the engine cache the TensorRT backend reads. On a DLA core
int8 comes from the fp32 graph and the package's calibration cache (DLA does not run Q/DQ
graphs), with fixed input shapes. The plan's :class:`~runtime.engine_spec.EngineSpec` is what
the cache stores and what selection later finds. Until the engine exists the other backends serve.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import devices
from converters.engine import BuildResult, EngineBuildConfig, build_engine, format_command, profiles_for, \
    static_profile, tensorrt_release, trtexec_command
from edge_sdk.errors import BackendUnavailableError, EngineBuildError
from runtime.engine_cache import EngineCache, default_cache_dir
from runtime.engine_spec import ENGINE_PRECISIONS, EngineSpec
from runtime.package import Package

log = logging.getLogger(__name__)

#: Memory a TensorRT build needs beyond its workspace, as a multiple of the graph's size
#: (parsed network, weights, tactic buffers), plus a fixed margin for the process itself.
GRAPH_FACTOR, MARGIN_MB = 3, 512
BUILD_PRECISIONS = ("auto", *ENGINE_PRECISIONS)


@dataclass(frozen=True)
class BuildPlan:
    spec: EngineSpec
    config: EngineBuildConfig
    fingerprint: devices.Fingerprint
    needed_mb: int

    @property
    def graph(self) -> str:
        return self.spec.graph

    def command(self, package: Package) -> str:
        graph_file = package.manifest.model if self.graph == "fp32" else package.manifest.graphs[self.graph]
        release = tensorrt_release(self.fingerprint.tensorrt) if self.fingerprint.tensorrt else (10, 3)
        calib = "calibration.cache" if self.config.calibration_cache else None
        return format_command(trtexec_command(self.config, graph_file, f"{self.spec.name}.plan", calib_path=calib,
                                              tensorrt=release))


def plan_build(package: Package, info: devices.DeviceInfo, *, dla_core: int | None = None, precision: str = "auto",
               workspace_mb: int = 1024, sparsity: bool = False, timing_cache: str | None = None,
               dla_batch: int = 1) -> BuildPlan:
    """What to build for this device, without building: spec, config, fingerprint, memory needed.

    ``precision`` "auto" is int8 when the package has it (the S8S8 graph on the GPU, the
    calibration cache on DLA), else fp16. Sparse tactics are enabled when asked or when the
    package records 2:4 pruning (``reports["pruning"]["pattern"] == "2:4"``).
    """
    if precision not in BUILD_PRECISIONS:
        raise EngineBuildError(f"precision is {precision!r}; expected one of {list(BUILD_PRECISIONS)}")
    fingerprint = devices.fingerprint(info, dla_core)
    device = devices.fingerprint(info).key
    spec = _spec(package, device, precision, dla_core)
    calibration = _calibration_cache(package, fingerprint) if spec.precision == "int8" and spec.graph == "fp32" else None
    profiles = (_dla_profile(package, dla_batch) if dla_core is not None else profiles_for(package.manifest.inputs))
    pruning = package.manifest.reports.get("pruning") or {}
    config = EngineBuildConfig(
        precision=spec.precision, explicit=calibration is None, calibration_cache=calibration,
        sparsity=sparsity or pruning.get("pattern") == "2:4", dla_core=dla_core, workspace_mb=workspace_mb,
        timing_cache=timing_cache, profiles=profiles,
    )
    graph_file = package.manifest.model if spec.graph == "fp32" else package.manifest.graphs[spec.graph]
    graph_mb = package.manifest.files[graph_file].size // (1 << 20)
    needed = workspace_mb + GRAPH_FACTOR * graph_mb + MARGIN_MB
    return BuildPlan(spec, config, fingerprint, needed)


def _spec(package: Package, device: str, precision: str, dla_core: int | None) -> EngineSpec:
    has_s8s8 = "s8s8" in package.manifest.graphs
    has_scales = "scales.json" in package.manifest.files
    if precision == "auto":
        precision = "int8" if (has_scales if dla_core is not None else has_s8s8) else "fp16"
    if precision == "int8" and dla_core is None and not has_s8s8:
        raise EngineBuildError(f"package {package.manifest.name} has no s8s8 graph to build an int8 engine from",
                               hint="convert it with quantize='int8', or build with --precision fp16")
    if precision == "int8" and dla_core is not None and not has_scales:
        raise EngineBuildError(f"package {package.manifest.name} has no scales.json: DLA int8 needs its calibration "
                               "cache", hint="convert it with quantize='int8', or build with --precision fp16")
    if precision == "fp32" and dla_core is not None:
        raise EngineBuildError("DLA runs fp16 or int8, not fp32", hint="build with --precision fp16 or int8")
    graph = "s8s8" if precision == "int8" and dla_core is None else "fp32"
    return EngineSpec(device, graph, precision, dla_core)


def _calibration_cache(package: Package, fingerprint: devices.Fingerprint) -> str:
    """The package's scales as a TensorRT calibration cache for this device's TensorRT version."""
    from converters.calibration.scales import ScaleFile

    if fingerprint.tensorrt is None:
        raise EngineBuildError("DLA int8 needs the device's TensorRT version for its calibration cache header, "
                               "and none was detected", hint="install TensorRT (JetPack ships it)")
    scales = ScaleFile.from_json(package.read_bytes("scales.json").decode("utf-8"))
    return scales.to_trt_cache(fingerprint.tensorrt)


def _dla_profile(package: Package, batch: int) -> tuple:  # type: ignore[type-arg]
    inputs = package.manifest.inputs
    if any(len(s.shape) > 1 and isinstance(d, str) for s in inputs for d in s.shape[1:]):
        raise EngineBuildError(f"package {package.manifest.name} has inputs whose length varies "
                               f"({[s.name for s in inputs]}); DLA engines take fixed shapes only",
                               hint="serve this package from a GPU engine (omit --dla-core)")
    return static_profile(inputs, batch=batch)


def check_memory(plan: BuildPlan, info: devices.DeviceInfo) -> None:
    """Refuse a build that would run the device out of memory (Jetsons share it with the GPU)."""
    available = info.memory_available_mb
    if available is not None and available < plan.needed_mb:
        raise EngineBuildError(
            f"the engine build needs about {plan.needed_mb} MB but only {available} MB are available",
            hint=f"lower --workspace-mb (now {plan.config.workspace_mb}), stop other processes, "
                 "or build on a device with more memory")


def build_for_device(
    package_path: str | Path, *, dla_core: int | None = None, precision: str = "auto", workspace_mb: int = 1024,
    sparsity: bool = False, cache: EngineCache | None = None, progress: Callable[[str, float], None] | None = None,
) -> tuple[Path, BuildResult, BuildPlan]:
    """Build this device's engine for the package and store it in the engine cache."""
    package = Package.open(package_path)
    info = devices.detect()
    cache = cache or EngineCache(default_cache_dir())
    here = devices.fingerprint(info, dla_core)
    if not here.can_build:
        raise BackendUnavailableError(
            f"this machine cannot build TensorRT engines (GPU compute capability: {here.gpu}, "
            f"TensorRT: {here.tensorrt})",
            hint="run `edge-sdk engine build` on the Jetson itself; pip install 'edge-sdk[tensorrt]' elsewhere")
    timing = cache.root / "timing" / f"{here.key}.cache"  # shared by every build on this device: faster rebuilds
    plan = plan_build(package, info, dla_core=dla_core, precision=precision, workspace_mb=workspace_mb,
                      sparsity=sparsity, timing_cache=str(timing))
    check_memory(plan, info)
    timing.parent.mkdir(parents=True, exist_ok=True)
    log.info("building engine %s: %s", plan.spec.name, plan.command(package))
    graph_file = package.manifest.model if plan.graph == "fp32" else package.manifest.graphs[plan.graph]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = build_engine(package.read_bytes(graph_file), plan.config, progress=progress)
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024
    meta = {"fingerprint": plan.fingerprint.to_dict(), "seconds": round(result.seconds, 1),
            "tensorrt": result.tensorrt_version, "peak_rss_mb": peak_mb, "command": result.command,
            "layer_precisions": result.layer_precisions}
    path = cache.put(package, plan.spec, result.engine, meta)
    return path, result, plan

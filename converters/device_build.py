"""On-device engine builds: plan from the package and the device, guard memory, build, cache.

``edge-sdk engine build PKG`` runs this on the Jetson itself, where TensorRT is: the engine
is built from the package's S8S8 Q/DQ graph (fp16 from the fp32 graph when there is none),
for this device's fingerprint, into the engine cache the TensorRT backend reads. Until it
exists the other backends serve.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import devices
from converters.engine import BuildResult, EngineBuildConfig, build_engine, format_command, profiles_for, \
    trtexec_command
from edge_sdk.errors import BackendUnavailableError, EngineBuildError
from runtime.engine_cache import EngineCache, default_cache_dir
from runtime.package import Package

log = logging.getLogger(__name__)

#: Memory a TensorRT build needs beyond its workspace, as a multiple of the graph's size
#: (parsed network, weights, tactic buffers), plus a fixed margin for the process itself.
GRAPH_FACTOR, MARGIN_MB = 3, 512


@dataclass(frozen=True)
class BuildPlan:
    graph: str  # "s8s8" or "fp32"
    config: EngineBuildConfig
    fingerprint: devices.Fingerprint
    needed_mb: int

    def command(self, package: Package) -> str:
        graph_file = package.manifest.model if self.graph == "fp32" else package.manifest.graphs[self.graph]
        return format_command(trtexec_command(self.config, graph_file, f"{self.fingerprint.key}.plan"))


def plan_build(package: Package, info: devices.DeviceInfo, *, dla_core: int | None = None,
               workspace_mb: int = 1024, sparsity: bool = False, timing_cache: str | None = None) -> BuildPlan:
    """What to build for this device, without building: graph, config, fingerprint, memory needed.

    Sparse tactics are enabled when asked or when the package records 2:4 pruning
    (``reports["pruning"]["pattern"] == "2:4"``).
    """
    graph = "s8s8" if "s8s8" in package.manifest.graphs else "fp32"
    pruning = package.manifest.reports.get("pruning") or {}
    config = EngineBuildConfig(
        precision="int8" if graph == "s8s8" else "fp16", explicit=True,
        sparsity=sparsity or pruning.get("pattern") == "2:4", dla_core=dla_core, workspace_mb=workspace_mb,
        timing_cache=timing_cache, profiles=profiles_for(package.manifest.inputs),
    )
    graph_file = package.manifest.model if graph == "fp32" else package.manifest.graphs[graph]
    graph_mb = package.manifest.files[graph_file].size // (1 << 20)
    needed = workspace_mb + GRAPH_FACTOR * graph_mb + MARGIN_MB
    return BuildPlan(graph, config, devices.fingerprint(info, dla_core), needed)


def check_memory(plan: BuildPlan, info: devices.DeviceInfo) -> None:
    """Refuse a build that would run the device out of memory (Jetsons share it with the GPU)."""
    available = info.memory_available_mb
    if available is not None and available < plan.needed_mb:
        raise EngineBuildError(
            f"the engine build needs about {plan.needed_mb} MB but only {available} MB are available",
            hint=f"lower --workspace-mb (now {plan.config.workspace_mb}), stop other processes, "
                 "or build on a device with more memory")


def build_for_device(
    package_path: str | Path, *, dla_core: int | None = None, workspace_mb: int = 1024, sparsity: bool = False,
    cache: EngineCache | None = None, progress: Callable[[str, float], None] | None = None,
) -> tuple[Path, BuildResult, BuildPlan]:
    """Build this device's engine for the package and store it in the engine cache."""
    package = Package.open(package_path)
    info = devices.detect()
    cache = cache or EngineCache(default_cache_dir())
    key = devices.fingerprint(info, dla_core).key
    timing = cache.root / "timing" / f"{key}.cache"  # shared by every build on this device: faster rebuilds
    plan = plan_build(package, info, dla_core=dla_core, workspace_mb=workspace_mb, sparsity=sparsity,
                      timing_cache=str(timing))
    if not plan.fingerprint.can_build:
        raise BackendUnavailableError(
            f"this machine cannot build TensorRT engines (GPU compute capability: {plan.fingerprint.gpu}, "
            f"TensorRT: {plan.fingerprint.tensorrt})",
            hint="run `edge-sdk engine build` on the Jetson itself; pip install 'edge-sdk[tensorrt]' elsewhere")
    check_memory(plan, info)
    timing.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s engine for %s: %s", plan.graph, plan.fingerprint.key, plan.command(package))
    graph_file = package.manifest.model if plan.graph == "fp32" else package.manifest.graphs[plan.graph]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = build_engine(package.read_bytes(graph_file), plan.config, progress=progress)
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024
    meta = {"fingerprint": plan.fingerprint.to_dict(), "graph": plan.graph, "seconds": round(result.seconds, 1),
            "tensorrt": result.tensorrt_version, "peak_rss_mb": peak_mb, "command": result.command}
    path = cache.put(package, plan.fingerprint.key, result.engine, meta, graph=plan.graph)
    return path, result, plan

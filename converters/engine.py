"""Compile an ONNX graph to a serialized TensorRT engine, and say how to reproduce it.

Two int8 routes (DESIGN principle 4): *explicit* builds the package's S8S8 Q/DQ graph with the
INT8 and FP16 builder flags, so the Q/DQ nodes place int8 and every float layer (LayerNorm,
Softmax, GELU, residual adds, the head) may run in fp16 rather than fp32; ``strongly_typed``
instead keeps the graph's own float types (fp32 for the package's graphs; TensorRT >= 10).
*implicit* serves the package's calibration cache to an entropy calibrator: the only int8 route
on DLA, which does not run Q/DQ graphs (deprecated in TensorRT 10, removed in 11). ``tensorrt``
is imported only inside :func:`build_engine`; TensorRT 8.x / 10.x differences are handled by
feature detection (``hasattr``), except the explicit-batch network flag, which TensorRT 8.x
requires and 10.x deprecates.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.errors import BackendUnavailableError, EngineBuildError
from runtime.engine_spec import ENGINE_PRECISIONS
from runtime.manifest import TensorSpec

__all__ = ["Profile", "EngineBuildConfig", "BuildResult", "profiles_for", "static_profile", "trtexec_command",
           "tensorrt_release", "format_command", "build_engine"]

log = logging.getLogger(__name__)
Shape = tuple[int, ...]
Progress = Callable[[str, float], None]
PRECISIONS = ENGINE_PRECISIONS
_TRT_HINT = "pip install 'edge-sdk[tensorrt]' on a machine with an NVIDIA GPU (JetPack ships it on Jetson)"


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ``{input name: (min shape, opt shape, max shape)}``."""

    shapes: Mapping[str, tuple[Shape, Shape, Shape]] = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, Mapping) or not self.shapes:
            raise EngineBuildError(f"profile shapes {self.shapes!r} must be a non-empty mapping {{input: (min, opt, max)}}")
        object.__setattr__(self, "shapes", {name: _check_triple(name, t) for name, t in self.shapes.items()})


def _check_triple(name: str, triple: Any) -> tuple[Shape, Shape, Shape]:
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise EngineBuildError(f"profile for input '{name}' is {triple!r}; expected (min shape, opt shape, max shape)")
    lo, opt, hi = (tuple(s) for s in triple)
    if not len(lo) == len(opt) == len(hi) or not all(isinstance(d, int) and d > 0 for d in lo + opt + hi):
        raise EngineBuildError(f"profile for input '{name}' is {triple!r}; expected three shapes of positive ints with the same rank")
    for axis, (a, b, c) in enumerate(zip(lo, opt, hi)):
        if not a <= b <= c:
            raise EngineBuildError(f"profile for input '{name}', axis {axis}: min {a}, opt {b}, max {c}; expected min <= opt <= max")
    return lo, opt, hi


@dataclass(frozen=True)
class EngineBuildConfig:
    """How to build one engine; see the module docstring for the int8 routes."""

    precision: str = "int8"
    explicit: bool = True
    calibration_cache: str | None = None
    sparsity: bool = False
    dla_core: int | None = None
    gpu_fallback: bool = True
    workspace_mb: int = 1024
    timing_cache: str | None = None
    optimization_level: int = 3
    profiles: tuple[Profile, ...] = ()
    strongly_typed: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineBuildError(f"precision {self.precision!r} is not one of {PRECISIONS}", hint="pass precision='int8', 'fp16' or 'fp32'")
        for name in ("explicit", "sparsity", "gpu_fallback", "strongly_typed"):
            if not isinstance(getattr(self, name), bool):
                raise EngineBuildError(f"{name}={getattr(self, name)!r}; expected True or False")
        self._check_calibration()
        if self.dla_core is not None and (not _is_int(self.dla_core) or self.dla_core < 0):
            raise EngineBuildError(f"dla_core={self.dla_core!r}; expected None or a DLA core index >= 0", hint="Orin AGX has DLA cores 0 and 1")
        if self.dla_core is not None and self.precision == "fp32":
            raise EngineBuildError("dla_core is set with precision='fp32'; DLA runs only fp16 or int8",
                                   hint="use precision='fp16' or 'int8', or dla_core=None")
        if not _is_int(self.workspace_mb) or self.workspace_mb <= 0:
            raise EngineBuildError(f"workspace_mb={self.workspace_mb!r}; expected a positive number of MiB such as 1024")
        if self.timing_cache is not None and (not isinstance(self.timing_cache, str) or not self.timing_cache):
            raise EngineBuildError(f"timing_cache={self.timing_cache!r}; expected None or a file path")
        if not _is_int(self.optimization_level) or not 0 <= self.optimization_level <= 5:
            raise EngineBuildError(f"optimization_level={self.optimization_level!r}; expected an int from 0 to 5 (TensorRT's default is 3)")
        if self.strongly_typed and not (self.precision == "int8" and self.explicit):
            raise EngineBuildError(f"strongly_typed=True with precision={self.precision!r}, explicit={self.explicit}; "
                                   "a strongly typed build takes its precisions from an explicit Q/DQ graph",
                                   hint="use strongly_typed=False, or precision='int8', explicit=True")
        self._check_profiles()
        self._check_dla()

    def _check_dla(self) -> None:
        if self.dla_core is None:
            return
        if self.precision == "int8" and self.explicit:
            raise EngineBuildError("dla_core is set with explicit (Q/DQ) int8; DLA runs int8 only by implicit "
                                   "calibration", hint="use explicit=False with the package's calibration cache, "
                                   "or precision='fp16'")
        dynamic = [n for p in self.profiles for n, (lo, _, hi) in p.shapes.items() if lo != hi]
        if dynamic or len(self.profiles) > 1:
            raise EngineBuildError(f"dla_core is set with dynamic shapes ({sorted(set(dynamic)) or 'several profiles'}); "
                                   "DLA needs one profile with min = opt = max",
                                   hint="use static_profile(inputs, batch, sequence)")

    def _check_calibration(self) -> None:
        implicit_int8 = self.precision == "int8" and not self.explicit
        if implicit_int8 and not self.calibration_cache:
            raise EngineBuildError("precision='int8' with explicit=False needs calibration_cache (the text of a TensorRT calibration cache)",
                                   hint="pass the package's calibration cache, or explicit=True to build its Q/DQ graph")
        if not implicit_int8 and self.calibration_cache is not None:
            raise EngineBuildError(f"calibration_cache is given but precision={self.precision!r}, explicit={self.explicit}; "
                                   "it is used only for implicit int8",
                                   hint="drop calibration_cache, or pass precision='int8', explicit=False")
        if self.calibration_cache is not None and not self.calibration_cache.startswith("TRT-"):
            raise EngineBuildError(f"calibration_cache starts with {self.calibration_cache[:30]!r}; "
                                   "expected a TensorRT cache header such as 'TRT-8601-EntropyCalibration2'")

    def _check_profiles(self) -> None:
        if not isinstance(self.profiles, tuple) or not all(isinstance(p, Profile) for p in self.profiles):
            raise EngineBuildError(f"profiles={self.profiles!r}; expected a tuple of Profile", hint="use profiles_for(inputs) or Profile({...})")
        names = {frozenset(p.shapes) for p in self.profiles}
        if len(names) > 1:
            raise EngineBuildError(f"profiles cover different inputs {sorted(sorted(n) for n in names)}; every profile must give the same inputs")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BuildResult:
    """A serialized engine and the facts needed to trust and reproduce it."""

    engine: bytes
    seconds: float
    tensorrt_version: str
    layer_precisions: dict[str, str] = field(hash=False)
    command: str


def profiles_for(inputs: Sequence[TensorSpec], batch: tuple[int, int, int] = (1, 8, 32),
                 sequence_buckets: Sequence[int] = (32, 64, 128)) -> tuple[Profile, ...]:
    """Profiles for dynamic batch (axis 0) and, for text inputs, one per sequence bucket (axis 1)."""
    if len(batch) != 3 or not all(_is_int(b) and b > 0 for b in batch) or not batch[0] <= batch[1] <= batch[2]:
        raise EngineBuildError(f"batch={batch!r}; expected (min, opt, max) positive ints with min <= opt <= max, such as (1, 8, 16)")
    buckets = list(sequence_buckets)
    if not buckets or not all(_is_int(b) and b > 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise EngineBuildError(f"sequence_buckets={sequence_buckets!r}; expected strictly increasing positive ints such as (32, 64, 128)")
    for spec in inputs:
        bad = [i for i, d in enumerate(spec.shape) if isinstance(d, str) and i > 1]
        if bad:
            raise EngineBuildError(f"input '{spec.name}' has dynamic axis {bad[0]} ({spec.shape[bad[0]]!r}); "
                                   "profiles_for handles a dynamic batch (axis 0) and sequence (axis 1)",
                                   hint="give Profile({...}) shapes explicitly")
    if not any(isinstance(d, str) for spec in inputs for d in spec.shape):
        return ()
    if not any(len(s.shape) > 1 and isinstance(s.shape[1], str) for s in inputs):
        return (Profile({s.name: _ranges(s.shape, batch, None) for s in inputs}),)
    lows = [1] + [b + 1 for b in buckets[:-1]]
    return tuple(Profile({s.name: _ranges(s.shape, batch, (lo, hi, hi)) for s in inputs}) for lo, hi in zip(lows, buckets))


def static_profile(inputs: Sequence[TensorSpec], batch: int = 1, sequence: int = 128) -> tuple[Profile, ...]:
    """One fixed-shape profile (min = opt = max), what DLA needs: dynamic axis 0 at ``batch``, axis 1
    at ``sequence``. Empty when every input shape is static already."""
    if not _is_int(batch) or batch < 1 or not _is_int(sequence) or sequence < 1:
        raise EngineBuildError(f"batch={batch!r}, sequence={sequence!r}; expected positive ints")
    if not any(isinstance(d, str) for spec in inputs for d in spec.shape):
        return ()
    fixed = {s.name: _ranges(s.shape, (batch,) * 3, (sequence,) * 3) for s in inputs}
    return (Profile(fixed),)


def _ranges(shape: Sequence[int | str], batch: tuple[int, int, int], seq: tuple[int, int, int] | None) -> tuple[Shape, Shape, Shape]:
    def dim(axis: int, d: int | str, k: int) -> int:
        if isinstance(d, int):
            return d
        return batch[k] if axis == 0 or seq is None else seq[k]
    lo, opt, hi = (tuple(dim(a, d, k) for a, d in enumerate(shape)) for k in range(3))
    return lo, opt, hi


def trtexec_command(config: EngineBuildConfig, onnx_path: str, engine_path: str, *,
                    calib_path: str | None = None, tensorrt: tuple[int, int] = (10, 3)) -> list[str]:
    """The ``trtexec`` command line equivalent to :func:`build_engine` with ``config``, for the trtexec
    of TensorRT ``tensorrt`` (major, minor): ``--builderOptimizationLevel`` exists from 8.6 and
    ``--stronglyTyped`` from 10.0, and TensorRT 8.5's trtexec refuses flags it does not know.

    trtexec takes one optimization profile per command line: only ``config.profiles[0]`` is
    rendered. ``calib_path`` names the cache file for implicit int8; nothing is written here.
    """
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if config.precision == "int8" and config.explicit and config.strongly_typed:
        if tensorrt < (10, 0):
            raise EngineBuildError(f"strongly typed builds need TensorRT >= 10; this is {tensorrt[0]}.{tensorrt[1]}",
                                   hint="use strongly_typed=False (INT8 + FP16 flags)")
        cmd.append("--stronglyTyped")
    elif config.precision == "int8" and config.explicit:
        cmd += ["--int8", "--fp16"]  # Q/DQ place int8; float layers may run fp16
    elif config.precision == "int8":
        if calib_path is None:
            raise EngineBuildError("implicit int8 needs calib_path, the calibration cache file for trtexec --calib",
                                   hint="pass calib_path='model.cache'")
        cmd += ["--int8", "--fp16", f"--calib={calib_path}"]
    elif config.precision == "fp16":
        cmd.append("--fp16")
    if config.sparsity:
        cmd.append("--sparsity=enable")
    if config.dla_core is not None:
        cmd.append(f"--useDLACore={config.dla_core}")
        if config.gpu_fallback:
            cmd.append("--allowGPUFallback")
    cmd += [f"--memPoolSize=workspace:{config.workspace_mb}"]  # MiB in every trtexec that has the flag (>= 8.4)
    if config.timing_cache:
        cmd.append(f"--timingCacheFile={config.timing_cache}")
    if tensorrt >= (8, 6):
        cmd.append(f"--builderOptimizationLevel={config.optimization_level}")
    if config.profiles:
        shapes = config.profiles[0].shapes
        for k, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            cmd.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, t[k]))}" for n, t in shapes.items()))
    return cmd


def tensorrt_release(version: str) -> tuple[int, int]:
    """``"10.3.0.26"`` -> ``(10, 3)``."""
    parts = re.findall(r"\d+", version)
    if len(parts) < 2:
        raise EngineBuildError(f"TensorRT version {version!r} is not major.minor")
    return int(parts[0]), int(parts[1])


def format_command(cmd: Sequence[str]) -> str:
    """One shell-quoted line a user can paste."""
    return shlex.join(cmd)


def build_engine(onnx: bytes, config: EngineBuildConfig, *, progress: Progress | None = None) -> BuildResult:
    """Parse ``onnx`` and build a serialized TensorRT engine as ``config`` says."""
    trt = _import_tensorrt()
    command = format_command(trtexec_command(config, "model.onnx", "model.engine", calib_path="calibration.cache"
                                             if config.calibration_cache else None,
                                             tensorrt=tensorrt_release(str(trt.__version__))))
    log.info("building TensorRT %s engine; trtexec equivalent: %s", trt.__version__, command)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if not hasattr(builder, "build_serialized_network"):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no build_serialized_network; edge-sdk needs TensorRT >= 8.0",
                               hint="upgrade JetPack/TensorRT")
    network, _parser = _parse(trt, builder, logger, onnx, config)
    trt_config, keep_alive = _builder_config(trt, builder, config, progress)
    start = time.perf_counter()
    if progress is not None and keep_alive.get("monitor") is None:
        progress("build", 0.0)
    serialized = builder.build_serialized_network(network, trt_config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} could not build the engine: {'; '.join(logger.errors[-5:]) or 'no error was logged'}",
                               hint=f"reproduce with: {command} --verbose")
    if progress is not None and keep_alive.get("monitor") is None:
        progress("build", 1.0)
    if config.timing_cache:
        Path(config.timing_cache).write_bytes(bytes(trt_config.get_timing_cache().serialize()))
    engine = bytes(serialized)
    log.info("built engine of %d bytes in %.1f s", len(engine), seconds)
    return BuildResult(engine, seconds, str(trt.__version__), _layer_precisions(trt, logger, engine), command)


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError("cannot build a TensorRT engine: the tensorrt Python package is not installed", hint=_TRT_HINT) from exc
    return trt


def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to ``logging`` and keeps the errors for the message."""
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == sev.INFO:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parse(trt: Any, builder: Any, logger: Any, onnx: bytes, config: EngineBuildConfig) -> tuple[Any, Any]:
    """The parsed network, and its parser (which must outlive it)."""
    flags = trt.NetworkDefinitionCreationFlag
    if config.strongly_typed and not hasattr(flags, "STRONGLY_TYPED"):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks (TensorRT >= 10)",
                               hint="use strongly_typed=False (INT8 + FP16 flags)")
    if config.strongly_typed:
        network = builder.create_network(1 << int(flags.STRONGLY_TYPED))
    elif int(trt.__version__.split(".")[0]) < 10:
        network = builder.create_network(1 << int(flags.EXPLICIT_BATCH))
    else:
        network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected the graph: {'; '.join(errors) or 'no error reported'}",
                               hint="check the graph with onnx.checker and converters.trt_rules")
    return network, parser


def _builder_config(trt: Any, builder: Any, config: EngineBuildConfig, progress: Progress | None) -> tuple[Any, dict[str, Any]]:
    """A ``trt.IBuilderConfig`` for ``config``; ``keep_alive`` holds Python objects TensorRT only borrows."""
    cfg = builder.create_builder_config()
    keep_alive: dict[str, Any] = {}
    if hasattr(cfg, "set_memory_pool_limit"):
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    else:
        cfg.max_workspace_size = config.workspace_mb << 20
    if hasattr(cfg, "builder_optimization_level"):
        cfg.builder_optimization_level = config.optimization_level
    elif config.optimization_level != 3:
        log.warning("TensorRT %s has no builder optimization level; optimization_level=%d is ignored", trt.__version__, config.optimization_level)
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _set_precision(trt, cfg, config, keep_alive)
    if config.sparsity:
        cfg.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if config.dla_core is not None:
        cfg.default_device_type = trt.DeviceType.DLA
        cfg.DLA_core = config.dla_core
        if config.gpu_fallback:
            cfg.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for profile in config.profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.shapes.items():
            opt.set_shape(name, lo, mid, hi)
        cfg.add_optimization_profile(opt)
    if config.timing_cache:
        path = Path(config.timing_cache)
        cache = cfg.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        cfg.set_timing_cache(cache, ignore_mismatch=False)
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        keep_alive["monitor"] = cfg.progress_monitor = _make_monitor(trt, progress)
    return cfg, keep_alive


def _set_precision(trt: Any, cfg: Any, config: EngineBuildConfig, keep_alive: dict[str, Any]) -> None:
    if config.strongly_typed:
        return  # the Q/DQ graph's own types decide every layer
    if config.precision in ("fp16", "int8"):
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineBuildError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only)",
                                   hint="build with strongly_typed=True from a Q/DQ graph")
        cfg.set_flag(trt.BuilderFlag.FP16)  # int8 engines too: their float layers run fp16, not fp32
    if config.precision == "int8":
        cfg.set_flag(trt.BuilderFlag.INT8)  # explicit: the Q/DQ nodes set the int8 scales
    if config.precision == "int8" and not config.explicit:
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise EngineBuildError(f"TensorRT {trt.__version__} has no implicit int8 calibration", hint="build the Q/DQ graph with explicit=True")
        log.warning("implicit int8 calibration is deprecated since TensorRT 10 and removed in 11; prefer explicit=True")
        keep_alive["calibrator"] = cfg.int8_calibrator = _make_calibrator(trt, str(config.calibration_cache))


def _make_calibrator(trt: Any, cache_text: str) -> Any:
    """An entropy calibrator that only serves an existing cache (it never sees data)."""

    class _CacheCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self, cache: bytes) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # no data: TensorRT must take every scale from the cache

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return _CacheCalibrator(cache_text.encode())


def _make_monitor(trt: Any, progress: Progress) -> Any:
    """A ``trt.IProgressMonitor`` (TensorRT >= 10) forwarding ``(phase, fraction)`` to ``progress``."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._lock = threading.Lock()  # TensorRT may call from several threads

        def _emit(self, phase: str, fraction: float) -> None:
            try:
                with self._lock:
                    progress(phase, fraction)
            except Exception:  # a failing callback must not abort the build
                log.exception("progress callback failed for phase %r", phase)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._steps[phase_name] = max(int(num_steps), 1)
            self._emit(phase_name, 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            self._emit(phase_name, min((step + 1) / self._steps.get(phase_name, 1), 1.0))
            return True

        def phase_finish(self, phase_name: str) -> None:
            self._emit(phase_name, 1.0)

    return _Monitor()


_PRECISION_WORDS = (("int8", "int8"), ("fp16", "fp16"), ("half", "fp16"), ("bf16", "bf16"), ("fp8", "fp8"),
                    ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("bool", "bool"))


def _layer_precisions(trt: Any, logger: Any, engine: bytes) -> dict[str, str]:
    """``{layer: precision of its first output}`` from the engine inspector, or ``{}``."""
    try:
        runtime = trt.Runtime(logger)
        cuda_engine = runtime.deserialize_cuda_engine(engine)
        if cuda_engine is None or not hasattr(cuda_engine, "create_engine_inspector"):
            return {}
        info = json.loads(cuda_engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # inspection is a report, never a reason to lose a built engine
        log.warning("could not inspect the engine's layer precisions", exc_info=True)
        return {}
    result: dict[str, str] = {}
    for layer in info.get("Layers", []):
        if isinstance(layer, dict) and layer.get("Outputs"):
            fmt = str(layer["Outputs"][0].get("Format/Datatype", "")).lower()
            word = next((p for w, p in _PRECISION_WORDS if re.search(rf"\b{w}\b", fmt)), fmt or "unknown")
            result[str(layer.get("Name", len(result)))] = word
    return result

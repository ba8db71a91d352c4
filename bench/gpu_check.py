"""The device check: one short script a machine with an NVIDIA GPU runs to verify the GPU path.

    python -m bench.gpu_check [--packages build/demo/packages] [--out gpu_check.json]

It verifies what this machine has and says what it could not try: the device facts, each CUDA
binding (buffers and streams, from several threads), onnxruntime's CUDA and TensorRT providers
against the CPU provider, and with TensorRT: engines built here (fp32, fp16 and int8 Q/DQ),
the runner against onnxruntime CPU outputs, threaded inference, text at 60 and 120 tokens (one
profile per length bucket), batch 32 and 40 (split beyond the profile), fp16 parity; with
``--packages``, runner selection on each package found there. Every row is ``ran``,
``FAILED`` or ``not available`` with the reason. The exit status is 1 when a row failed.
Nothing here is a timed benchmark: the figures are correctness margins.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROWS: list[dict[str, str]] = []


class NotAvailable(Exception):
    """This check cannot run here (no module, no provider); not a failure."""


def _together(work: Callable[[int], None], args: Any) -> None:
    """``work(arg)`` for every arg, all on their own threads at once (work records its own failures)."""
    from concurrent.futures import ThreadPoolExecutor

    args = list(args)
    with ThreadPoolExecutor(len(args)) as pool:
        list(pool.map(work, args))


def check(name: str, run: Callable[[], str]) -> None:
    try:
        ROWS.append({"check": name, "status": "ran", "detail": run()})
    except NotAvailable as exc:
        ROWS.append({"check": name, "status": "not available", "detail": str(exc)})
    except Exception as exc:  # noqa: BLE001 - every failure is a row, the script goes on
        ROWS.append({"check": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc(file=sys.stderr)


# --- tiny models, built here so the check needs no data ---------------------------------------


def _image_model(qdq: bool = False) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    head = rng.standard_normal((4, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head")]
    nodes = []
    source = "image"
    if qdq:  # explicit int8: symmetric per-tensor Q/DQ on the activation, per-channel int8 weights
        scale = np.abs(w).reshape(8, -1).max(1) / 127
        wq = np.round(w / scale[:, None, None, None]).astype(np.int8)
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(8, np.int8), "wz"), numpy_helper.from_array(head, "head"),
                 numpy_helper.from_array(np.array(1 / 127, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.int8), "xz")]
        nodes += [helper.make_node("QuantizeLinear", ["image", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0)]
        source = "xd"
    nodes += [helper.make_node("Conv", [source, "w"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "head"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "image", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _text_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "two"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["x"]),
             helper.make_node("ReduceSum", ["x", "one"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["m", "one"], ["n"], keepdims=1),
             helper.make_node("Div", ["s", "n"], ["logits"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "two")]
    graph = helper.make_graph(nodes, "text", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _specs(model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    from runtime.manifest import TensorSpec

    def spec(v: Any) -> TensorSpec:
        dtype = {1: "float32", 7: "int64"}[v.type.tensor_type.elem_type]
        return TensorSpec(v.name, dtype, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))

    return tuple(map(spec, model.graph.input)), tuple(map(spec, model.graph.output))


def _images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)}


def _tokens(n: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    return {"input_ids": rng.integers(0, 64, (n, length)), "attention_mask": np.ones((n, length), np.int64)}


def _cpu(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, float(np.abs(want).max())))


# --- the checks ---------------------------------------------------------------------------------


def _standin() -> bool:
    """tensorrt here is tests/standin's API stand-in (which marks its engines with MAGIC)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "MAGIC")


def device_facts() -> str:
    import devices
    from devices.install import install_advice, python_env

    info = devices.detect()
    if _standin():
        raise AssertionError("tensorrt here is the API stand-in of tests/standin: this run verifies no GPU")
    todo = [a.line() for a in install_advice(info, python_env()) if not a.ok]
    facts = (f"{platform.machine()}, GPU {info.gpu_name} (sm {info.gpu_compute_capability}), CUDA {info.cuda_version}, "
             f"TensorRT {info.tensorrt_version}, onnxruntime {info.onnxruntime_version} {list(info.onnxruntime_providers)}, "
             f"key {devices.fingerprint(info).key}")
    return facts + (f"; {'; '.join(todo)}" if todo else "")


def cuda_binding(name: str) -> Callable[[], str]:
    def run() -> str:
        from runtime.runners.cuda import load_cuda

        try:
            cuda = load_cuda(name)
        except Exception as exc:  # noqa: BLE001
            raise NotAvailable(str(exc)) from exc
        errors: list[str] = []

        def roundtrip(seed: int) -> None:
            with cuda.bound():
                data = np.random.default_rng(seed).random(1 << 16).astype(np.float32)
                host_in, host_out = cuda.alloc_host(data.size, data.dtype), cuda.alloc_host(data.size, data.dtype)
                device, spare, stream = cuda.alloc_device(data.nbytes), cuda.alloc_device(4), cuda.stream()
                np.copyto(host_in, data)
                cuda.htod(device, host_in, stream)
                cuda.dtoh(host_out, device, stream)
                cuda.sync(stream)
                if not np.array_equal(host_out, data):
                    errors.append(f"thread {seed}: round trip changed the data")
                cuda.free(device, host_in)
                cuda.free(spare, host_out)
                cuda.destroy_stream(stream)

        _together(roundtrip, range(4))
        if errors:
            raise AssertionError("; ".join(errors))
        return "pinned buffers, a stream and a 256 KiB round trip from 4 threads"

    return run


def ort_provider(provider: str) -> Callable[[], str]:
    def run() -> str:
        import onnxruntime as ort

        if provider not in ort.get_available_providers():
            raise NotAvailable(f"onnxruntime {ort.__version__} offers {ort.get_available_providers()}")
        model = _image_model()
        session = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
        if session.get_providers()[0] != provider:
            raise AssertionError(f"the session fell back to {session.get_providers()}")
        feeds = _images(8)
        diff = _relative(session.run(None, feeds)[0], _cpu(model, feeds))
        if diff > 1e-2:
            raise AssertionError(f"differs from CPU by {diff:.2e}")
        return f"image model batch 8 within {diff:.1e} of the CPU provider"

    return run


def _tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise NotAvailable("the tensorrt Python package is not installed") from exc
    return trt


def trt_engine(precision: str) -> Callable[[], str]:
    def run() -> str:
        from converters.engine import EngineBuildConfig, build_engine, profiles_for
        from runtime.runners.tensorrt import TensorRTRunner

        _tensorrt()
        model = _image_model(qdq=precision == "int8")
        inputs, outputs = _specs(model)
        result = build_engine(model.SerializeToString(), EngineBuildConfig(
            precision=precision, profiles=profiles_for(inputs, (1, 8, 32))))
        limit = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}[precision]
        with TensorRTRunner(result.engine, inputs, outputs) as runner:
            worst = 0.0
            for n in (1, 8, 32, 40):  # 40 > the profile's 32: split in two runs
                feeds = _images(n, n)
                worst = max(worst, _relative(runner.infer(feeds)["logits"], _cpu(model, feeds)))
        if worst > limit:
            raise AssertionError(f"differs from onnxruntime CPU by {worst:.2e} (> {limit})")
        kinds = sorted(set(result.layer_precisions.values()))
        return (f"built in {result.seconds:.1f} s (layers {kinds}); batch 1/8/32/40 within {worst:.1e} of CPU "
                f"(tolerance {limit})")

    return run


def trt_threads() -> str:
    from converters.engine import EngineBuildConfig, build_engine, profiles_for
    from runtime.runners.tensorrt import TensorRTRunner

    _tensorrt()
    model = _image_model()
    inputs, outputs = _specs(model)
    engine = build_engine(model.SerializeToString(), EngineBuildConfig(precision="fp32", profiles=profiles_for(inputs))).engine
    want = {seed: _cpu(model, _images(4, seed)) for seed in range(8)}
    errors: list[str] = []
    runner = TensorRTRunner(engine, inputs, outputs, max_contexts=2).activate()

    def work(seed: int) -> None:
        try:
            for _ in range(10):
                diff = _relative(runner.infer(_images(4, seed))["logits"], want[seed])
                if diff > 1e-3:
                    errors.append(f"thread {seed}: {diff:.2e}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    _together(work, range(8))
    contexts = runner.contexts
    runner.deactivate()
    if errors:
        raise AssertionError("; ".join(errors[:3]))
    return f"8 threads x 10 calls on one runner ({contexts} execution contexts), all within 1e-3 of CPU"


def trt_text() -> str:
    from converters.engine import EngineBuildConfig, build_engine, profiles_for
    from runtime.runners.tensorrt import TensorRTRunner

    _tensorrt()
    model = _text_model()
    inputs, outputs = _specs(model)
    profiles = profiles_for(inputs)
    engine = build_engine(model.SerializeToString(), EngineBuildConfig(precision="fp32", profiles=profiles)).engine
    worst = 0.0
    with TensorRTRunner(engine, inputs, outputs) as runner:
        for length in (60, 120, 16):
            feeds = _tokens(3, length)
            worst = max(worst, _relative(runner.infer(feeds)["logits"], _cpu(model, feeds)))
    if worst > 1e-3:
        raise AssertionError(f"differs from CPU by {worst:.2e}")
    return f"{len(profiles)} profiles; 60, 120 and 16 tokens within {worst:.1e} of CPU"


def package_selection(path: Path) -> Callable[[], str]:
    def run() -> str:
        from runtime.package import Package
        from runtime.select import select_runner

        selection = select_runner(Package.open(path))
        try:
            parity = selection.parity
            skipped = "; ".join(f"{s.backend}: {s.reason[:80]}" for s in selection.skipped)
            return (f"{selection.backend} ({selection.precision_label}), parity "
                    f"{parity.max_abs_diff if parity else float('nan'):.1e}" + (f"; skipped {skipped}" if skipped else ""))
        finally:
            selection.runner.deactivate()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, help="folder of .edgepkg files to run selection on")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    check("device facts", device_facts)
    for binding in ("cuda-python", "pycuda"):
        check(f"CUDA binding {binding}", cuda_binding(binding))
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        check(f"onnxruntime {provider}", ort_provider(provider))
    for precision in ("fp32", "fp16", "int8"):
        check(f"TensorRT engine {precision}", trt_engine(precision))
    check("TensorRT threaded inference", trt_threads)
    check("TensorRT text profiles", trt_text)
    for package in sorted(args.packages.glob("*.edgepkg")) if args.packages else []:
        check(f"selection {package.name}", package_selection(package))
    width = max(len(r["check"]) for r in ROWS)
    print(f"{'check':<{width}}  {'status':<13}  detail")
    for row in ROWS:
        print(f"{row['check']:<{width}}  {row['status']:<13}  {row['detail']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(ROWS, indent=2) + "\n")
    return 1 if any(r["status"] == "FAILED" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())

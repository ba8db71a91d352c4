"""Benchmark: what the SDK's pipeline costs on top of a bare onnxruntime session.

    python -m bench.runtime_overhead [--package build/demo/packages/surface-defects.edgepkg]

Baseline, measured in the same run: ``InferenceSession.run`` on an already
preprocessed batch. Figures are printed as ratios to that baseline, since the
machines here are shared and noisy. Without ``--package`` a small convolutional
model is built with onnx.helper (needs the ``convert`` extra).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

import edge_sdk


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _small_cnn_package(tmp: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (32, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (64, 32, 3, 3)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.normal(0, 0.1, (5, 64)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], initializer=[w1, w2, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp / "m.onnx")
    edge_sdk.convert(tmp / "m.onnx", tmp / "cnn.edgepkg", task="image-classification", labels=list("abcde"),
                     preprocess={"resize": [224, 224], "mean": [127, 127, 127], "std": [128, 128, 128]})
    return tmp / "cnn.edgepkg"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="an image package (default: a small CNN built here)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or _small_cnn_package(Path(tmp))
        frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        encoded = bytes(__import__("cv2").imencode(".jpg", frame)[1])
        with edge_sdk.load(package, backend="onnxruntime-cpu", threads=args.threads) as model:
            runner = model.runner
            session = runner.session  # the bare onnxruntime session: the baseline
            name = runner.outputs[0].name
            rows: dict[int, dict[str, float]] = {}
            for n in (1, 8):  # each figure against the baseline at the same batch size
                frames = [frame] * n
                feeds = model.pipeline.encode(frames)
                base = _median_ms(lambda: session.run([name], feeds), args.repeats)
                rows[n] = {
                    "baseline session.run": base,
                    "runner.infer (input checks)": _median_ms(lambda: runner.infer(feeds), args.repeats),
                    "predict_batch(BGR arrays)": _median_ms(lambda: model.predict_batch(frames), args.repeats),
                    "predict_batch(JPEG bytes)": _median_ms(lambda: model.predict_batch([encoded] * n), args.repeats),
                }
    print(f"package: {package if args.package else 'small CNN (built here)'}; threads {args.threads}")
    for n, figures in rows.items():
        base = figures["baseline session.run"]
        print(f"batch {n}: baseline session.run {base:.2f} ms per batch (= 1.00)")
        for label, ms in figures.items():
            if label != "baseline session.run":
                print(f"  {label:<30} {ms:8.2f} ms  {ms / base:5.2f}x baseline")


if __name__ == "__main__":
    main()

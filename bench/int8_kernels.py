"""Which int8 forms does onnxruntime compute exactly on this CPU? A probe of its fused integer kernels.

    python -m bench.int8_kernels [--json out.json]

For each layer kind the demo models use (1x1 convolution, 3x3 convolution, depthwise 3x3,
fully connected Gemm, transformer MatMul) and each int8 form (``u8s8``: uint8 activations, int8
weights; ``u8s7``: the same with 7-bit weights; ``u8u8``: uint8 weights with zero point 128, the
same integers as ``u8s8``; ``s8s8``: int8 activations), a one-layer Q/DQ graph is run twice: with
onnxruntime's fused integer kernels (what a device runs) and with the exact reference
(``converters.reference``: Q/DQ as the spec defines them, no intermediate can saturate). Inputs are
random over the full quantized range, the case where pairs of uint8 x int8 products overflow
int16 in kernels built on VPMADDUBSW (x86 without VNNI). The figure is the largest difference
relative to the largest reference output; anything above ~1e-2 means the kernel is not exact.

The result depends on the machine: run it natively, and under ``qemu-x86_64-static -cpu max``
(AVX2, no AVX-512, no VNNI) or an Arm64 root to see the other instruction sets.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.reference import run_reference

FORMS = {"u8s8": ("uint8", "int8", 127), "u8s7": ("uint8", "int8", 64), "u8u8": ("uint8", "uint8", 127),
         "s8s8": ("int8", "int8", 127)}
LAYERS = ("conv1x1", "conv3x3", "depthwise3x3", "gemm", "matmul")
EXACT = 1e-2


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _layer(kind: str, rng: np.random.Generator) -> tuple[tuple[int, ...], np.ndarray, dict[str, Any]]:
    """Input shape, float weight and node attributes of one layer of ``kind``."""
    c = 64
    if kind == "conv1x1":
        return (2, c, 8, 8), rng.standard_normal((c, c, 1, 1)).astype(np.float32), {}
    if kind == "conv3x3":
        return (2, c, 8, 8), rng.standard_normal((c, c, 3, 3)).astype(np.float32), {"pads": [1, 1, 1, 1]}
    if kind == "depthwise3x3":
        return ((2, c, 8, 8), rng.standard_normal((c, 1, 3, 3)).astype(np.float32),
                {"pads": [1, 1, 1, 1], "group": c})
    if kind == "gemm":
        return (8, 256), rng.standard_normal((128, 256)).astype(np.float32), {"transB": 1}
    return (2, 16, 256), rng.standard_normal((256, 128)).astype(np.float32), {}


def _weights(w: np.ndarray, kind: str, wtype: str, wmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    axis = 1 if kind == "matmul" else 0
    others = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=others) / wmax).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    lowest = -128 if wmax == 127 else -wmax  # 7-bit weights are symmetric: [-64, 64]
    q = np.clip(np.rint(w / scale.reshape(shape)), lowest, wmax).astype(np.int32)
    if wtype == "uint8":
        return (q + 128).astype(np.uint8), scale, np.full(scale.shape, 128, np.uint8), axis
    return q.astype(np.int8), scale, np.zeros(scale.shape, np.int8), axis


def probe_model(kind: str, form: str, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """A one-layer Q/DQ graph in ``form`` and a feed spanning the whole activation range."""
    atype, wtype, wmax = FORMS[form]
    rng = np.random.default_rng(seed)
    shape, w, attrs = _layer(kind, rng)
    wq, wscale, wzero, axis = _weights(w, kind, wtype, wmax)
    a_zero = np.array(0 if atype == "int8" else 128, np.int8 if atype == "int8" else np.uint8)
    a_scale = np.array(4.0 / 127, np.float32)
    x = rng.uniform(-4.0, 4.0, shape).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis)]
    op = {"gemm": "Gemm", "matmul": "MatMul"}.get(kind, "Conv")
    nodes.append(helper.make_node(op, ["xd", "wd"], ["y"], **attrs))
    y_scale = np.array(1.0, np.float32)  # fixed below from the reference output's range
    nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    inits = [_init("xs", a_scale), _init("xz", a_zero), _init("wq", wq), _init("ws", wscale), _init("wz", wzero),
             _init("ys", y_scale), _init("yz", a_zero)]
    graph = helper.make_graph(nodes, f"{kind}_{form}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ref = _float_output(model, x)
    span = float(np.abs(ref).max()) or 1.0  # output scale so that the output range fills the type
    scale = np.array(span / (127 if atype == "int8" else 255) * (1 if atype == "int8" else 2), np.float32)
    for init in model.graph.initializer:
        if init.name == "ys":
            init.CopyFrom(_init("ys", scale))
    return model, x


def _float_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return run_reference(probe, [{"x": x}])


def fused_error(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Largest |fused - reference| relative to the largest reference output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    fused = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = fused.run(None, {"x": x})[0]
    ref = run_reference(model, [{"x": x}])
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def probe_all() -> dict[str, dict[str, float]]:
    return {kind: {form: fused_error(*probe_model(kind, form)) for form in FORMS} for kind in LAYERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    import devices
    import onnxruntime as ort

    info = devices.detect()
    results = probe_all()
    print(f"machine: {platform.machine()}, cpu int8 features {sorted(info.cpu_flags)} (from /proc/cpuinfo; under "
          f"qemu-user this is the host's), onnxruntime {ort.__version__}")
    print("largest |fused - exact| / largest output; 'EXACT' below 1e-2")
    print("layer         " + "".join(f"{f:>16}" for f in FORMS))
    for kind, row in results.items():
        cells = "".join(f"{row[f]:>10.2e} {'EXACT' if row[f] < EXACT else 'WRONG':>5}" for f in FORMS)
        print(f"{kind:<14}{cells}")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": platform.machine(), "onnxruntime": ort.__version__, "errors": results}, f, indent=1)


if __name__ == "__main__":
    main()

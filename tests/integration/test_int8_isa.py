"""int8 that is right on every CPU: one graph per CPU family, chosen by the device's facts, checked by
golden vectors from the exact reference, and mixed precision that always ends in a usable package.

What these tests assert holds on every ISA (x86 with or without VNNI, Arm64): figures are measured
by the exact reference, and the fused kernels are only asked to run the graph made for their CPU.
"""

from __future__ import annotations

import io
from dataclasses import replace
import platform
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import devices
import edge_sdk
import runtime.backends as backends
from converters.calibration.methods import CalibrationMethod
from converters.ir import name_nodes
from converters.qdq import Variant
from converters.quantize import build_variant, mixed_precision, prepare_int8
from converters.reference import run_reference
from runtime.package import Package, write_package
from tests import builders


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def cnn_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    tmp = tmp_path_factory.mktemp("isa")
    onnx.save(builders.cnn_model(), tmp / "cnn.onnx")
    rng = np.random.default_rng(3)
    np.save(tmp / "calib.npy", rng.random((64, 3, 16, 16), dtype=np.float32) * 2 - 1)
    pre = {"resize": [16, 16], "mean": [127, 127, 127], "std": [128, 128, 128]}
    edge_sdk.convert(tmp / "cnn.onnx", tmp / "cnn.edgepkg", task="image-classification", labels=builders.COLOR_LABELS,
                     preprocess=pre, calibration=tmp / "calib.npy", quantize="int8", method="entropy", budget=None)
    held = np.random.default_rng(99).random((32, 3, 16, 16), dtype=np.float32) * 2 - 1
    return tmp / "cnn.edgepkg", tmp / "cnn.onnx", held


@pytest.mark.parametrize(("arch", "flags", "graph"), [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "u8s8"),
    ("x86_64", {"avx2", "avx_vnni"}, "u8s8"),
    ("x86_64", {"avx2"}, "u8s7"),
    ("x86_64", {"avx2", "avx512f"}, "u8s7"),  # AVX-512 without VNNI saturates too
    ("x86_64", set(), "u8s7"),  # unknown features: the form exact on every x86
    ("aarch64", {"asimd", "asimddp"}, "u8s8"),
    ("aarch64", {"asimd"}, "u8s8"),  # Cortex-A57 (Jetson Nano): widening multiplies, exact
])
def test_each_cpu_family_gets_the_graph_its_kernels_compute_exactly(arch: str, flags: set[str], graph: str) -> None:
    chosen, reason = backends.cpu_int8_graph(arch, frozenset(flags))
    assert chosen == graph and reason


def test_package_carries_every_graph_and_each_is_faithful_on_the_reference(
        cnn_package: tuple[Path, Path, np.ndarray]) -> None:
    path, fp32_path, held = cnn_package
    package = Package.open(path)
    assert set(package.manifest.graphs) == {"u8s8", "u8s7", "s8s8"}
    ref = run_reference(onnx.load(fp32_path), [{"image": held}])
    for graph in package.manifest.graphs:
        out = run_reference(onnx.load_from_string(package.read_bytes(package.manifest.graphs[graph])), [{"image": held}])
        assert _cosine(ref, out) >= 0.98, graph
        assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.9, graph
    per_graph = package.manifest.reports["int8"]["per_graph"]
    assert set(per_graph) == {"u8s8", "u8s7", "s8s8"} and all(g["mean_cosine"] >= 0.98 for g in per_graph.values())


def test_loading_serves_this_cpus_graph_and_names_it(cnn_package: tuple[Path, Path, np.ndarray]) -> None:
    path, _, held = cnn_package
    info = devices.detect()
    expected, reason = backends.this_cpu_int8_graph()
    image = np.random.default_rng(5).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    with edge_sdk.load(path, backend="cpu") as model:
        print(f"ISA {platform.machine()} {sorted(info.cpu_flags)}: serving {model.info['graph']}")
        assert model.info["graph"] == expected and model.info["graph_reason"] == reason
        assert model.info["precision_served"] == f"int8-{expected}"
        assert model.predict(image).precision == f"int8-{expected}"


def _with_golden(path: Path, out: Path, graph: str, scale: float) -> Path:
    """A copy of the package whose golden outputs for ``graph`` are off by ``scale``: a device whose
    int8 kernels diverge from the converter's exact computation sees exactly this."""
    package = Package.open(path)
    files = {name: package.read_bytes(name) for name in package.manifest.files}
    with zipfile.ZipFile(io.BytesIO(files["golden.npz"])) as zf:
        arrays = {n[:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist()}
    for key in arrays:
        if key.startswith(f"out@{graph}."):
            arrays[key] = arrays[key] * scale + 1.0
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    files["golden.npz"] = buf.getvalue()
    return write_package(package.manifest, files, out).path


def test_int8_graph_that_fails_parity_serves_fp32_on_the_cpu_and_says_why(
        cnn_package: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    path, _, _ = cnn_package
    graph, _ = backends.this_cpu_int8_graph()
    broken = _with_golden(path, tmp_path / "diverging.edgepkg", graph, 3.0)
    with edge_sdk.load(broken, backend="cpu") as model:
        assert model.info["graph"] == "fp32" and model.info["precision_served"] == "fp32"
        skipped = {s["backend"]: s["reason"] for s in model.info["skipped_backends"]}
        assert f"onnxruntime-cpu (int8-{graph})" in skipped
        assert "golden-vector check" in skipped[f"onnxruntime-cpu (int8-{graph})"]
    with pytest.raises(edge_sdk.errors.BackendUnavailableError, match="golden-vector check"):
        edge_sdk.load(broken, backend="cpu", precision="int8")


def _calibrated(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    return prepare_int8(name_nodes(model), batches, CalibrationMethod.MINMAX)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_every_layer_in_float_is_exactly_the_fp32_graph(kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "cnn":
        model = builders.cnn_model()
        batches = [{"image": rng.random((8, 3, 16, 16), dtype=np.float32) * 2 - 1} for _ in range(2)]
    else:
        model = builders.transformer_model()
        ids = rng.integers(4, len(builders.VOCAB), (8, 12)).astype(np.int64)
        batches = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
    cal, placement = _calibrated(model, batches)
    fp32 = run_reference(name_nodes(model), batches)
    for variant in Variant:
        assert any(n.op_type == "QuantizeLinear" for n in build_variant(cal, placement, variant).graph.node)
        none = build_variant(cal, replace(placement, nodes=(), attention=()), variant)  # every layer in float
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in none.graph.node)
        assert np.array_equal(run_reference(none, batches), run_reference(cal.model, batches))
    # the search's all-float graph is the original one: exactly fp32, no smoothing or equalization left
    score = {"calls": 0}

    def metric(graph: onnx.ModelProto) -> float:
        score["calls"] += 1
        out = run_reference(graph, batches)
        return 100.0 * float(np.mean(out.argmax(-1) == fp32.argmax(-1))) - (0.0 if np.array_equal(out, fp32) else 50.0)

    sensitivity = {n: float(i) for i, n in enumerate(placement.nodes)}
    graph, floats, steps = mixed_precision(cal, placement, Variant.U8S8, sensitivity, metric, 100.0, 0.0)
    assert set(floats) == set(placement.layers(Variant.U8S8)) and np.array_equal(run_reference(graph, batches), fp32)
    assert steps[-1]["within_budget"] or any(s["within_budget"] and s["float_layers"] == len(floats) for s in steps)
    assert len(steps) <= int(np.ceil(np.log2(len(placement.layers(Variant.U8S8))))) + 2 and score["calls"] == len(steps)


def test_mixed_precision_ends_within_the_budget_with_every_step_reported(tmp_path: Path, image_folder: Path) -> None:
    onnx.save(builders.cnn_model(size=8), tmp_path / "cnn.onnx")
    report = edge_sdk.convert(tmp_path / "cnn.onnx", tmp_path / "p.edgepkg", task="image-classification",
                              labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(),
                              calibration=image_folder, validation=image_folder, quantize="int8", budget=0.0)
    assert report.int8 is not None
    for graph, result in report.int8["per_graph"].items():
        steps = result["mixed_precision_steps"]
        chosen = [s for s in steps if s["float_layers"] == len(result["float_layers"])]
        assert chosen and chosen[-1]["within_budget"] and chosen[-1]["drop"] <= 0.0, graph
        assert len(steps) <= 2 + int(np.ceil(np.log2(max(2, len(report.int8["layers"]))))), graph


def test_cpuinfo_that_cpuid_denies_is_not_trusted() -> None:
    from devices.cpu import reconcile_with_cpuid

    host = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    emulated = {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}  # qemu-user -cpu max on a VNNI host
    flags, note = reconcile_with_cpuid(host, emulated)
    assert flags == {"avx2"} and note and "CPUID denies" in note
    assert backends.cpu_int8_graph("x86_64", flags)[0] == "u8s7"
    alder_lake = {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}  # AVX-VNNI without AVX-512: nothing denied
    assert reconcile_with_cpuid(frozenset({"avx2", "avx_vnni"}), alder_lake) == (frozenset({"avx2", "avx_vnni"}), None)
    assert reconcile_with_cpuid(host, None) == (host, None)

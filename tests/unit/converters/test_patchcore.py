"""task='anomaly-detection': a PatchCore-class model fitted on good parts only, one graph, on small
generated parts (a random-weight CNN built here; textured grey parts vs drawn scratches and spots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge_sdk
from converters import patchcore
from converters.qdq import FLOAT_SCOPE
from converters.trt_rules import check_trt_qdq
from edge_sdk.cli import main
from edge_sdk.errors import ConversionError, EdgeSDKError
from runtime.package import Package
from runtime.sinks import AnnotatedFrameSink
from tests import builders

SIZE = 96
PRE = {"resize": [SIZE, SIZE], "mean": [127, 127, 127], "std": [64, 64, 64]}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builders.write_parts(tmp_path_factory.mktemp("parts"), size=SIZE)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builders.save(builders.backbone_model(size=SIZE), tmp_path_factory.mktemp("model") / "backbone.onnx")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, parts: Path, backbone: Path) -> edge_sdk.ConversionReport:
    return edge_sdk.convert(backbone, tmp_path_factory.mktemp("pkg") / "parts.edgepkg", task="anomaly-detection",
                            normal=parts / "good", preprocess=PRE, validation=parts / "val", coreset_ratio=0.1)


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.png"))


def test_stage_outputs_at_strides_16_and_32_are_the_default_feature_maps() -> None:
    layers = patchcore.feature_layers(builders.backbone_model(size=SIZE), (SIZE, SIZE))
    assert [(m.name, m.stride, m.channels, m.height) for m in layers] == [("stage4", 16, 16, 6), ("stage5", 32, 24, 3)]
    named = patchcore.feature_layers(builders.backbone_model(size=SIZE), (SIZE, SIZE), ["c3_act", "stage4"])
    assert [(m.name, m.stride) for m in named] == [("c3_act", 8), ("stage4", 16)]
    with pytest.raises(ConversionError, match=r"feature layers \['nope'\] are not 4-D feature maps"):
        patchcore.feature_layers(builders.backbone_model(size=SIZE), (SIZE, SIZE), ["nope"])


def test_greedy_coreset_covers_every_cluster_a_random_subset_misses() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 50, (6, 8))
    sizes = [500, 500, 500, 500, 5, 5]  # two rare kinds of good surface
    points = np.concatenate([c + rng.normal(0, 1, (n, 8)) for c, n in zip(centres, sizes)]).astype(np.float32)
    chosen = patchcore.greedy_coreset(points, 6)
    assert len(set(chosen.tolist())) == 6
    owner = np.repeat(np.arange(6), sizes)
    assert sorted(owner[chosen].tolist()) == [0, 1, 2, 3, 4, 5]  # one per cluster, the rare ones included

    def radius(idx: np.ndarray) -> float:
        return float(np.sqrt(((points[:, None] - points[idx][None]) ** 2).sum(-1).min(1).max()))

    assert radius(chosen) < radius(rng.choice(len(points), 6, replace=False))
    with pytest.raises(ConversionError, match="coreset size 0"):
        patchcore.greedy_coreset(points, 0)


def test_auroc_is_the_share_of_defect_good_pairs_ranked_right() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(0, 1, 40), 1)  # ties on purpose
    defect = rng.random(40) < 0.4
    pairs = [(d > g) + 0.5 * (d == g) for d in scores[defect] for g in scores[~defect]]
    assert patchcore.auroc(scores, defect) == pytest.approx(np.mean(pairs))
    with pytest.raises(ConversionError, match="AUROC needs good and defect samples"):
        patchcore.auroc([1.0, 2.0], [True, True])


def test_fitted_on_good_parts_it_ranks_unseen_defects_above_them(fitted: edge_sdk.ConversionReport) -> None:
    report = fitted.anomaly
    assert report is not None and report["method"] == "patchcore"
    assert report["validation"]["auroc"] >= 0.95
    assert report["threshold_rule"] == "max balanced accuracy on the validation data"
    assert report["memory_bank"] == round(0.1 * report["patches"]) and report["patches"] == report["bank_images"] * 36
    assert report["held_out_images"] >= 1 and report["bank_images"] + report["held_out_images"] == 24
    assert any(line.startswith("anomaly validation (fp32): AUROC") for line in fitted.lines())
    assert report["latency_ms"]["fp32"] > 0 and sum(report["validation"]["histogram"]["ok"]) == 8
    assert sum(report["validation"]["histogram"]["defect"]) == 8


def test_the_package_is_one_graph_plain_onnxruntime_runs(fitted: edge_sdk.ConversionReport, parts: Path) -> None:
    package = Package.open(fitted.package)
    post = package.manifest.postprocess
    assert (post.kind, post.output, post.map_output, post.labels) == ("anomaly", "anomaly_score", "anomaly_map",
                                                                      ("ok", "defect"))
    assert post.threshold is not None and post.normal_score is not None and post.normal_score < post.threshold
    session = ort.InferenceSession(package.read_bytes(package.manifest.model), providers=["CPUExecutionProvider"])
    items = _images(parts / "val" / "defect")[:3] + _images(parts / "val" / "ok")[:3]
    with edge_sdk.load(fitted.package) as model:
        feeds = model.pipeline.encode(items)
        score, amap = session.run(["anomaly_score", "anomaly_map"], feeds)
        predictions = model.predict_batch(items)
    assert score.shape == (6,) and amap.shape == (6, 12, 12)  # the 6x6 patch grid, upsampled twice
    for p, s, m in zip(predictions, score, amap):
        assert p.score == pytest.approx(float(s), rel=1e-5)
        assert p.label == ("defect" if s >= post.threshold else "ok")
        assert p.extra["anomaly_map"].shape == (12, 12) and np.allclose(p.extra["anomaly_map"], m, rtol=1e-5)
        normal = (s - post.normal_score) / (post.threshold - post.normal_score)
        assert p.extra["normalized_score"] == pytest.approx(float(normal), rel=1e-5)
    assert float(amap[0].max()) <= float(score[0]) + 1e-5  # the smoothed map never exceeds the patch maximum
    shown = json.loads(json.dumps(predictions[0].to_dict()))
    assert len(shown["extra"]["anomaly_map"]) == 12 and len(shown["extra"]["anomaly_map"][0]) == 12


def test_without_validation_the_threshold_is_a_high_quantile_of_held_out_good_scores(
        tmp_path: Path, parts: Path, backbone: Path) -> None:
    report = edge_sdk.convert(backbone, tmp_path / "p.edgepkg", task="anomaly-detection", normal=parts / "good",
                              preprocess=PRE, coreset_ratio=0.1).anomaly
    assert report is not None and "validation" not in report
    assert report["threshold_rule"].startswith("99% quantile of the scores of 3 held-out good images")
    assert report["normal_score"] < report["threshold"] <= report["held_out_scores"]["max"]


def test_int8_quantizes_the_backbone_and_keeps_the_memory_bank_float(tmp_path: Path, parts: Path,
                                                                     backbone: Path) -> None:
    report = edge_sdk.convert(backbone, tmp_path / "p.edgepkg", task="anomaly-detection", normal=parts / "good",
                              preprocess=PRE, validation=parts / "val", coreset_ratio=0.1, quantize="int8",
                              budget=None)  # 16 validation images: one swapped pair moves AUROC 1.6 points
    assert report.anomaly is not None
    package = Package.open(report.package)
    for graph in ("s8s8", "u8s8"):
        model = onnx.load_from_string(package.read_bytes(package.manifest.graphs[graph]))
        writers = {o: n for n in model.graph.node for o in n.output}
        head = [n for n in model.graph.node if n.name.startswith(FLOAT_SCOPE)]
        inside = {o for n in head for o in n.output}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert head and not any(set(n.input) & inside for n in qdq)  # nothing after the backbone is quantized
        cross = next(n for n in head if n.op_type == "MatMul")
        assert cross.input[1] == f"{patchcore.SCOPE}bank_t_x_minus2"  # the bank is read as it is, in float
        kept_float = report.int8["per_graph"][graph]["float_layers"]  # type: ignore[index]
        convs = [n for n in model.graph.node if n.op_type == "Conv" and not n.name.startswith(FLOAT_SCOPE)]
        assert not kept_float
        assert all(writers[n.input[1]].op_type == "DequantizeLinear" for n in convs if n.name not in kept_float)
        bank = {i.name: i for i in model.graph.initializer}[f"{patchcore.SCOPE}bank_t_x_minus2"]
        assert bank.data_type == onnx.TensorProto.FLOAT
        if graph == "s8s8":
            assert check_trt_qdq(model) == []  # TensorRT's explicit-quantization rules hold with the float head
    # fidelity by the exact reference: the maps follow fp32 closely; AUROC per graph is reported (on this
    # random-weight toy the margins are thin; EfficientNet-Lite0 keeps it within 0.5 pt: bench/anomaly.py)
    fp32, int8 = report.anomaly["auroc_fp32"], report.anomaly["auroc_int8"]
    assert fp32 == pytest.approx(report.anomaly["validation"]["auroc"])
    assert set(int8) == {"s8s8", "u8s8", "u8s7"} and all(0.6 < v <= 1.0 for v in int8.values())
    assert all(g["mean_cosine"] >= 0.99 for g in report.int8["per_graph"].values())  # type: ignore[index]


def test_bad_requests_get_clear_errors(tmp_path: Path, parts: Path, backbone: Path) -> None:
    def convert(**kw: object) -> object:
        return edge_sdk.convert(backbone, tmp_path / "p.edgepkg", preprocess=PRE, **kw)  # type: ignore[arg-type]

    with pytest.raises(ConversionError, match="needs normal= a folder of good images"):
        convert(task="anomaly-detection")
    with pytest.raises(ConversionError, match="normal= \\(good images\\) is for task 'anomaly-detection'"):
        convert(task="image-classification", labels=["a", "b", "c"], normal=parts / "good")
    with pytest.raises(ConversionError, match="prune= does not apply to an anomaly-detection model"):
        convert(task="anomaly-detection", normal=parts / "good", prune="magnitude", calibration=parts / "good")
    with pytest.raises(ConversionError, match="expected two: \\[good, defect\\]"):
        convert(task="anomaly-detection", normal=parts / "good", labels=["ok", "dent", "scratch"])
    with pytest.raises(ConversionError, match="coreset_ratio is 0; expected the share"):
        convert(task="anomaly-detection", normal=parts / "good", coreset_ratio=0)
    with pytest.raises(ConversionError, match="feature_layers is 'stage4'; expected a list"):
        convert(task="anomaly-detection", normal=parts / "good", feature_layers="stage4")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "one.png").write_bytes((parts / "good" / "0.png").read_bytes())
    with pytest.raises(ConversionError, match="holds 1 image; expected at least 2"):
        convert(task="anomaly-detection", normal=empty)
    (empty / "two.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not")
    with pytest.raises(EdgeSDKError, match="two.png' could not be decoded"):
        convert(task="anomaly-detection", normal=empty)
    with pytest.raises(ConversionError, match="image folder .*nope' does not exist"):
        convert(task="anomaly-detection", normal=tmp_path / "nope")


def test_cli_builds_it_from_a_folder_of_good_images(tmp_path: Path, parts: Path, backbone: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.edgepkg"
    code = main(["convert", str(backbone), "-o", str(out), "--task", "anomaly-detection", "--normal",
                 str(parts / "good"), "--preprocess", json.dumps(PRE), "--validation", str(parts / "val"),
                 "--coreset-ratio", "0.2", "--feature-layers", "c3_act,stage4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "patches from c3_act (stride 8, 16 ch), stage4 (stride 16, 16 ch) (given)" in text
    report = Package.open(out).manifest.reports["anomaly"]
    assert report["coreset_ratio"] == 0.2 and report["grid"] == [12, 12]


def test_a_stream_of_frames_gets_maps_with_every_prediction(fitted: edge_sdk.ConversionReport, parts: Path,
                                                             tmp_path: Path) -> None:
    with edge_sdk.load(fitted.package) as model:
        direct = {Path(p).name: model.predict(p) for p in _images(parts / "val" / "defect")}
    streamed = list(edge_sdk.stream(str(parts / "val" / "defect"), fitted.package,
                                    batching={"max_batch": 4, "max_wait_ms": 2},
                                    sinks=[AnnotatedFrameSink(tmp_path / "frames")]))
    assert len(streamed) == len(direct)
    for r in streamed:
        expected = direct[r.frame.name]
        assert r.prediction.label == expected.label
        np.testing.assert_allclose(r.prediction.extra["anomaly_map"], expected.extra["anomaly_map"], rtol=1e-4,
                                   atol=1e-5)
    assert len(list((tmp_path / "frames").glob("*.jpg"))) == len(direct)  # annotated, heat map included


def test_an_engine_built_for_the_package_serves_score_and_map(trt_standin: object, fitted: edge_sdk.ConversionReport,
                                                               parts: Path) -> None:
    """Through the real `engine build` path, engine cache, TensorRT runner (two named outputs) and parity,
    against the tensorrt / cuda-python API stand-ins (tests/standin; not a GPU)."""
    from converters.device_build import build_for_device

    _, _, plan = build_for_device(fitted.package)
    assert (plan.spec.graph, plan.spec.precision) == ("fp32", "fp16")
    items = _images(parts / "val" / "defect")[:3] + _images(parts / "val" / "ok")[:2]
    with edge_sdk.load(fitted.package) as model:
        assert model.backend == "tensorrt" and model.info["parity"] is not None
        on_engine = model.predict_batch(items)
    with edge_sdk.load(fitted.package, backend="onnxruntime-cpu") as model:
        on_cpu = model.predict_batch(items)
    for a, b in zip(on_engine, on_cpu):
        assert a.extra["anomaly_map"].shape == b.extra["anomaly_map"].shape == (12, 12)
        assert a.score == pytest.approx(b.score, rel=1e-2) and a.label == b.label


def test_an_input_that_strided_convolutions_round_up_still_gets_aligned_patches(tmp_path: Path) -> None:
    """100 px: the stride-16 grid is 7x7 and the stride-32 one 4x4 (not 6.25 and 3.125), as with
    EfficientNet-Lite2's 260; the coarse map is resized onto the fine grid by size, not by a factor."""
    parts = builders.write_parts(tmp_path / "parts", good=12, per_class=4, size=100)
    layers = patchcore.feature_layers(builders.backbone_model(size=100), (100, 100))
    assert [(m.stride, m.height) for m in layers] == [(16, 7), (32, 4)]
    report = edge_sdk.convert(builders.backbone_model(size=100), tmp_path / "p.edgepkg", task="anomaly-detection",
                              normal=parts / "good", validation=parts / "val", coreset_ratio=0.5,
                              preprocess={"resize": [100, 100], "mean": [127] * 3, "std": [64] * 3})
    assert report.anomaly is not None and report.anomaly["grid"] == [7, 7]
    with edge_sdk.load(report.package) as model:
        p = model.predict(_images(parts / "val" / "defect")[0])
    assert p.extra["anomaly_map"].shape == (14, 14)


def test_the_report_draws_the_good_and_defect_score_histograms(fitted: edge_sdk.ConversionReport) -> None:
    from converters.html_report import REPORT_FILE, points, subject_from_package

    package = Package.open(fitted.package)
    page = package.read_bytes(REPORT_FILE).decode("utf-8")
    assert '<img alt="anomaly score histograms"' in page and "<h3>Anomaly model</h3>" in page
    assert fitted.anomaly is not None
    [fp32] = points(subject_from_package(fitted.package, timed=False))
    assert fp32.metric == pytest.approx(100 * fitted.anomaly["validation"]["auroc"])  # AUROC, not decision accuracy
    assert "image AUROC (points)" in page

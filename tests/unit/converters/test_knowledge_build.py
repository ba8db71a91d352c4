"""Building knowledge-base packages: the incidents CSV, the package layout, and convert(task="text-embedding")."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters import convert
from converters.knowledge import build_knowledge_base, read_incidents
from edge_sdk.errors import ConversionError
from runtime.knowledge import Incident, KnowledgeBase, l2_normalize
from runtime.package import Package
from tests import builders
from tests.builders import DIM, INCIDENTS_CSV, TEXTS, build_kb, embedding_model


def _csv(tmp_path: Path, content: str | bytes, name: str = "incidents.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_read_incidents_header_any_case_bom_quotes_and_blank_lines(tmp_path: Path) -> None:
    path = _csv(tmp_path, "\ufeffText, FAULT ,Fix,Asset,Notes,,\r\n"
                          '"oil leak, seal side",leak,"replace seal,\nthen test",pump 1,x,,\r\n'
                          "\r\n"
                          " pump is hot ,overheating,,,,,\r\n")
    incidents = read_incidents(path)
    assert incidents == [
        Incident(id="1", text="oil leak, seal side", fault="leak", fix="replace seal,\nthen test", asset="pump 1"),
        Incident(id="2", text="pump is hot", fault="overheating", fix=""),
    ]


@pytest.mark.parametrize(("content", "message"), [
    ("text,fault\nnoise,bearing\n", r"line 1: column 'fix' is missing; the header is \['text', 'fault'\]"),
    ("text,fault,fix,Text\na,b,c,d\n", "line 1: column 'text' appears twice"),
    ("text,fault,fix\nnoise,bearing,grease\n ,leak,seal\n", "line 3: column 'text' is empty"),
    ("text,fault,fix\nnoise,,grease\n", "line 2: column 'fault' is empty"),
    ("id,text,fault,fix\nA,noise,bearing,grease\nB,hot,overheating,cool\nA,drip,leak,seal\n",
     "line 4: id 'A' is already used on line 2"),
    ("id,text,fault,fix\n,noise,bearing,grease\n", "line 2: column 'id' is empty"),
    ('text,fault,fix\n"two\nlines",bearing,grease\nnoise,bearing\n', "line 4 has 2 fields; the header names 3"),
    ("text,fault,fix\noil leak, seal side,leak,seal\n", "line 2 has 4 fields; the header names 3"),
    (b"text,fault,fix\nnoise,bearing,grease\ncaf\xe9 leak,leak,seal\n", "line 3 is not UTF-8"),
    ("text,fault,fix\n\n", "holds no incidents"),
    ("", "column 'text' is missing"),
])
def test_csv_errors_name_file_line_and_fix(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = _csv(tmp_path, content)
    with pytest.raises(ConversionError, match=message) as err:
        read_incidents(path)
    assert str(path) in err.value.message and err.value.hint


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="incidents file '.*nope.csv' does not exist"):
        read_incidents(tmp_path / "nope.csv")


def test_package_layout(tmp_path: Path) -> None:
    package = build_kb(tmp_path, name="faults.edgepkg", version="3")
    m = package.manifest
    assert (m.name, m.version, m.task, m.precision) == ("faults", "3", "text-embedding", "fp32")
    assert set(m.files) == {"model.onnx", "golden.npz", "tokenizer.json", "kb/embeddings.npy", "kb/incidents.jsonl"}
    assert m.postprocess.to_dict() == {"kind": "embedding", "output": "hidden", "pooling": "mean", "normalize": True}
    assert [t.name for t in m.inputs] == ["input_ids", "attention_mask"] and m.outputs[0].shape[-1] == DIM
    kb = dict(m.knowledge_base or {})
    assert kb["embeddings"] == "kb/embeddings.npy" and kb["incidents"] == "kb/incidents.jsonl"
    assert (kb["count"], kb["dim"], kb["faults"], kb["source"]) == (6, DIM, ["bearing", "leak", "overheating"],
                                                                    "incidents.csv")
    assert kb["model_sha256"] == m.files["model.onnx"].sha256
    first = package.read_bytes("kb/incidents.jsonl").decode("utf-8").splitlines()[0]
    assert '"id": "INC-1"' in first and '"asset": "pump P-101"' in first
    # Golden feeds are incident texts spread over the faults: bearing, leak, overheating, then bearing again.
    golden_in, golden_out = package.golden()
    assert golden_in["input_ids"].shape[0] == 4 and golden_out["hidden"].shape[::2] == (4, DIM)
    tokenizer = builders.VOCAB
    first_tokens = [tokenizer[i] for i in golden_in["input_ids"][:, 1]]
    assert first_tokens == ["grinding", "oil", "the", "noise"]


def test_index_is_embedded_like_the_device_embeds_queries(tmp_path: Path) -> None:
    package = build_kb(tmp_path, pooling="cls", normalize=False)
    assert package.manifest.postprocess.pooling == "cls"
    with KnowledgeBase.from_package(package.path, backend="cpu") as kb:
        # cls pooling on a bag-of-words model: every text is its [CLS] vector, so all tie and file order decides.
        matches = kb.search("oil leak", k=3)
        assert [m.incident.id for m in matches] == ["INC-1", "INC-2", "INC-3"]
        assert all(m.similarity == pytest.approx(1.0, abs=1e-5) for m in matches)
        raw = kb.embedder.embed(TEXTS)
    # normalize=False: the embedder keeps the model's scale, but the stored index is unit rows (cosine).
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    stored = np.load(io.BytesIO(package.read_bytes("kb/embeddings.npy")))
    np.testing.assert_allclose(stored, l2_normalize(raw), atol=1e-6)


def test_convert_routes_text_embedding(tmp_path: Path) -> None:
    onnx.save(embedding_model(), tmp_path / "embed.onnx")
    csv_path = _csv(tmp_path, INCIDENTS_CSV)
    tokenizer = builders.tokenizer_json(tmp_path / "tokenizer.json")
    report = convert(tmp_path / "embed.onnx", tmp_path / "kb.edgepkg", task="text-embedding", tokenizer=tokenizer,
                     max_length=16, knowledge_base=csv_path, golden_samples=2)
    assert report.task == "text-embedding" and report.labels == () and report.golden_samples == 2
    assert any("knowledge base: 6 incidents, dimension 8, 3 faults" in n for n in report.notes)
    with KnowledgeBase.from_package(report.package, backend="cpu") as kb:
        assert kb.search("grinding bearing noise", k=1)[0].incident.id == "INC-1"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels": ["a"]}, "labels cannot be used with task 'text-embedding'"),
    ({"quantize": "int8"}, "quantize cannot be used with task 'text-embedding'"),
    ({"pooling": "max"}, "pooling is 'max'; expected one of none, mean, cls"),
    ({"pooling": "none"}, r"output 'hidden' is float32 \['batch', 'sequence', 8\]; pooling 'none' needs float "
                          r"\[batch, dim\]"),
    ({"output_name": "logits"}, r"cannot choose the embedding output among \['hidden'\]"),
])
def test_embedding_conversion_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    onnx.save(embedding_model(), tmp_path / "embed.onnx")
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "embed.onnx", tmp_path / "x.edgepkg", task="text-embedding",
                tokenizer=builders.tokenizer_json(tmp_path / "tokenizer.json"), **kwargs)
    assert not (tmp_path / "x.edgepkg").exists()


def test_mean_pooling_needs_the_attention_mask(tmp_path: Path) -> None:
    onnx.save(embedding_model(with_mask=False), tmp_path / "embed.onnx")
    tokenizer = builders.tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(ConversionError, match="mean pooling needs the attention mask") as err:
        build_knowledge_base(tmp_path / "embed.onnx", _csv(tmp_path, INCIDENTS_CSV), tmp_path / "x.edgepkg",
                             tokenizer=tokenizer)
    assert "pooling='cls'" in str(err.value.hint)


def test_pooled_output_with_pooling_none(tmp_path: Path, text_onnx: Path, tokenizer_file: Path) -> None:
    # The tiny classifier's logits [batch, 3] stand in for a model that pools inside the graph.
    package = build_knowledge_base(text_onnx, _csv(tmp_path, INCIDENTS_CSV), tmp_path / "pooled.edgepkg",
                                   tokenizer=tokenizer_file, pooling="none", max_length=16)
    assert package.manifest.knowledge_base["dim"] == 3  # type: ignore[index]
    with KnowledgeBase.from_package(package, backend="cpu") as kb:
        assert kb.search("overheat temperature", k=1)[0].incident.fault == "overheating"


def test_other_tasks_keep_their_rules(tmp_path: Path, text_onnx: Path, tokenizer_file: Path) -> None:
    with pytest.raises(ConversionError, match="task 'text-classification' needs labels"):
        convert(text_onnx, tmp_path / "x.edgepkg", task="text-classification", tokenizer=tokenizer_file)
    with pytest.raises(ConversionError, match="knowledge_base, pooling and normalize are for task 'text-embedding'"):
        convert(text_onnx, tmp_path / "x.edgepkg", task="text-classification", labels=builders.TEXT_LABELS,
                tokenizer=tokenizer_file, knowledge_base=tmp_path / "incidents.csv")
    with pytest.raises(ConversionError, match="expected one of image-classification, text-classification, anomaly-score, anomaly-detection, "
                                              "text-embedding"):
        convert(text_onnx, tmp_path / "x.edgepkg", task="detection", labels=["a"])
    assert Package.open(build_kb(tmp_path / "kb").path).manifest.task == "text-embedding"

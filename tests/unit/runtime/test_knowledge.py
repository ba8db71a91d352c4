"""Knowledge-base search: pooling, ranking, the index format and its checks (real onnxruntime)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_sdk.errors import PackageError, PackageIntegrityError, PipelineError
from runtime.knowledge import (EMBEDDINGS_FILE, Embedder, Incident, KnowledgeBase, Match, l2_normalize, pool,
                               top_k)
from runtime.package import Package, write_package
from runtime.pipeline import Pipeline
from tests import builders
from tests.builders import DIM, TEXTS, build_kb, embedding_model

@pytest.fixture(scope="module")
def kb_package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    return build_kb(tmp_path_factory.mktemp("kb"))


@pytest.fixture(scope="module")
def kb(kb_package: Package) -> KnowledgeBase:
    with KnowledgeBase.from_package(kb_package.path, backend="onnxruntime-cpu") as base:
        yield base  # type: ignore[misc]


def test_paraphrase_finds_the_planted_incident_first(kb: KnowledgeBase) -> None:
    matches = kb.search("the bearing makes a grinding noise", k=4)
    assert [m.rank for m in matches] == [1, 2, 3, 4]
    assert matches[0].incident.id == "INC-1" and matches[0].incident.fix == "replace the drive-end bearing"
    assert matches[1].incident.id == "INC-6"  # the other bearing incident comes next
    sims = [m.similarity for m in matches]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)
    assert sims[0] > 0.9 and sims[0] - sims[1] > 0.1
    assert kb.search("oil leaking", k=1)[0].incident.fault == "leak"
    assert kb.search("overheat and hot", k=1)[0].incident.fault == "overheating"


def test_exact_texts_score_one_in_one_padded_batch(kb: KnowledgeBase) -> None:
    results = kb.search_batch(TEXTS, k=1)
    assert [r[0].incident.text for r in results] == TEXTS
    assert all(r[0].similarity == pytest.approx(1.0, abs=1e-5) for r in results)


def test_k_larger_than_the_base_returns_every_incident(kb: KnowledgeBase) -> None:
    matches = kb.search("pump", k=50)
    assert len(kb) == 6 and len(matches) == 6
    assert sorted(m.incident.id for m in matches) == [f"INC-{i}" for i in range(1, 7)]


def test_fault_filter_and_min_similarity(kb: KnowledgeBase) -> None:
    leaks = kb.search("grinding noise at the bearing", k=5, fault="leak")
    assert [m.incident.fault for m in leaks] == ["leak", "leak"] and [m.rank for m in leaks] == [1, 2]
    assert kb.faults == ("bearing", "leak", "overheating")
    with pytest.raises(PipelineError, match="fault 'vibration' is not in the knowledge base") as err:
        kb.search("noise", fault="vibration")
    assert "bearing, leak, overheating" in str(err.value.hint)
    close = kb.search("grinding noise at the bearing", k=6, min_similarity=0.9)
    assert [m.incident.id for m in close] == ["INC-1"]


@pytest.mark.parametrize(("text", "k", "message"), [
    ("", 5, "query #0 is ''"), ("   ", 5, "expected a non-empty text"), (None, 5, "query #0 is None"),
    ("noise", 0, "k is 0"), ("noise", -2, "k is -2"), ("noise", 1.5, "k is 1.5"), ("noise", True, "k is True"),
])
def test_rejects_empty_text_and_bad_k(kb: KnowledgeBase, text: object, k: object, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        kb.search(text, k=k)  # type: ignore[arg-type]


def test_rejects_bad_batches_and_thresholds(kb: KnowledgeBase) -> None:
    with pytest.raises(PipelineError, match="non-empty list"):
        kb.search_batch("noise")
    with pytest.raises(PipelineError, match="non-empty list"):
        kb.search_batch([])
    with pytest.raises(PipelineError, match="min_similarity is 2"):
        kb.search("noise", min_similarity=2)


def test_top_k_breaks_ties_by_incident_order() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], np.float32)
    assert top_k(scores, 3).tolist() == [1, 3, 0]
    assert top_k(scores, 4).tolist() == [1, 3, 0, 2]
    assert top_k(scores, 10).tolist() == [1, 3, 0, 2, 5, 4]
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.integers(0, 4, 30).astype(np.float32)  # many ties
        k = int(rng.integers(1, 31))
        assert top_k(s, k).tolist() == sorted(range(30), key=lambda i: (-s[i], i))[:k]


def test_duplicate_incidents_rank_in_file_order(tmp_path: Path) -> None:
    csv_text = "text,fault,fix\noil leak,leak,seal A\npump is hot,overheating,cooler\noil leak,leak,seal B\n"
    with KnowledgeBase.from_package(build_kb(tmp_path, csv_text).path, backend="cpu") as base:
        matches = base.search("oil leak", k=2)
    assert [m.incident.fix for m in matches] == ["seal A", "seal B"]
    assert [m.incident.id for m in matches] == ["1", "3"]  # numbered in file order without an id column
    assert matches[0].similarity == matches[1].similarity


def test_pooling_functions() -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[1.0, 2.0], [6.0, 7.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[0.0, 1.0], [6.0, 7.0]])
    np.testing.assert_allclose(pool(hidden[:, 0], None, "none"), [[0.0, 1.0], [6.0, 7.0]])
    with pytest.raises(PipelineError, match=r"pooling 'mean' expects \[batch, sequence, dim\]"):
        pool(hidden[:, 0], mask, "mean")
    with pytest.raises(PipelineError, match=r"pooling 'none' expects \[batch, dim\]"):
        pool(hidden, None, "none")
    with pytest.raises(PipelineError, match="mean pooling needs the attention mask"):
        pool(hidden, None, "mean")
    with pytest.raises(PipelineError, match=r"attention mask \[2, 2\] does not cover the embedding output"):
        pool(hidden, mask[:, :2], "mean")
    unit = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])


def test_embedder_batches_agree_and_normalise(kb_package: Package) -> None:
    with Pipeline.from_package(kb_package, "onnxruntime-cpu") as pipeline:
        small, full = Embedder(pipeline, batch_size=2).embed(TEXTS), Embedder(pipeline).embed(TEXTS)
        assert Embedder(pipeline).dim == DIM
    assert small.shape == (6, DIM) and small.dtype == np.float32
    np.testing.assert_allclose(small, full, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)


def test_stored_index_matches_device_embeddings(kb: KnowledgeBase, kb_package: Package) -> None:
    stored = np.load(io.BytesIO(kb_package.read_bytes(EMBEDDINGS_FILE)))
    np.testing.assert_allclose(stored, kb.embedder.embed(TEXTS), atol=1e-6)
    assert [i.to_dict()["asset"] for i in kb.incidents][:2] == ["pump P-101", "pump P-101"]
    match = kb.search("oil drip at the flange", k=1)[0]
    assert match.to_dict()["incident"] == {"id": "INC-4", "text": "oil drip at the flange", "fault": "leak",
                                           "fix": "tighten the flange bolts", "asset": "valve V-3",
                                           "date": "2024-06-01"}
    assert isinstance(match, Match) and isinstance(match.incident, Incident)


def test_tampered_index_is_refused(tmp_path: Path) -> None:
    package = build_kb(tmp_path, archive=False, name="kb")
    lines = (package.path / "kb/incidents.jsonl").read_text(encoding="utf-8").replace("clean the cooler",
                                                                                      "ignore the alarm")
    (package.path / "kb/incidents.jsonl").write_text(lines, encoding="utf-8")
    with pytest.raises(PackageIntegrityError, match="kb/incidents.jsonl"):
        KnowledgeBase.from_package(package.path)


def _rewrite(package: Package, out: Path, embeddings: np.ndarray | None = None, **kb: object) -> Package:
    files = {name: package.read_bytes(name) for name in package.manifest.files}
    if embeddings is not None:
        buf = io.BytesIO()
        np.save(buf, embeddings)
        files[EMBEDDINGS_FILE] = buf.getvalue()
    manifest = replace(package.manifest, knowledge_base={**(package.manifest.knowledge_base or {}), **kb})
    return write_package(manifest, files, out)


def test_dimension_count_and_model_mismatches_are_package_errors(kb_package: Package, tmp_path: Path) -> None:
    wide = l2_normalize(np.ones((6, DIM + 1), np.float32))
    cases = [
        (_rewrite(kb_package, tmp_path / "a.edgepkg", wide, dim=DIM + 1),
         f"the index has dimension {DIM + 1} but the package's model embeds to {DIM}"),
        (_rewrite(kb_package, tmp_path / "b.edgepkg", dim=DIM + 1), f"declares dim {DIM + 1}"),
        (_rewrite(kb_package, tmp_path / "c.edgepkg", count=7), "declares count 7"),
        (_rewrite(kb_package, tmp_path / "d.edgepkg", np.ones((6, DIM), np.float32)), "has norm"),
        (_rewrite(kb_package, tmp_path / "e.edgepkg", l2_normalize(np.ones((5, DIM), np.float32)), count=5),
         "has 6 incidents but 5 embeddings"),
        (_rewrite(kb_package, tmp_path / "f.edgepkg", model_sha256="0" * 64), "embedded by another graph"),
    ]
    for package, message in cases:
        with pytest.raises(PackageError, match=message) as err:
            KnowledgeBase.from_package(package, backend="cpu")
        assert err.value.hint


def test_packages_without_an_index_are_refused(text_package: Path, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"\(text-classification\) carries no knowledge base"):
        KnowledgeBase.from_package(text_package)
    with Pipeline.from_package(text_package, "cpu") as pipeline, \
            pytest.raises(PackageError, match="is a text-classification model; expected a text-embedding package"):
        Embedder(pipeline)
    from converters import convert

    onnx.save(embedding_model(), tmp_path / "embed.onnx")
    report = convert(tmp_path / "embed.onnx", tmp_path / "plain.edgepkg", task="text-embedding",
                     tokenizer=builders.tokenizer_json(tmp_path / "tok.json"))
    with pytest.raises(PackageError, match="carries no knowledge base"):
        KnowledgeBase.from_package(report.package)
    manifest = Package.open(report.package).manifest
    assert manifest.knowledge_base is None and json.loads(json.dumps(manifest.to_dict()))["task"] == "text-embedding"


def test_search_side_imports_stay_light() -> None:
    code = "import sys, runtime.knowledge, edge_sdk._cli_kb; print(sorted(set(m.split('.')[0] for m in sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not {"onnx", "torch", "converters"} & set(json.loads(loaded.replace("'", '"')))

"""Text at scale: length buckets, overlapping windows for long reports, window aggregation, the manifest fields."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from edge_sdk.errors import PackageError, PipelineError
from runtime.manifest import Manifest, Postprocess, TensorSpec, TextPreprocess, default_buckets
from runtime.package import write_package
from runtime.pipeline import Pipeline, make_encoder
from runtime.prediction import class_scores
from runtime.preprocess.text import TextEncoder, aggregate_windows, spread
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import Selection
from tests import builders

CLS, SEP, PAD = (builders.VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
NAMES = ("input_ids", "attention_mask", "token_type_ids")
# 2 evidence tokens for "bearing", 14 neutral ones, then 3 for "leak": beyond max_length 16.
LONG_REPORT = "bearing noise " + "the pump is " * 4 + "the pump leak oil drip"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return builders.tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json").read_text()


def _manifest(pre: TextPreprocess, sequence: int | str = "sequence") -> Manifest:
    return Manifest(
        name="words", version="1", task="text-classification", model="model.onnx",
        inputs=tuple(TensorSpec(n, "int64", ("batch", sequence)) for n in NAMES),
        outputs=(TensorSpec("logits", "float32", ("batch", 3)),), preprocess=pre,
        postprocess=Postprocess(output="logits", labels=tuple(builders.TEXT_LABELS)), files={}, golden=None,
    )


def _graph(sequence: int | None = None) -> bytes:
    model = builders.text_model()
    if sequence is not None:
        for value in model.graph.input:
            value.type.tensor_type.shape.dim[1].dim_value = sequence
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def pipeline_for(tokenizer: str) -> Iterator[Any]:
    opened: list[Pipeline] = []

    def make(pre: TextPreprocess, sequence: int | None = None) -> Pipeline:
        m = _manifest(pre, sequence if sequence is not None else "sequence")
        runner = OnnxRuntimeRunner(_graph(sequence), m.inputs, m.outputs, threads=1).activate()
        opened.append(Pipeline(m, Selection("onnxruntime-cpu", runner, ()), make_encoder(m, tokenizer)))
        return opened[-1]

    yield make
    for pipeline in opened:
        pipeline.close()


def _content(ids: np.ndarray) -> list[int]:
    """A window's tokens between [CLS] and [SEP], after checking both are there and padding follows."""
    tokens = ids[ids != PAD].tolist()
    assert tokens[0] == CLS and tokens[-1] == SEP and (ids[len(tokens):] == PAD).all()
    return tokens[1:-1]


def _windows(batch: Any) -> list[np.ndarray]:
    """Every window's input_ids row, in window order."""
    rows: dict[int, np.ndarray] = {}
    for group in batch.groups:
        rows.update(zip(group.rows.tolist(), group.feeds["input_ids"]))
    return [rows[i] for i in range(batch.n_windows)]


class _CountingTokenizer:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def encode_batch(self, texts: list[str]) -> Any:
        self.calls += 1
        return self.inner.encode_batch(texts)


# --- buckets -----------------------------------------------------------------------------------


def test_texts_of_different_lengths_land_in_their_buckets_with_one_tokenizer_call(tokenizer: str) -> None:
    encoder = TextEncoder(tokenizer, TextPreprocess(max_length=16, buckets=(4, 8)))
    spy = _CountingTokenizer(encoder._windowing)
    encoder._windowing = spy  # type: ignore[assignment]
    texts = ["oil", "the pump is hot", "leak", "the pump is hot and the oil drips badly"]  # 3, 6, 3, 11 tokens
    batch = encoder.encode_windows(texts)
    assert spy.calls == 1
    assert encoder.buckets == (4, 8, 16)
    assert [(g.length, g.rows.tolist()) for g in batch.groups] == [(4, [0, 2]), (8, [1]), (16, [3])]
    for group in batch.groups:
        assert {k: v.shape for k, v in group.feeds.items()} == {n: (len(group.rows), group.length) for n in NAMES}
        assert (group.feeds["attention_mask"] == (group.feeds["input_ids"] != PAD)).all()
    assert batch.owner.tolist() == [0, 1, 2, 3] and batch.windows_per_text == (1, 1, 1, 1)


def test_default_buckets_are_powers_of_two_capped_at_max_length() -> None:
    assert default_buckets(128) == (16, 32, 64, 128)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(8) == (8,)
    assert TextPreprocess(max_length=64).bucket_lengths == (16, 32, 64)
    assert TextPreprocess(max_length=64, buckets=(8, 24)).bucket_lengths == (8, 24, 64)
    assert TextPreprocess(max_length=64, padding="max_length").bucket_lengths == (64,)


def test_bucket_padding_gives_the_scores_of_the_old_path(pipeline_for: Any, tokenizer: str) -> None:
    pre = TextPreprocess(max_length=16, buckets=(4, 8))
    pipeline = pipeline_for(pre)
    texts = ["oil", "the pump is hot", "grinding bearing noise", "leak", "the pump is hot and the oil drips badly"]
    feeds = TextEncoder(tokenizer, pre).encode(texts)  # the old path: truncated, padded to the longest
    old = class_scores(pipeline.infer(feeds)["logits"], pipeline.manifest.postprocess)
    new = np.array([list(p.scores.values()) for p in pipeline.predict_batch(texts)])
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-6)
    assert all("windows" not in p.extra for p in pipeline.predict_batch(texts))


class _Recording(OnnxRuntimeRunner):
    """The real onnxruntime runner, recording the input_ids shape of every inference."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shapes: list[tuple[int, ...]] = []

    def _infer_impl(self, feeds: Any) -> dict[str, np.ndarray]:
        self.shapes.append(tuple(feeds["input_ids"].shape))
        return super()._infer_impl(feeds)


def test_predict_batch_fills_whole_batches_per_bucket_and_encode_batches_are_what_it_runs(tokenizer: str) -> None:
    pre = TextPreprocess(max_length=16, buckets=(4, 8))
    m = _manifest(pre)
    runner = _Recording(_graph(), m.inputs, m.outputs, threads=1).activate()
    pipeline = Pipeline(m, Selection("onnxruntime-cpu", runner, ()), make_encoder(m, tokenizer))
    # 21 texts interleaved: 11 short ones (3 tokens with [CLS]/[SEP]: bucket 4), 10 of 10 tokens (bucket 16)
    texts = ["oil", "the pump is hot and the oil drips"] * 10 + ["leak"]
    try:
        got = pipeline.predict_batch(texts, max_batch=4)
        assert runner.shapes == [(4, 4), (4, 4), (3, 4), (4, 16), (4, 16), (2, 16)]  # not 6 chunks x 2 buckets
        one_by_one = [pipeline.predict(t) for t in texts]
        assert [p.label for p in got] == [p.label for p in one_by_one]
        np.testing.assert_allclose([list(p.scores.values()) for p in got],
                                   [list(p.scores.values()) for p in one_by_one], rtol=0, atol=1e-6)
        feeds = pipeline.encode_batches(texts, max_batch=4)
        assert [tuple(f["input_ids"].shape) for f in feeds] == runner.shapes[:6]
        with pytest.raises(PipelineError, match="max_batch is 0; expected an int >= 1"):
            pipeline.predict_batch(texts, max_batch=0)
    finally:
        pipeline.close()


def test_a_fixed_sequence_axis_collapses_the_buckets(pipeline_for: Any, tokenizer: str) -> None:
    pipeline = pipeline_for(TextPreprocess(max_length=16, buckets=(4, 8)), sequence=16)
    batch = pipeline._encode.windows(["oil", "the pump is hot", LONG_REPORT])
    assert [g.length for g in batch.groups] == [16]
    assert [p.label for p in pipeline.predict_batch(["oil drip", "the pump is hot"])] == ["leak", "overheating"]
    with pytest.raises(PackageError, match="fixed at 8 but text max_length is 16"):
        pipeline_for(TextPreprocess(max_length=16), sequence=8)


# --- windows -----------------------------------------------------------------------------------


def test_a_long_text_becomes_overlapping_windows_each_with_cls_and_sep(tokenizer: str) -> None:
    encoder = TextEncoder(tokenizer, TextPreprocess(max_length=8, stride=2))
    batch = encoder.encode_windows([LONG_REPORT, "oil"])
    contents = [_content(ids) for ids in _windows(batch)]
    tokens = Tokenizer.from_str(tokenizer).encode(LONG_REPORT, add_special_tokens=False)  # all 19 tokens
    assert batch.owner.tolist() == [0] * 5 + [1] and batch.windows_per_text == (5, 1)
    assert all(len(c) <= 6 for c in contents)  # 8 minus [CLS] and [SEP]
    for a, b in zip(contents[:4], contents[1:5]):
        assert a[-2:] == b[:2]  # consecutive windows share stride tokens
    assert contents[0] + [t for c in contents[1:5] for t in c[2:]] == tokens.ids  # and together hold every token
    assert contents[5] == [builders.VOCAB.index("oil")]


def test_truncation_misses_evidence_that_windows_find(pipeline_for: Any, tokenizer: str) -> None:
    pre = TextPreprocess(max_length=16, stride=4)
    pipeline = pipeline_for(pre)
    truncated = class_scores(pipeline.infer(TextEncoder(tokenizer, pre).encode([LONG_REPORT]))["logits"],
                             pipeline.manifest.postprocess)
    assert builders.TEXT_LABELS[int(truncated.argmax())] == "bearing"  # "leak oil drip" was cut off
    windowed = pipeline.predict(LONG_REPORT)
    assert windowed.label == "leak" and windowed.extra["windows"] == 2 and windowed.batch_size == 1
    assert sum(windowed.scores.values()) == pytest.approx(1.0)


def test_mean_and_max_aggregate_the_window_probabilities(pipeline_for: Any) -> None:
    # One window shouts "overheating"; three others each lean "leak", less strongly.
    report = "hot temperature overheat hot the pump " + "the leak oil pump is the " * 3
    texts = [report, "oil"]
    pipelines = {how: pipeline_for(TextPreprocess(max_length=8, stride=0, aggregate=how)) for how in ("mean", "max")}
    batch = pipelines["mean"]._encode.windows(texts)
    window_probs = batch.place([pipelines["mean"].scores(pipelines["mean"].infer(g.feeds)) for g in batch.groups])
    own = window_probs[batch.owner == 0]
    results = {how: p.predict_batch(texts) for how, p in pipelines.items()}
    mean = np.array(list(results["mean"][0].scores.values()))
    peak = np.array(list(results["max"][0].scores.values()))
    np.testing.assert_allclose(mean, own.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(peak, own.max(axis=0) / own.max(axis=0).sum(), atol=1e-9)
    assert (results["mean"][0].label, results["max"][0].label) == ("leak", "overheating")
    one_window = [list(r[1].scores.values()) for r in results.values()]  # unchanged by either
    np.testing.assert_allclose(one_window[0], one_window[1], atol=1e-12)
    np.testing.assert_allclose(one_window[0], window_probs[batch.owner == 1][0], atol=1e-12)


def test_aggregate_windows_is_pure_and_refuses_bad_owners() -> None:
    probs = np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    owner = np.array([0, 0, 1])
    np.testing.assert_allclose(aggregate_windows(probs, owner, 2, "mean"), [[0.4, 0.6], [0.9, 0.1]])
    np.testing.assert_allclose(aggregate_windows(probs, owner, 2, "max"), [[0.6 / 1.4, 0.8 / 1.4], [0.9, 0.1]])
    with pytest.raises(PipelineError, match="do not cover texts 0..2"):
        aggregate_windows(probs, owner, 3)
    with pytest.raises(PipelineError, match="expected one of mean, max"):
        aggregate_windows(probs, owner, 2, "median")


def test_max_windows_keeps_an_even_spread_and_records_the_count(
        pipeline_for: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert spread(10, 4).tolist() == [0, 3, 6, 9] and spread(3, 4).tolist() == [0, 1, 2]
    pipeline = pipeline_for(TextPreprocess(max_length=3, stride=0, max_windows=3))
    report = "bearing " + "the " * 7 + "hot"  # 9 windows of one token each
    with caplog.at_level(logging.DEBUG, logger="runtime.preprocess.text"):
        batch = pipeline._encode.windows([report])
        prediction = pipeline.predict(report)
    assert batch.windows_per_text == (3,) and batch.total_windows == (9,)
    assert [_content(ids) for ids in _windows(batch)] == [[builders.VOCAB.index(t)] for t in ("bearing", "the", "hot")]
    assert dict(prediction.extra) == {"windows": 3, "windows_total": 9}
    assert "has 9 windows; keeping 3" in caplog.text


def test_a_stride_the_tokenizer_cannot_honour_is_refused(tokenizer: str) -> None:
    with pytest.raises(PackageError, match="stride 6 is not below the 6 text tokens"):
        TextEncoder(tokenizer, TextPreprocess(max_length=8, stride=6))
    assert TextPreprocess(max_length=8).window_stride == 3 and TextPreprocess().window_stride == 32


# --- the manifest ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [({"buckets": [32, 16]}, "not strictly ascending"), ({"buckets": [16, 16]}, "not strictly ascending"),
     ({"buckets": [1, 16]}, "expected a list of ints >= 2"), ({"buckets": [16.0]}, "expected a list of ints"),
     ({"buckets": 16}, "expected a list of ints"), ({"buckets": [16, 256]}, "bucket 256 is longer than max_length"),
     ({"stride": -1}, "0 <= stride < 62"), ({"stride": 62}, "0 <= stride < 62"), ({"stride": True}, "stride is True"),
     ({"max_windows": 0}, "max_windows is 0"), ({"aggregate": "median"}, "aggregate is 'median'")],
)
def test_invalid_text_fields_are_refused(override: dict, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        TextPreprocess.from_dict({"max_length": 64, **override})


def test_text_fields_round_trip_and_old_manifests_load_with_defaults(tmp_path: Path, tokenizer: str) -> None:
    pre = TextPreprocess(max_length=64, buckets=(8, 32), stride=5, max_windows=4, aggregate="max")
    assert TextPreprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    old = _manifest(TextPreprocess(max_length=16)).to_dict()
    for key in ("buckets", "stride", "max_windows", "aggregate"):
        del old["preprocess"][key]
    loaded = Manifest.from_dict(old).preprocess
    assert loaded == TextPreprocess(max_length=16)
    assert isinstance(loaded, TextPreprocess)
    assert (loaded.buckets, loaded.stride, loaded.max_windows, loaded.aggregate) == ((), None, 16, "mean")
    assert (loaded.bucket_lengths, loaded.window_stride) == ((16,), 7)
    package = write_package(replace(_manifest(pre), golden=None),
                            {"model.onnx": _graph(), "tokenizer.json": tokenizer.encode()}, tmp_path / "w.edgepkg")
    assert package.manifest.preprocess == pre
    with Pipeline.from_package(package.path, "onnxruntime-cpu", verify=False) as pipeline:
        assert pipeline.predict(LONG_REPORT).label == "leak"

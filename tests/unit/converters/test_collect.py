"""Collection over a real graph: which tensors are calibrated, and padding kept out of the statistics."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from converters.calibration.collect import collect_histograms, tensors_around
from tests import builders


def _model_with_loud_padding():  # type: ignore[no-untyped-def]
    model = builders.transformer_model()
    emb = next(i for i in model.graph.initializer if i.name == "emb")
    table = numpy_helper.to_array(emb).copy()
    table[0] = 100.0  # the [PAD] embedding
    emb.CopyFrom(numpy_helper.from_array(table, "emb"))
    return model


def test_tensors_around_matmuls_exclude_constants() -> None:
    names = tensors_around(builders.transformer_model(), ["MatMul"])
    assert {"h0", "q", "kt", "scores", "attn", "ctx", "g", "pooled", "logits"} <= set(names)
    assert not {"wq", "emb", "head"} & set(names)


def test_attention_mask_keeps_padding_out_of_the_histograms() -> None:
    model = _model_with_loud_padding()
    ids = np.array([[2, 4, 5, 3, 0, 0], [2, 7, 8, 13, 14, 3]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    plain = collect_histograms(model, [feeds], ["x0", "pooled"])
    masked = collect_histograms(model, [feeds], ["x0", "pooled"], mask="attention_mask")
    assert plain["x0"].max == 100.0 and masked["x0"].max < 10.0
    assert masked["x0"].count == int(feeds["attention_mask"].sum()) * 16  # real tokens x hidden size
    assert masked["pooled"].count == plain["pooled"].count  # [batch, hidden] tensors are not masked

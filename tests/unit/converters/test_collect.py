"""Collection over a real graph: which tensors are calibrated, and padding kept out of the statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import numpy_helper

from converters.calibration.collect import collect_histograms, tensors_around
from runtime.manifest import TensorSpec
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


def test_calibration_limit_takes_samples_across_every_class(tmp_path: Path) -> None:
    from converters.calibration.readers import calibration_reader, spread

    root = builders.write_image_folder(tmp_path / "imgs", per_class=4)  # 3 classes x 4, sorted by class
    spec = [TensorSpec("image", "float32", ("batch", 3, 8, 8))]
    reader = calibration_reader(root, task="image-classification", inputs=spec, encode=lambda items: {}, limit=6)
    assert sorted({Path(p).parent.name for p in reader.items}) == sorted(builders.COLOR_LABELS)
    assert len(reader.items) == 6
    assert list(spread(10, 4)) == [0, 2, 5, 7] and list(spread(3, 5)) == [0, 1, 2]
    arrays = tmp_path / "a.npy"
    np.save(arrays, np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1))
    values = np.concatenate([b["image"] for b in calibration_reader(
        arrays, task="image-classification", inputs=[TensorSpec("image", "float32", ("b", 1, 1, 1))],
        encode=lambda items: {}, limit=4)]).ravel()
    assert list(values) == [0.0, 2.0, 5.0, 7.0]

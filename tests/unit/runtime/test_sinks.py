"""The CSV and annotated-frame sinks, written to real files."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import pytest

from edge_sdk.errors import SinkError
from runtime.frame import Frame
from runtime.prediction import Prediction, Timings
from runtime.sinks import CSV_FIELDS, AnnotatedFrameSink, CsvSink


def prediction(label: str = "scratch", roi: str | None = None) -> Prediction:
    return Prediction(label=label, score=0.875, scores=MappingProxyType({label: 0.875}), backend="onnxruntime-cpu",
                      timings=Timings(1.0, 2.0, 0.5), model="defects",
                      extra=MappingProxyType({"roi": roi} if roi else {}))


def frame(index: int) -> Frame:
    return Frame(np.full((48, 64, 3), 90, np.uint8), "cam0", index, time.time(), name=f"{index}.png")


def test_csv_sink_appends_rows_with_one_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    sink = CsvSink(path)
    sink(prediction(), frame(0))
    sink(prediction("ok", roi="left"), frame(1))
    sink.close()
    again = CsvSink(path)  # reopening appends, without a second header
    again(prediction(), frame(2))
    again.close()
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert [(r["frame"], r["label"], r["roi"]) for r in rows] == [("0", "scratch", ""), ("1", "ok", "left"),
                                                                  ("2", "scratch", "")]
    assert rows[0]["score"] == "0.875000" and rows[0]["inference_ms"] == "2.000"


def test_csv_sink_needs_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="does not exist"):
        CsvSink(tmp_path / "missing" / "log.csv")


def test_annotated_frames_are_written_every_nth(tmp_path: Path) -> None:
    sink = AnnotatedFrameSink(tmp_path / "frames", every=2)
    for i in range(5):
        sink(prediction(roi="left" if i == 4 else None), frame(i))
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["cam0-00000000.jpg", "cam0-00000002.jpg", "cam0-00000004-left.jpg"]
    image = cv2.imread(str(tmp_path / "frames" / names[0]))
    assert image.shape == (48, 64, 3) and not np.all(image == 90)  # the banner was drawn
    with pytest.raises(SinkError, match="every is 0"):
        AnnotatedFrameSink(tmp_path / "x", every=0)


def test_an_anomaly_map_is_drawn_where_the_part_looks_anomalous(tmp_path: Path) -> None:
    amap = np.full((8, 8), 0.9, np.float32)
    amap[2:6, 5:8] = 1.6  # hot on the right: above the threshold
    extra = {"anomaly_map": amap, "threshold": 1.2, "normal_score": 0.9, "anomaly_score": 1.6}
    hot = Prediction(label="defect", score=1.6, scores=MappingProxyType({"ok": 0.0, "defect": 1.0}),
                     backend="onnxruntime-cpu", timings=Timings(1.0, 2.0, 0.5), model="parts", over_threshold=True,
                     extra=MappingProxyType(extra))
    image = np.full((64, 64, 3), 90, np.uint8)
    AnnotatedFrameSink(tmp_path).__call__(hot, Frame(image, "cam0", 0, time.time()))
    drawn = cv2.imread(str(tmp_path / "cam0-00000000.jpg")).astype(np.int32)
    change = np.abs(drawn - 90).sum(axis=2)
    assert change[24:40, 44:60].mean() > 60  # the hot region is coloured
    assert change[40:64, 0:24].mean() < 10  # a typical-score region stays as it was
    assert np.array_equal(image, np.full((64, 64, 3), 90, np.uint8))  # the frame itself is not touched

"""Ready-made sinks: a CSV log of predictions and a folder of annotated frames.

A sink is any callable ``sink(prediction, frame)``; these two are what ``edge-sdk run
--save`` uses. Both are safe to call from the stream's delivery thread and flush as
they go, so a crash loses at most the row being written.
"""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_sdk.errors import SinkError
from runtime.frame import Frame
from runtime.prediction import Prediction

CSV_FIELDS = ("source", "frame", "name", "timestamp", "roi", "label", "score", "over_threshold", "backend",
              "precision", "inference_ms")


class CsvSink:
    """Appends one row per prediction to a CSV file (header written once, for a new file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise SinkError(f"CSV sink folder {str(self.path.parent)!r} does not exist", hint="create it first")
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._lock = threading.Lock()
        if new:
            self._writer.writerow(CSV_FIELDS)
            self._file.flush()

    def __call__(self, prediction: Prediction, frame: Frame) -> None:
        row: list[Any] = [frame.source_id, frame.index, frame.name, f"{frame.timestamp:.6f}",
                          prediction.extra.get("roi", ""), prediction.label, f"{prediction.score:.6f}",
                          int(prediction.over_threshold), prediction.backend, prediction.precision,
                          f"{prediction.timings.inference_ms:.3f}"]
        with self._lock:
            self._writer.writerow(row)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class AnnotatedFrameSink:
    """Writes each ``every``-th frame as a JPEG with the label and score drawn on it."""

    def __init__(self, folder: str | os.PathLike[str], every: int = 1, quality: int = 90) -> None:
        if every < 1:
            raise SinkError(f"every is {every}; expected an int >= 1 (1 = every frame)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.every, self.quality = every, quality

    def __call__(self, prediction: Prediction, frame: Frame) -> None:
        if frame.index % self.every:
            return
        image = annotate(frame.image, prediction)
        roi = prediction.extra.get("roi")
        name = f"{frame.source_id}-{frame.index:08d}" + (f"-{roi}" if roi else "") + ".jpg"
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise SinkError(f"frame {frame.source_id}#{frame.index} could not be encoded as JPEG")
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, self.folder / name)  # readers never see half a file


def heat_map(image: np.ndarray, prediction: Prediction, alpha: float = 0.45) -> np.ndarray:
    """``image`` with the prediction's anomaly map over it (a copy; ``image`` itself when there is no map):
    transparent at a typical good part's score, full colour at the threshold and above."""
    amap = prediction.extra.get("anomaly_map")
    if amap is None or image.ndim != 3:
        return image
    threshold = float(prediction.extra.get("threshold", np.max(amap)))
    low = float(prediction.extra.get("normal_score", np.min(amap)))
    level = np.clip((np.asarray(amap, np.float32) - low) / max(threshold - low, 1e-6), 0.0, 1.0)
    level = cv2.resize(level, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    weight = (alpha * level)[:, :, None]
    return (image.astype(np.float32) * (1 - weight) + colour * weight).astype(np.uint8)


def annotate(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    """A copy of ``image`` with ``label score`` in a banner, red when the prediction is over its threshold,
    and the anomaly map drawn over it when the model gives one."""
    out = heat_map(image, prediction).copy()
    text = f"{prediction.label} {prediction.score:.2f}"
    roi = prediction.extra.get("roi")
    if roi:
        text = f"{roi}: {text}"
    scale = max(0.4, min(out.shape[:2]) / 400)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    color = (0, 0, 200) if prediction.over_threshold else (80, 80, 80)
    cv2.rectangle(out, (0, 0), (w + 8, h + base + 8), color, thickness=-1)
    cv2.putText(out, text, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out

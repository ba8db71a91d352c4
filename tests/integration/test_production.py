"""Production pipelines end to end on real OpenCV, onnxruntime and tokenizers: a video file streamed
through a package, frame dropping under a slow model, the run command with --save, and text + image
evidence fused into one diagnosis with similar past incidents."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from runtime.diagnosis import Diagnoser
from runtime.pipeline import Pipeline
from runtime.sources import open_source
from tests.builders import build_kb
from tests.unit.runtime.test_stream import SlowRunner

BGR = {"red": (30, 40, 220), "green": (40, 200, 30), "blue": (210, 50, 40)}
ORDER = ("red", "green", "blue")


def write_video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (64, 48))
    assert writer.isOpened()
    for k in range(frames):
        writer.write(np.full((48, 64, 3), BGR[ORDER[k % 3]], np.uint8))
    writer.release()
    return path


def test_a_video_file_streams_through_a_package(tmp_path: Path, image_package: Path) -> None:
    video = write_video(tmp_path / "line.avi", 45)
    results = list(edge_sdk.stream(video, image_package, backend="onnxruntime-cpu", batching={"max_batch": 4}))
    assert sorted(r.frame.index for r in results) == list(range(45))
    assert all(r.prediction.label == ORDER[r.frame.index % 3] for r in results)
    assert {r.frame.source_id for r in results} == {"line.avi"}


def test_latest_policy_drops_stale_frames_under_a_slow_model(tmp_path: Path, image_package: Path) -> None:
    video = write_video(tmp_path / "fast.avi", 90)
    with Pipeline.from_package(image_package, "onnxruntime-cpu", threads=1) as fast:
        slow = Pipeline(fast.manifest, replace(fast.selection, runner=SlowRunner(fast.selection.runner, 0.03)
                                               .activate()), fast._encode, fast.package)
        source = open_source(video, policy="latest")
        results = list(edge_sdk.stream(source, slow, batching=edge_sdk.Batching.off()))
        state = source.state
    indices = [r.frame.index for r in results]
    assert 0 < len(results) < 90 and state.dropped > 0 and len(results) + state.dropped == 90
    assert indices == sorted(indices) and indices[-1] == 89  # newest frames win; the last one is kept
    assert all(r.prediction.label == ORDER[r.frame.index % 3] for r in results)


def test_run_command_streams_a_video_and_saves(tmp_path: Path, image_package: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    video = write_video(tmp_path / "cam.avi", 12)
    log = tmp_path / "predictions.csv"
    assert main(["run", str(image_package), "--source", str(video), "--save", str(log), "--batch", "4"]) == 0
    rows = list(csv.DictReader(log.open()))
    assert sorted(int(r["frame"]) for r in rows) == list(range(12))
    assert all(r["label"] == ORDER[int(r["frame"]) % 3] for r in rows)
    assert "12 predictions" in capsys.readouterr().err
    frames = tmp_path / "frames"
    assert main(["run", str(image_package), "--source", str(video), "--save", str(frames), "--json",
                 "--limit", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(line["source"] == "cam.avi" for line in lines)
    assert len(list(frames.glob("cam.avi-*.jpg"))) >= 5


RULE = {
    "faults": ["none", "bearing_wear", "leak", "overheating"],
    "thresholds": {"leak": 0.4},
    "models": {
        "words": {"weight": 1.0, "map": {"bearing": "bearing_wear", "leak": "leak", "overheating": "overheating"}},
        # a thermal camera: red is hot, blue is a wet (cold) spot, green is normal
        "colors": {"weight": 1.0, "map": {"red": "overheating", "blue": "leak", "green": "none"}},
    },
}


def test_text_and_image_evidence_fuse_into_one_diagnosis(tmp_path: Path, image_package: Path,
                                                         text_package: Path) -> None:
    kb = build_kb(tmp_path / "kb")
    red = np.full((24, 24, 3), BGR["red"], np.uint8)
    with Diagnoser.from_packages(RULE, [image_package, text_package], knowledge=kb.path,
                                 backend="onnxruntime-cpu") as diagnoser:
        d = diagnoser.text("pump-7", "the pump is hot", timestamp=100.0)
        assert d.fault == "overheating" and d.is_fault and [c.evidence.kind for c in d.evidence] == ["text"]
        assert d.similar[0].incident.id == "INC-3" and d.similar[0].similarity > 0.9  # "the pump is hot"
        d = diagnoser.image("pump-7", red, timestamp=101.0)
        assert d.fault == "overheating" and d.confidence > 0.7 and len(d.evidence) == 2 and not d.conflicting
        assert d.similar[0].incident.id == "INC-3"  # kept from the report
        other = diagnoser.image("pump-9", np.full((24, 24, 3), BGR["green"], np.uint8), timestamp=101.0)
        assert other.fault == "none" and not other.is_fault  # another asset, its own diagnosis
        json.dumps(d.to_dict())


def test_a_stream_feeds_the_diagnoser_through_a_sink(tmp_path: Path, image_package: Path,
                                                     text_package: Path) -> None:
    video = write_video(tmp_path / "thermal.avi", 6)
    seen = []
    with Diagnoser.from_packages(RULE, [image_package, text_package], backend="onnxruntime-cpu") as diagnoser:
        diagnoser.text("pump-7", "oil drip under the pump", timestamp=time.time())
        sink = diagnoser.sink({"thermal.avi": "pump-7"}, on_diagnosis=seen.append)
        for _ in edge_sdk.stream(video, diagnoser.models["colors"], sinks=[sink], batching=1):
            pass
        final = diagnoser.diagnosis("pump-7")
    assert len(seen) == 6 and final is not None
    sources = {c.evidence.source for c in (*final.evidence, *final.conflicting)}
    assert sources == {"report", "thermal.avi"}  # the latest frame and the report, fused


def test_stream_exposes_stats_and_refuses_settings_it_cannot_apply(tmp_path: Path, image_package: Path) -> None:
    video = write_video(tmp_path / "s.avi", 9)
    running = edge_sdk.stream(video, image_package, backend="onnxruntime-cpu", realtime=True)
    assert len(list(running)) == 9
    stats = running.stats()
    assert stats.predictions == 9 and stats.errors == 0 and stats.elapsed_s >= 8 / 30 * 0.9  # paced at 30 fps
    with Pipeline.from_package(image_package, "onnxruntime-cpu") as loaded:
        with pytest.raises(edge_sdk.errors.PipelineError, match=r"\['precision'\] cannot change"):
            edge_sdk.stream(video, loaded, precision="int8")
        source = open_source(video)
        with pytest.raises(edge_sdk.errors.PipelineError, match="already a Source object"):
            edge_sdk.stream(source, loaded, watch=True)
        latest = edge_sdk.stream(open_source(video), loaded, policy="latest")  # a Source object gets the policy
        assert type(latest.sources[0]).__name__ == "PolicySource"
        latest.close()

"""``edge-sdk run --source`` as a line engineer runs it: a stream that produces nothing still stops at
``--duration`` and fails with the source's reason, Ctrl-C after zero frames is a failure, sources are
named (``NAME=SPEC``) or get ids that do not clash, and log lines never share a line with progress."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_sdk.cli import main
from edge_sdk.streaming import open_sources
from tests.services import free_port

RED = (30, 40, 220)


def folder(path: Path, n: int) -> Path:
    path.mkdir(parents=True)
    for k in range(n):
        cv2.imwrite(str(path / f"{k:02d}.png"), np.full((24, 24, 3), RED, np.uint8))
    return path


def test_duration_stops_a_source_that_never_delivers_and_the_run_fails_with_its_reason(
        image_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/line1"
    start = time.monotonic()
    code = main(["run", str(image_package), "--source", url, "--duration", "1.5"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 1.5 + 5, f"took {elapsed:.1f} s"
    assert "no prediction: 0 frames read" in err and "connection refused by 127.0.0.1" in err


def test_ctrl_c_after_zero_frames_exits_non_zero_with_the_last_error(image_package: Path, tmp_path: Path) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/line1"
    run = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "run", str(image_package), "--source", url],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.stderr is not None
    for line in run.stderr:  # streaming (the camera refusing), not still starting up
        if "reconnecting" in line:
            break
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 1, err
    assert "interrupted" in err and "no prediction before the interrupt" in err and "connection refused" in err


def test_sources_can_be_named_and_default_ids_never_clash(image_package: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = folder(tmp_path / "line1" / "images", 3), folder(tmp_path / "line2" / "images", 2)
    log = tmp_path / "predictions.csv"
    assert main(["run", str(image_package), "--source", str(a), "--source", str(b), "--save", str(log)]) == 0
    ids = sorted({row["source"] for row in csv.DictReader(log.open())})
    assert len(ids) == 2 and ids[0].endswith("line1/images") and ids[1].endswith("line2/images")
    log.unlink()
    assert main(["run", str(image_package), "--source", f"press-3={a}", "--source", f"press-4={b}",
                 "--save", str(log)]) == 0
    rows = list(csv.DictReader(log.open()))
    assert sorted(r["source"] for r in rows) == ["press-3"] * 3 + ["press-4"] * 2
    nvr = open_sources(["rtsp://op:pw@nvr.local/live?channel=1", "rtsp://op:pw@nvr.local/live?channel=2",
                        {"cell-7": 0}.popitem()[0] + "=0"])
    assert [s.id for s in nvr] == ["nvr.local/live?channel=1", "nvr.local/live?channel=2", "cell-7"]
    for s in nvr:
        s.release()
    named = open_sources({"left": str(a), "right": str(b)})
    assert [s.id for s in named] == ["left", "right"]


def test_log_lines_never_share_a_line_with_the_progress_line(image_package: Path, tmp_path: Path) -> None:
    """On a terminal (a pty here) every warning starts on a line of its own."""
    import pty

    images = folder(tmp_path / "line", 300)
    (images / "150.png").write_bytes(b"not a png")  # a warning half-way, while the progress line is shown
    primary, secondary = pty.openpty()
    script = ("import sys, time; from edge_sdk.cli import main; "
              "import edge_sdk._cli_stream as s; s.PROGRESS_EVERY_S = 0.01; "
              f"sys.exit(main(['run', {str(image_package)!r}, '--source', {str(images)!r}, '--batch', '1']))")
    run = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    try:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        run.wait(30)
        os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    assert "fps" in text and "skipped 150.png" in text
    for line in text.replace("\r\n", "\n").split("\n"):
        if "WARNING" in line:  # what a terminal shows: the progress line erased, then the warning
            before = line.split("WARNING")[0]
            assert before == "" or before.endswith("\r\x1b[K"), repr(line)


def test_limits_are_exact_and_bad_values_refused(image_package: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    images = folder(tmp_path / "many", 40)
    log = tmp_path / "three.csv"
    assert main(["run", str(image_package), "--source", str(images), "--limit", "3", "--save", str(log)]) == 0
    assert len(list(csv.DictReader(log.open()))) == 3  # in-flight results past the limit are not written
    for option, value in (("--limit", "0"), ("--limit", "-1"), ("--duration", "0"), ("--duration", "-1"),
                          ("--duration", "inf")):
        with pytest.raises(SystemExit):
            main(["run", str(image_package), "--source", str(images), option, value])
        assert "is not" in capsys.readouterr().err
    assert main(["run", str(image_package), "--source", "\u00b2"]) == 1  # a digit Python cannot int(): no traceback
    assert "does not exist or is not a form a source accepts" in capsys.readouterr().err

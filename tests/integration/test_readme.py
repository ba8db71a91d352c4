"""The README's Python examples run as written, against a build/demo layout of tiny real models."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from tests import builders

README = Path(__file__).resolve().parents[2] / "README.md"
LABELS = ["ok", "scratch", "crack", "stain", "pit"]


def _demo_layout(root: Path) -> None:
    image = root / "build" / "demo" / "image"
    image.mkdir(parents=True)
    onnx.save(builders.image_model(classes=len(LABELS)), image / "model.onnx")
    (image / "labels.txt").write_text("\n".join(LABELS) + "\n")
    builders.write_json(image / "preprocess.json", builders.preprocess_dict())
    rng = np.random.default_rng(1)
    for split in ("test", "calib"):
        for label in LABELS:
            folder = image / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                cv2.imwrite(str(folder / f"{label}_{i:04d}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 4, "README's python examples changed: update this test"
    _demo_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks[:3]:
        exec(compile(block, str(README), "exec"), namespace)
    _run_client_example(blocks[3], tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"held-out accuracy \d\.\d{3}", out[0])
    label, score, backend, _ = out[1].split(" ", 3)
    assert label in LABELS and 0.0 < float(score) <= 1.0 and backend == "onnxruntime-cpu"
    assert (tmp_path / "build" / "surface-defects.edgepkg").is_file()
    assert any(line.startswith("int8: auto calibration on 10 samples") for line in out[2:])
    assert (tmp_path / "build" / "surface-defects.int8.edgepkg").is_file()
    streamed = [line.split() for line in out if line.startswith("scratch_")]
    assert [s[0] for s in streamed] == ["scratch_0000.png", "scratch_0001.png"]  # the folder, in order
    assert all(s[1] in LABELS and s[3] == "ms" for s in streamed)
    label, fault, event = out[-1 if not out[-1].startswith("event") else -2].split(" ")
    assert label in LABELS and fault in ("none", "surface_defect") and (event == "None") == (fault == "none")


def _run_client_example(block: str, root: Path) -> None:
    """The Client example against a real daemon serving the package the first example wrote.

    Only the daemon's address and the token file's path are replaced, by this test's own."""
    from tests.integration.test_daemon import TOKEN, DaemonProcess
    from tests.services import free_port

    (root / "token").write_text(TOKEN)
    port = free_port()
    config = root / "edge-sdk.toml"
    config.write_text(f"""
[server]
port = {port}
token_file = "token"
[models.surface-defects]
package = "build/surface-defects.edgepkg"
[storage]
dir = "state"
[events]
min_confidence = 0.0
[fusion]
faults = ["none", "surface_defect"]
[fusion.models.surface-defects]
map = {{ ok = "none", "*" = "surface_defect" }}
""")
    daemon = DaemonProcess(config, port).start()
    try:
        code = block.replace("http://127.0.0.1:8080", daemon.url).replace("/etc/edge-sdk/token", str(root / "token"))
        exec(compile(code, str(README), "exec"), {})
    finally:
        daemon.kill()

"""edge-sdk kb build / kb search."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edge_sdk.cli import main
from runtime.package import Package
from tests import builders
from tests.builders import INCIDENTS_CSV, embedding_model


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_kb_build_and_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(embedding_model(), tmp_path / "embed.onnx")
    (tmp_path / "incidents.csv").write_text(INCIDENTS_CSV, encoding="utf-8")
    tokenizer = builders.tokenizer_json(tmp_path / "tokenizer.json")
    pkg = tmp_path / "faults.edgepkg"
    code, out, _ = _cli(capsys, "kb", "build", str(tmp_path / "incidents.csv"), "--model", str(tmp_path / "embed.onnx"),
                        "--tokenizer", str(tokenizer), "-o", str(pkg), "--max-length", "16")
    assert code == 0 and pkg.is_file()
    assert "knowledge base: 6 incidents, dimension 8, faults: bearing, leak, overheating" in out
    assert "pooling mean, max length 16" in out

    code, out, _ = _cli(capsys, "kb", "search", str(pkg), "the bearing makes a grinding noise", "-k", "3",
                        "--backend", "cpu")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].split() == ["rank", "similarity", "fault", "fix", "text"]
    assert lines[1].split()[:3] == ["1", "0.987", "bearing"] and "replace the drive-end bearing" in lines[1]
    assert lines[1].rstrip().endswith("grinding noise at the bearing")
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]

    code, out, _ = _cli(capsys, "kb", "search", str(pkg), "oil drip at the flange", "--json", "--fault", "leak", "-k", "9")
    data = json.loads(out)
    assert code == 0 and data["incidents"] == 6 and data["backend"] == builders.auto_cpu_backend(Package.open(pkg))
    assert [m["incident"]["fault"] for m in data["matches"]] == ["leak", "leak"]
    assert data["matches"][0]["incident"]["id"] == "INC-4" and 0.9 < data["matches"][0]["similarity"] <= 1.0

    code, out, _ = _cli(capsys, "kb", "search", str(pkg), "pump", "--min-similarity", "0.999", "--backend", "cpu")
    assert code == 0 and "(no incident reaches similarity 0.999)" in out


def test_kb_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.csv").write_text("text,fault\nnoise,bearing\n", encoding="utf-8")
    onnx.save(embedding_model(), tmp_path / "embed.onnx")
    code, _, err = _cli(capsys, "kb", "build", str(tmp_path / "bad.csv"), "--model", str(tmp_path / "embed.onnx"),
                        "--tokenizer", str(builders.tokenizer_json(tmp_path / "t.json")), "-o", str(tmp_path / "x"))
    assert code == 1 and "line 1: column 'fix' is missing" in err and "(hint: add a 'fix' column" in err
    assert len(err.strip().splitlines()) == 1

    code, _, err = _cli(capsys, "kb", "search", str(tmp_path / "none.edgepkg"), "noise")
    assert code == 1 and "does not exist" in err

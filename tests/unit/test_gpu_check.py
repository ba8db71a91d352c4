"""bench/gpu_check.py stays runnable: on this CPU machine every row says "not available" with its
reason; against the API stand-ins every TensorRT row runs, and the run marks itself as no GPU proof."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *pythonpath: Path) -> tuple[int, dict[str, dict[str, str]]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (*pythonpath, ROOT))),
           "EDGE_SDK_CACHE": str(tmp_path / "cache")}
    out = tmp_path / f"rows-{len(pythonpath)}.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines()[0].split() == ["check", "status", "detail"], done.stdout + done.stderr
    return done.returncode, {r["check"]: r for r in json.loads(out.read_text())}


def test_without_a_gpu_every_check_says_why_it_did_not_run(tmp_path: Path) -> None:
    code, rows = _run(tmp_path)
    assert code == 0 and rows["device facts"]["status"] == "ran"
    assert {r["status"] for n, r in rows.items() if n != "device facts"} == {"not available"}
    assert "tensorrt Python package is not installed" in rows["TensorRT engine fp16"]["detail"]


def test_against_the_api_stand_ins_every_tensorrt_check_runs_and_the_run_proves_no_gpu(tmp_path: Path) -> None:
    code, rows = _run(tmp_path, ROOT / "tests" / "standin")
    assert code == 1 and rows["device facts"]["status"] == "FAILED"
    assert "API stand-in" in rows["device facts"]["detail"]
    for name in ("CUDA binding cuda-python", "CUDA binding pycuda", "TensorRT engine fp32", "TensorRT engine fp16",
                 "TensorRT engine int8", "TensorRT threaded inference", "TensorRT text profiles"):
        assert rows[name]["status"] == "ran", rows[name]

"""Stage 5 of ``convert()``: the final manifest (precision, graphs, reports) and every file of the package."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from converters.stages.fp32 import Fp32Stage
from converters.stages.int8 import GRAPH_FILES, Int8Stage
from runtime.manifest import Manifest
from runtime.package import golden_bytes


def assemble(
    manifest: Manifest, proto: Any, fp32: Fp32Stage, int8: Int8Stage | None, tokenizer_json: str | None,
    has_calibration: bool, pruning: dict[str, Any] | None = None,
) -> tuple[Manifest, dict[str, bytes], list[str]]:
    """The final manifest (precision, graphs, reports) and every file of the package."""
    precision = "int8" if int8 else "fp32"
    notes = [] if int8 else ["precision fp32: pass quantize='int8' with calibration data for int8 graphs"]
    if has_calibration and not int8:
        notes.append("calibration data was used for golden vectors only")
    reports: dict[str, Any] = {"conversion": {"precision": precision, "notes": notes}}
    if fp32.evaluation:
        reports["validation"] = fp32.evaluation.to_dict()
    if pruning:
        reports["pruning"] = pruning
    # With int8 the fp32 graph is the prepared one (smoothed / equalized, same function), so that
    # the scale file and a TensorRT calibration cache rendered from it fit model.onnx.
    files = {"model.onnx": int8.fp32_model if int8 else proto.SerializeToString(),
             "golden.npz": golden_bytes(fp32.golden_in, fp32.golden_out, int8.golden if int8 else None)}
    if int8:
        reports["int8"] = {**int8.report, "validation": int8.evaluation.to_dict() if int8.evaluation else None}
        files.update(int8.files)
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json.encode("utf-8")
    manifest = replace(manifest, reports=reports, precision=precision, graphs=dict(GRAPH_FILES) if int8 else {})
    return manifest, files, notes

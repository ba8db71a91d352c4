"""Asset ids: the one rule every entry point checks (runtime.assets)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from edge_sdk.errors import PipelineError
from runtime.assets import MAX_LENGTH, check_asset_id
from runtime.diagnosis import Diagnoser
from runtime.prediction import Prediction, Timings


@pytest.mark.parametrize("value", ["press-4", "pump P-101", "Presse Nr. 3 (links)", "泵-7", "line/2#a+b", "a" * MAX_LENGTH])
def test_ordinary_ids_pass_as_they_are(value: str) -> None:
    assert check_asset_id(value) == value


@pytest.mark.parametrize("value", ["", " pump", "pump ", "a\nb", "a\tb", "a\x7f", "a\u0085", "a\u2028b", "a\uffff",
                                   "a%0A", "a" * (MAX_LENGTH + 1), "a;b", "a\x1b[31m"])
def test_control_characters_non_characters_and_long_ids_are_refused_by_name(value: str) -> None:
    with pytest.raises(PipelineError, match="is not a valid asset id; expected 1-64 letters"):
        check_asset_id(value, "asset id")
    with pytest.raises(PipelineError, match="is a int; expected a string"):
        check_asset_id(7)


def test_the_diagnoser_refuses_them_before_any_evidence_is_kept(image_package: Path) -> None:
    rule = {"faults": ["none", "overheating"],
            "models": {"colors": {"map": {"red": "overheating", "*": "none"}}}}
    with Diagnoser.from_packages(rule, [image_package], backend="onnxruntime-cpu") as diagnoser:
        p = Prediction(label="red", score=0.9, scores=MappingProxyType({"red": 0.9}), backend="onnxruntime-cpu",
                       timings=Timings(0.0, 0.0, 0.0), model="colors")
        assert diagnoser.add("pump-7", p, kind="image", source="camera").fault == "overheating"
        with pytest.raises(PipelineError, match=r"'pump\\n7' \(6 characters\) is not a valid asset id"):
            diagnoser.add("pump\n7", p, kind="image", source="camera")
        assert diagnoser.diagnosis("pump\n7") is None

"""The error tree, the lazy public face, and what importing each layer pulls in."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edge_sdk
from edge_sdk import errors


def test_every_error_is_in_the_tree_and_documented() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert name in errors.__doc__, f"{name} missing from the tree drawn in errors.py"
        if name != "InternalError":
            assert issubclass(cls, errors.EdgeSDKError)
    assert not issubclass(errors.InternalError, errors.EdgeSDKError)
    assert issubclass(errors.InputMismatchError, errors.InferenceError)
    assert issubclass(errors.PackageVersionError, errors.PackageError)
    assert issubclass(errors.EngineBuildError, errors.ConversionError)


def test_error_message_and_hint() -> None:
    exc = errors.PackageError("package x is broken", hint="re-convert it")
    assert str(exc) == "package x is broken (hint: re-convert it)"
    assert exc.message == "package x is broken" and exc.hint == "re-convert it"
    assert str(errors.DeviceError("plain")) == "plain"


def test_public_names_resolve() -> None:
    assert set(edge_sdk.__all__) >= {"load", "convert", "Model", "Prediction", "detect", "errors"}
    for name in edge_sdk.__all__:
        assert getattr(edge_sdk, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        edge_sdk.nothing  # noqa: B018


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.strip().split(","))


@pytest.mark.parametrize("statement", ["import runtime", "import devices", "import edge_sdk", "from edge_sdk import errors"])
def test_device_side_imports_stay_light(statement: str) -> None:
    loaded = _imported_after(statement)
    heavy = {"onnx", "torch", "converters"} & loaded
    assert not heavy, f"{statement} imported {sorted(heavy)}"


def test_loading_a_model_does_not_import_the_converters() -> None:
    loaded = _imported_after("import edge_sdk; edge_sdk.load")
    assert "runtime" in loaded and not {"onnx", "converters"} & loaded

"""The device side: package format, runners, runner selection and pipelines.

Imports without onnx, torch or the converters, so it installs light on a Jetson. Attributes load
lazily (PEP 562, as in ``edge_sdk``), so ``runtime.sources`` and ``runtime.frame`` import with
numpy and OpenCV alone (a camera check in the system Python, whatever else is installed).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "DEFAULT_POLICY": "runtime.select",
    "ImagePreprocess": "runtime.manifest",
    "Manifest": "runtime.manifest",
    "OnnxRuntimeRunner": "runtime.runners.onnxrt",
    "Package": "runtime.package",
    "Parity": "runtime.parity",
    "Pipeline": "runtime.pipeline",
    "Postprocess": "runtime.manifest",
    "Prediction": "runtime.prediction",
    "Runner": "runtime.runners.base",
    "Selection": "runtime.select",
    "Skipped": "runtime.select",
    "TensorSpec": "runtime.manifest",
    "TextPreprocess": "runtime.manifest",
    "Timings": "runtime.prediction",
    "check_parity": "runtime.parity",
    "extract_package": "runtime.package",
    "select_runner": "runtime.select",
    "write_package": "runtime.package",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from runtime.manifest import ImagePreprocess, Manifest, Postprocess, TensorSpec, TextPreprocess
    from runtime.package import Package, extract_package, write_package
    from runtime.parity import Parity, check_parity
    from runtime.pipeline import Pipeline
    from runtime.prediction import Prediction, Timings
    from runtime.runners.base import Runner
    from runtime.runners.onnxrt import OnnxRuntimeRunner
    from runtime.select import DEFAULT_POLICY, Selection, Skipped, select_runner


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

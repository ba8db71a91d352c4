"""The device side: package format, runners, runner selection and pipelines.

Imports without onnx, torch or the converters, so it installs light on a Jetson.
"""

from runtime.manifest import ImagePreprocess, Manifest, Postprocess, TensorSpec, TextPreprocess
from runtime.package import Package, extract_package, write_package
from runtime.parity import Parity, check_parity
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction, Timings
from runtime.runners.base import Runner
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import DEFAULT_POLICY, Selection, Skipped, select_runner

__all__ = [
    "DEFAULT_POLICY",
    "ImagePreprocess",
    "Manifest",
    "OnnxRuntimeRunner",
    "Package",
    "Parity",
    "Pipeline",
    "Postprocess",
    "Prediction",
    "Runner",
    "Selection",
    "Skipped",
    "TensorSpec",
    "TextPreprocess",
    "Timings",
    "check_parity",
    "extract_package",
    "select_runner",
    "write_package",
]

"""The workstation side: load and check ONNX graphs, convert them into packages."""

from converters.convert import convert
from converters.report import ConversionReport

__all__ = ["ConversionReport", "convert"]

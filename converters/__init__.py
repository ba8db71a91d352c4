"""The workstation side: load and check ONNX graphs, calibrate, quantize and convert them into packages.

Attributes load lazily (PEP 562) so that light submodules (the scale file, reports)
import on a device without onnx.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["ConversionReport", "convert"]
_LAZY = {"convert": "converters.conversion", "ConversionReport": "converters.report"}

if TYPE_CHECKING:
    from converters.conversion import convert
    from converters.report import ConversionReport


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'converters' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)

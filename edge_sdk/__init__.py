"""edge-sdk: convert a model on the workstation, run it on a Jetson (or any CPU).

    import edge_sdk
    report = edge_sdk.convert("model.onnx", "defects.edgepkg", task="image-classification",
                              labels=["ok", "scratch"], preprocess={"resize": [224, 224]})
    model = edge_sdk.load("defects.edgepkg")
    print(model.predict("part.png").label)

Attributes load lazily (PEP 562) so that ``edge_sdk.errors`` can be imported by
every layer without cycles, and ``import edge_sdk`` stays light on a device.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": "edge_sdk.model",
    "Model": "edge_sdk.model",
    "convert": "converters.conversion",
    "ConversionReport": "converters.report",
    "Prediction": "runtime.prediction",
    "Pipeline": "runtime.pipeline",
    "stream": "edge_sdk.streaming",
    "Client": "edge_sdk.client",
    "StreamResult": "runtime.stream",
    "Batching": "runtime.batching",
    "Diagnoser": "runtime.diagnosis",
    "Diagnosis": "runtime.fusion",
    "FusionRule": "runtime.fusion",
    "KnowledgeBase": "runtime.knowledge",
    "detect": "devices",
    "DeviceInfo": "devices",
    "errors": "edge_sdk.errors",
}

__all__ = ["__version__", *sorted(_LAZY)]

if TYPE_CHECKING:
    from converters.conversion import convert
    from converters.report import ConversionReport
    from devices import DeviceInfo, detect
    from edge_sdk import errors
    from edge_sdk.model import Model, load
    from edge_sdk.client import Client
    from edge_sdk.streaming import stream
    from runtime.batching import Batching
    from runtime.diagnosis import Diagnoser
    from runtime.fusion import Diagnosis, FusionRule
    from runtime.knowledge import KnowledgeBase
    from runtime.pipeline import Pipeline
    from runtime.stream import StreamResult
    from runtime.prediction import Prediction


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
    if name == "errors":
        return import_module(module)
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""Facts about the machine: Jetson module, L4T/JetPack, CPU int8 features, memory, GPU/DLA
and the versions of CUDA, TensorRT and onnxruntime.

A leaf package: it imports nothing from edge-sdk but ``edge_sdk.errors``, and no heavy
module (onnxruntime, tensorrt, pycuda) until ``detect()`` probes for it.
"""

from __future__ import annotations

from .probe import DeviceInfo, detect
from .fingerprint import Fingerprint, fingerprint
from .jetson import jetpack_for_l4t

__all__ = ["DeviceInfo", "Fingerprint", "detect", "fingerprint", "jetpack_for_l4t"]

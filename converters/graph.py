"""Loading and checking ONNX graphs, and reading their declared inputs and outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import helper

from edge_sdk.errors import ConversionError
from runtime.manifest import DTYPES, TensorSpec

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


def load_onnx(model: ModelSource) -> onnx.ModelProto:
    """Load an ONNX model from a path, bytes or a ``ModelProto`` and run the ONNX checker on it."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, bytes):
        proto = _parse(model, "the given bytes")
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ConversionError(f"model file {str(path)!r} does not exist", hint="pass the path of an .onnx file")
        proto = _parse(path.read_bytes(), str(path))
    else:
        raise ConversionError(f"model is a {type(model).__name__}; expected an .onnx path, bytes or onnx.ModelProto")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConversionError(f"the ONNX model fails onnx.checker: {exc}", hint="re-export the model") from None
    return proto


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ConversionError(f"{where} is not an ONNX model ({exc.__class__.__name__})") from None


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    except (KeyError, TypeError):
        dtype = "unknown"
    if dtype not in DTYPES:
        raise ConversionError(f"tensor '{value.name}' has element type {dtype}; supported: {', '.join(DTYPES)}")
    shape: list[int | str] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"{value.name}_dim{i}")
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape))


def io_specs(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's real inputs (initializers excluded) and its outputs."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return inputs, outputs

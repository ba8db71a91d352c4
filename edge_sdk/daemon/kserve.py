"""The KServe v2 / Open Inference Protocol over JSON: tensors in, tensors out.

Requests carry the graph's own inputs (the preprocessed tensors, exactly what the package's
golden vectors hold), so ``tritonclient.http`` works unchanged; the response holds every
declared output, or those the request names. The binary-data extension is not supported and
is refused with a clear 400.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edge_sdk.errors import DaemonError
from runtime.manifest import Manifest, TensorSpec

#: KServe datatype <-> numpy dtype (the manifest's dtype names are numpy's).
DATATYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT64": "int64", "INT32": "int32",
             "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
_TO_KSERVE = {v: k for k, v in DATATYPES.items()}
MAX_ELEMENTS = 64 * 1024 * 1024


class BadRequest(DaemonError):
    """A request the daemon refuses with HTTP 400 (or ``status``)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400) -> None:
        super().__init__(message, hint)
        self.status = status


def datatype(dtype: str) -> str:
    return _TO_KSERVE.get(dtype, dtype.upper())


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": datatype(t.dtype), "shape": [d if isinstance(d, int) else -1 for d in t.shape]}
            for t in specs]


def model_metadata(name: str, manifest: Manifest, backend: str) -> dict[str, Any]:
    return {"name": name, "versions": [manifest.version], "platform": f"edge-sdk/{backend}",
            "inputs": tensor_metadata(manifest.inputs), "outputs": tensor_metadata(manifest.outputs)}


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and value and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in value)):
        raise BadRequest(f"{where}.shape is {value!r}; expected a non-empty list of non-negative ints")
    return tuple(value)


def decode_request(body: Any, specs: Sequence[TensorSpec]) -> tuple[dict[str, np.ndarray], list[str] | None, Any]:
    """``(feeds, requested output names or None, request id)`` from a KServe v2 JSON request."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"request body is a {type(body).__name__}; expected a JSON object with 'inputs'")
    if body.get("parameters", {}).get("binary_data_output") or any(
            isinstance(i, Mapping) and (i.get("parameters") or {}).get("binary_data_size") for i in body.get("inputs", [])):
        raise BadRequest("the binary tensor data extension is not supported", hint="send tensors as JSON 'data' lists")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request has no 'inputs'; expected a list of {name, shape, datatype, data}")
    by_name = {s.name: s for s in specs}
    feeds: dict[str, np.ndarray] = {}
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, Mapping):
            raise BadRequest(f"{where} is a {type(item).__name__}; expected an object")
        name = item.get("name")
        if name not in by_name:
            raise BadRequest(f"{where}.name is {name!r}; this model's inputs are {sorted(by_name)}")
        spec = by_name[name]
        shape = _shape(item.get("shape"), where)
        expected = datatype(spec.dtype)
        if item.get("datatype") != expected:
            raise BadRequest(f"input {name!r} has datatype {item.get('datatype')!r}; expected {expected}")
        feeds[str(name)] = _array(item.get("data"), shape, spec, where)
    missing = sorted(set(by_name) - set(feeds))
    if missing:
        raise BadRequest(f"request lacks input(s) {missing}; this model needs {sorted(by_name)}")
    outputs = body.get("outputs")
    names = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise BadRequest("'outputs' must be a list of {name}")
        names = [o["name"] for o in outputs]
    return feeds, names, body.get("id")


def _array(data: Any, shape: tuple[int, ...], spec: TensorSpec, where: str) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    if count > MAX_ELEMENTS:
        raise BadRequest(f"input {spec.name!r} has {count} elements; at most {MAX_ELEMENTS} are accepted", status=413)
    if len(shape) != len(spec.shape):
        raise BadRequest(f"input {spec.name!r} has shape {list(shape)}; expected rank {len(spec.shape)} "
                         f"({list(spec.shape)})")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if isinstance(want, int) and got != want:
            raise BadRequest(f"input {spec.name!r} has shape {list(shape)}; dimension {axis} must be {want} "
                             f"(model input {list(spec.shape)})")
    if not isinstance(data, list):
        raise BadRequest(f"{where}.data is a {type(data).__name__}; expected a list of {count} numbers")
    try:
        array = np.asarray(data, dtype=np.dtype(spec.dtype))
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{where}.data cannot be read as {spec.dtype}: {exc}") from None
    if array.size != count:
        raise BadRequest(f"input {spec.name!r} has {array.size} values; shape {list(shape)} needs {count}")
    return array.reshape(shape)


def encode_response(name: str, version: str, outputs: Mapping[str, np.ndarray], names: list[str] | None,
                    request_id: Any) -> dict[str, Any]:
    if names is not None:
        unknown = sorted(set(names) - set(outputs))
        if unknown:
            raise BadRequest(f"requested output(s) {unknown} do not exist; outputs: {sorted(outputs)}")
    chosen = names if names is not None else list(outputs)
    body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": [
        {"name": n, "datatype": datatype(str(outputs[n].dtype)), "shape": list(outputs[n].shape),
         "data": outputs[n].reshape(-1).tolist()} for n in chosen]}
    if request_id is not None:
        body["id"] = request_id
    return body

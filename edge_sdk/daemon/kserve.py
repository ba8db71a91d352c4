"""The KServe v2 / Open Inference Protocol over JSON: tensors in, tensors out.

Requests carry the graph's own inputs (the preprocessed tensors, exactly what the package's
golden vectors hold), so ``tritonclient.http`` works unchanged; the response holds every
declared output, or those the request names. Tensors travel as JSON ``data`` lists or, with
the binary tensor data extension that ``tritonclient`` uses by default, as raw little-endian
bytes after a JSON header whose length is in ``Inference-Header-Content-Length``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class InferRequest:
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None  # requested (name, as binary); None = every output
    binary_output: bool  # the default for outputs not listed (binary_data_output)
    id: Any


def parse_json(data: bytes) -> Any:
    """A request body as JSON, or 400: not JSON, not UTF-8, or nested too deep for the parser."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body nests JSON arrays or objects too deeply",
                         hint="send tensors flat, with their shape") from None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary tail of a (possibly binary-extension) request body."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length is {header_length!r}; expected the JSON header's "
                             f"length, at most the body's {len(body)} bytes")
        head, tail = body[: int(header_length)], body[int(header_length):]
    return parse_json(head), tail


def decode_request(body: Any, specs: Sequence[TensorSpec], binary: bytes = b"") -> InferRequest:
    """The feeds and requested outputs of a KServe v2 request (JSON header + binary tail)."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"request body is a {type(body).__name__}; expected a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request has no 'inputs'; expected a list of {name, shape, datatype, data}")
    by_name = {s.name: s for s in specs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
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
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"{where} declares binary_data_size {size!r} but the body holds "
                                 f"{len(binary) - offset} more bytes")
            feeds[str(name)] = _binary_array(binary[offset : offset + size], shape, spec)
            offset += size
        else:
            feeds[str(name)] = _array(item.get("data"), shape, spec, where)
    missing = sorted(set(by_name) - set(feeds))
    if missing:
        raise BadRequest(f"request lacks input(s) {missing}; this model needs {sorted(by_name)}")
    params = body.get("parameters") or {}
    binary_output = bool(params.get("binary_data_output", False))
    outputs = body.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise BadRequest("'outputs' must be a list of {name}")
        requested = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_output)))
                     for o in outputs]
    return InferRequest(feeds, requested, binary_output, body.get("id"))


def _binary_array(data: bytes, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    _check_shape(shape, spec)
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    count = int(np.prod(shape)) if shape else 1
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"input {spec.name!r} has {len(data)} bytes; shape {list(shape)} of {spec.dtype} "
                         f"needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).astype(spec.dtype).reshape(shape)


def _check_shape(shape: tuple[int, ...], spec: TensorSpec) -> None:
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


def _array(data: Any, shape: tuple[int, ...], spec: TensorSpec, where: str) -> np.ndarray:
    _check_shape(shape, spec)
    count = int(np.prod(shape)) if shape else 1
    if not isinstance(data, list):
        raise BadRequest(f"{where}.data is a {type(data).__name__}; expected a list of {count} numbers")
    try:
        array = np.asarray(data, dtype=np.dtype(spec.dtype))
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{where}.data cannot be read as {spec.dtype}: {exc}") from None
    if array.size != count:
        raise BadRequest(f"input {spec.name!r} has {array.size} values; shape {list(shape)} needs {count}")
    return array.reshape(shape)


def encode_response(name: str, version: str, outputs: Mapping[str, np.ndarray], request: InferRequest
                    ) -> tuple[bytes, int | None]:
    """The response body and, when some outputs are binary, the JSON header's length."""
    wanted = request.outputs if request.outputs is not None else [(n, request.binary_output) for n in outputs]
    unknown = sorted({n for n, _ in wanted} - set(outputs))
    if unknown:
        raise BadRequest(f"requested output(s) {unknown} do not exist; outputs: {sorted(outputs)}")
    described, blobs = [], []
    for n, as_binary in wanted:
        array = np.ascontiguousarray(outputs[n])
        entry: dict[str, Any] = {"name": n, "datatype": datatype(str(array.dtype)), "shape": list(array.shape)}
        if as_binary:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": described}
    if request.id is not None:
        body["id"] = request.id
    head = json.dumps(body).encode()
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)

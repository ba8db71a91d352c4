"""The package manifest: a versioned, validated description of a model package.

The manifest declares everything the runtime needs to run a package without
guessing: the task, the graph's inputs and outputs, pre- and post-processing,
labels, the files with their sha256 and the golden test vectors.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from edge_sdk.errors import PackageError, PackageVersionError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

EMBEDDING_TASK = "text-embedding"
ANOMALY_DETECTION = "anomaly-detection"  # built by convert() from good images (converters.patchcore)
TASKS = ("image-classification", "text-classification", "anomaly-score", ANOMALY_DETECTION, EMBEDDING_TASK)
CONVERT_TASKS = tuple(t for t in TASKS if t != EMBEDDING_TASK)  # convert()'s classifier tasks; embeddings: the KB
IMAGE_TASKS = ("image-classification", "anomaly-score", ANOMALY_DETECTION)
#: What the postprocessing turns the output tensor into, per task.
POSTPROCESS_KINDS = {"image-classification": "classes", "text-classification": "classes",
                     "anomaly-score": "anomaly", ANOMALY_DETECTION: "anomaly", "text-embedding": "embedding"}
POOLINGS = ("none", "mean", "cls")
PRECISIONS = ("fp32", "int8")
GRAPH_VARIANTS = ("u8s8", "u8s7", "s8s8")  # int8 for the onnxruntime CPU provider (per ISA) / for TensorRT
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
INTERPOLATIONS = ("nearest", "linear", "area", "cubic", "lanczos")
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")
DECODES = ("full", "reduced")  # see ImagePreprocess.decode
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Dim = int | str


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise PackageError(f"manifest {where} has no '{key}'", hint="rebuild the package with edge-sdk convert")
    return data[key]


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise PackageError(f"{what} is {value!r}; expected one of {', '.join(allowed)}")
    return str(value)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type and shape (str for a dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        name = _require(data, "name", "tensor")
        dtype = _choice(_require(data, "dtype", f"tensor '{name}'"), DTYPES, f"dtype of tensor '{name}'")
        shape = tuple(_require(data, "shape", f"tensor '{name}'"))
        for dim in shape:
            if not (isinstance(dim, str) or (isinstance(dim, int) and dim > 0)):
                raise PackageError(f"tensor '{name}' has dimension {dim!r}; expected a positive int or an axis name")
        return cls(name=str(name), dtype=dtype, shape=shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ImagePreprocess:
    """How a decoded image becomes the model's input tensor.

    Order: decode (BGR) -> colour conversion -> resize -> centre crop -> float
    -> (x - mean) / std -> layout -> dtype. ``mean``/``std`` are in the
    *output* colour order, on the 0-255 scale. ``decode`` is "full" (every pixel) or "reduced": a JPEG
    at least twice the resize in both directions is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's
    DCT scaling, OpenCV's ``IMREAD_REDUCED_COLOR_*``), the largest reduction that still covers the
    resize, then resized as usual; other inputs decode in full.
    """

    resize: tuple[int, int]
    interpolation: str = "linear"
    crop: tuple[int, int] | None = None
    color: str = "rgb"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "nchw"
    dtype: str = "float32"
    decode: str = "full"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocess:
        known = {"resize", "interpolation", "crop", "color", "mean", "std", "layout", "dtype", "decode"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PackageError(
                f"image preprocess has unknown key(s) {unknown}", hint=f"allowed keys: {', '.join(sorted(known))}"
            )
        resize = _pair(_require(data, "resize", "image preprocess"), "resize")
        crop = _pair(data["crop"], "crop") if data.get("crop") is not None else None
        color = _choice(data.get("color", cls.color), COLORS, "preprocess color")
        channels = 1 if color == "gray" else 3
        mean = _per_channel(data.get("mean", [0.0] * channels), channels, "mean")
        std = _per_channel(data.get("std", [1.0] * channels), channels, "std")
        if any(s == 0 for s in std):
            raise PackageError(f"preprocess std {list(std)} contains 0; expected non-zero values")
        if crop and (crop[0] > resize[0] or crop[1] > resize[1]):
            raise PackageError(f"preprocess crop {list(crop)} is larger than resize {list(resize)}")
        return cls(
            resize=resize,
            interpolation=_choice(data.get("interpolation", cls.interpolation), INTERPOLATIONS,
                                  "preprocess interpolation"),
            crop=crop,
            color=color,
            mean=mean,
            std=std,
            layout=_choice(data.get("layout", cls.layout), LAYOUTS, "preprocess layout"),
            dtype=_choice(data.get("dtype", cls.dtype), ("float32", "float16", "uint8"), "preprocess dtype"),
            decode=_choice(data.get("decode", cls.decode), DECODES, "preprocess decode"),
        )

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.crop or self.resize

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["resize"] = list(self.resize)
        out["crop"] = list(self.crop) if self.crop else None
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if self.decode == ImagePreprocess.decode:
            del out["decode"]  # written only when asked for, so runtimes that predate it read the package
        return out


def _pair(value: Any, what: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise PackageError(f"preprocess {what} is {value!r}; expected [height, width] as two positive ints")
    return (int(value[0]), int(value[1]))


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...]:
    if not (isinstance(value, (list, tuple)) and len(value) == channels):
        raise PackageError(f"preprocess {what} is {value!r}; expected {channels} numbers (one per channel)")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PackageError(f"preprocess {what} is {value!r}; expected numbers") from None


AGGREGATES = ("mean", "max")
DEFAULT_STRIDE = 32


@dataclass(frozen=True)
class TextPreprocess:
    """How a text becomes token tensors: the package's tokenizer file and its limits.

    A text longer than ``max_length`` tokens is read in overlapping windows (``stride`` tokens
    shared by consecutive windows; None: ``min(32, (max_length - 2) // 2)``), at most
    ``max_windows`` of them, whose class probabilities are combined by ``aggregate``. Each
    window is padded to the smallest of ``buckets`` that holds it (empty: powers of two from 16,
    with ``max_length`` as the last); a window longer than the last bucket pads to ``max_length``.
    """

    tokenizer: str = "tokenizer.json"
    max_length: int = 128
    padding: str = "longest"
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = "token_type_ids"
    buckets: tuple[int, ...] = ()
    stride: int | None = None
    max_windows: int = 16
    aggregate: str = "mean"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextPreprocess:
        max_length = data.get("max_length", cls.max_length)
        if not _is_int(max_length) or max_length < 2:
            raise PackageError(f"text max_length is {max_length!r}; expected an int >= 2")
        return cls(
            tokenizer=str(data.get("tokenizer", cls.tokenizer)),
            max_length=max_length,
            padding=_choice(data.get("padding", cls.padding), ("longest", "max_length"), "text padding"),
            input_ids=str(data.get("input_ids", cls.input_ids)),
            attention_mask=data.get("attention_mask", cls.attention_mask),
            token_type_ids=data.get("token_type_ids", cls.token_type_ids),
            buckets=_buckets(data.get("buckets", ()), max_length),
            stride=_stride(data.get("stride"), max_length),
            max_windows=_max_windows(data.get("max_windows", cls.max_windows)),
            aggregate=_choice(data.get("aggregate", cls.aggregate), AGGREGATES, "text aggregate"),
        )

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        """The lengths windows are padded to, ascending, the last one ``max_length``."""
        if self.padding == "max_length":
            return (self.max_length,)
        declared = self.buckets or default_buckets(self.max_length)
        return declared if declared[-1] == self.max_length else (*declared, self.max_length)

    @property
    def window_stride(self) -> int:
        """The overlap in tokens between consecutive windows (the declared one, or the default)."""
        if self.stride is not None:
            return self.stride
        return max(0, min(DEFAULT_STRIDE, (self.max_length - 2) // 2))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["buckets"] = list(self.buckets)
        return out


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 below ``max_length``, then ``max_length`` itself."""
    lengths = [16]
    while lengths[-1] < max_length:
        lengths.append(lengths[-1] * 2)
    return (*(b for b in lengths if b < max_length), max_length)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _buckets(value: Any, max_length: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(b) and b >= 2 for b in value):
        raise PackageError(f"text buckets is {value!r}; expected a list of ints >= 2",
                           hint="for example [16, 32, 64, 128], or [] for powers of two up to max_length")
    buckets = tuple(int(b) for b in value)
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise PackageError(f"text buckets {list(buckets)} are not strictly ascending; expected sorted lengths",
                           hint=f"use {sorted(set(buckets))}")
    if buckets and buckets[-1] > max_length:
        raise PackageError(f"text bucket {buckets[-1]} is longer than max_length {max_length}; "
                           f"expected every bucket <= {max_length}", hint="drop it or raise max_length")
    return buckets


def _stride(value: Any, max_length: int) -> int | None:
    if value is None:
        return None
    limit = max(1, max_length - 2)  # a window holds max_length - 2 text tokens besides [CLS] and [SEP]
    if not _is_int(value) or not 0 <= value < limit:
        raise PackageError(f"text stride is {value!r}; expected an int with 0 <= stride < {limit} "
                           f"(max_length {max_length} - 2)", hint="stride is the overlap in tokens between windows")
    return int(value)


def _max_windows(value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise PackageError(f"text max_windows is {value!r}; expected an int >= 1")
    return int(value)


@dataclass(frozen=True)
class Postprocess:
    """What the output tensor means, by ``kind``.

    * ``classes``: class scores -> softmax (or not), labels, per-class thresholds.
    * ``anomaly``: one score per input (higher is more anomalous); ``score >= threshold`` is
      ``labels[1]`` (the fault), below is ``labels[0]``. ``map_output`` names an anomaly map
      ([batch, h, w], where the score comes from); ``normal_score`` is a typical good part's score,
      so ``(score - normal_score) / (threshold - normal_score)`` is 0 for a good part and 1 at the
      threshold on every device.
    * ``embedding``: vectors ([batch, dim], or [batch, seq, dim] pooled by ``pooling``),
      optionally L2-normalised; no labels.
    """

    output: str
    labels: tuple[str, ...]
    softmax: bool = True
    thresholds: Mapping[str, float] = field(default_factory=dict)
    kind: str = "classes"
    threshold: float | None = None  # anomaly
    map_output: str | None = None  # anomaly: the [batch, h, w] anomaly map, when the model gives one
    normal_score: float | None = None  # anomaly: a typical good part's score (score normalisation)
    pooling: str = "none"  # embedding
    normalize: bool = True  # embedding

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], kind: str = "classes") -> Postprocess:
        kind = _choice(data.get("kind", kind), tuple(sorted(set(POSTPROCESS_KINDS.values()))), "postprocess kind")
        output = str(_require(data, "output", "postprocess"))
        if kind == "embedding":
            return cls(output=output, labels=(), softmax=False, kind=kind,
                       pooling=_choice(data.get("pooling", cls.pooling), POOLINGS, "embedding pooling"),
                       normalize=bool(data.get("normalize", cls.normalize)))
        labels = tuple(str(label) for label in data.get("labels") or (("ok", "fault") if kind == "anomaly" else ()))
        if not labels or len(set(labels)) != len(labels):
            raise PackageError(f"postprocess labels {list(labels)} must be non-empty and unique")
        if kind == "anomaly":
            threshold = data.get("threshold")
            if len(labels) != 2 or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or threshold != threshold:
                raise PackageError(f"anomaly postprocess has labels {list(labels)} and threshold {threshold!r}; "
                                   "expected two labels [normal, fault] and a numeric threshold",
                                   hint="convert with task='anomaly-score' and threshold=<score> (or validation data)")
            normal = data.get("normal_score")
            if normal is not None and (isinstance(normal, bool) or not isinstance(normal, (int, float))
                                       or not normal < threshold):
                raise PackageError(f"anomaly postprocess normal_score is {normal!r}; expected a number below the "
                                   f"threshold {threshold}")
            map_output = data.get("map_output")
            return cls(output=output, labels=labels, softmax=False, kind=kind, threshold=float(threshold),
                       map_output=None if map_output is None else str(map_output),
                       normal_score=None if normal is None else float(normal))
        thresholds = dict(data.get("thresholds") or {})
        for label, value in thresholds.items():
            if label not in labels or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise PackageError(f"threshold {label!r}: {value!r}; expected a known label with a value in [0, 1]")
        return cls(output=output, labels=labels, softmax=bool(data.get("softmax", cls.softmax)), thresholds=thresholds)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "embedding":
            return {"kind": self.kind, "output": self.output, "pooling": self.pooling, "normalize": self.normalize}
        if self.kind == "anomaly":
            return {"kind": self.kind, "output": self.output, "labels": list(self.labels),
                    "threshold": self.threshold,
                    **({"map_output": self.map_output} if self.map_output is not None else {}),
                    **({"normal_score": self.normal_score} if self.normal_score is not None else {})}
        return {"output": self.output, "labels": list(self.labels), "softmax": self.softmax,
                "thresholds": dict(self.thresholds)}


def _knowledge_base(data: Any) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, Mapping) or not {"embeddings", "incidents"} <= set(data):
        raise PackageError(f"manifest knowledge_base is {data!r}; expected an object with 'embeddings' and 'incidents' files")
    return dict(data)


def _graphs(data: Any) -> dict[str, str]:
    if not isinstance(data, Mapping):
        raise PackageError(f"manifest graphs is {data!r}; expected an object of variant -> file")
    for variant in data:
        _choice(variant, GRAPH_VARIANTS, "graph variant")
    return {str(k): str(v) for k, v in data.items()}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The validated content of ``manifest.json``."""

    name: str
    version: str
    task: str
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: ImagePreprocess | TextPreprocess
    postprocess: Postprocess
    files: Mapping[str, FileEntry]
    golden: str | None = "golden.npz"
    precision: str = "fp32"
    graphs: Mapping[str, str] = field(default_factory=dict)  # variant ("u8s8", "u8s7", "s8s8") -> file
    engines: tuple[Mapping[str, Any], ...] = ()
    reports: Mapping[str, Any] = field(default_factory=dict)
    created_by: str = ""
    schema_version: int = SCHEMA_VERSION
    knowledge_base: Mapping[str, Any] | None = None  # files and size of a carried incident index

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise PackageError(f"manifest is a {type(data).__name__}; expected a JSON object")
        version = data.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise PackageVersionError(
                f"manifest schema_version is {version!r}; this edge-sdk reads {list(SUPPORTED_SCHEMA_VERSIONS)}",
                hint="upgrade edge-sdk on this device, or re-convert the model with this version",
            )
        task = _choice(_require(data, "task", "manifest"), TASKS, "manifest task")
        name = str(_require(data, "name", "manifest"))
        if not _NAME_RE.match(name):
            raise PackageError(f"package name {name!r} is invalid; expected letters, digits, '.', '_' or '-'")
        pre = _require(data, "preprocess", "manifest")
        files = {
            str(path): FileEntry(sha256=str(_require(entry, "sha256", f"file '{path}'")),
                                 size=int(_require(entry, "size", f"file '{path}'")))
            for path, entry in dict(_require(data, "files", "manifest")).items()
        }
        outputs = tuple(TensorSpec.from_dict(t) for t in _require(data, "outputs", "manifest"))
        post = Postprocess.from_dict(_require(data, "postprocess", "manifest"), POSTPROCESS_KINDS[task])
        if post.map_output is not None and post.map_output not in {o.name for o in outputs}:
            raise PackageError(f"postprocess map_output {post.map_output!r} is not an output of the graph "
                               f"({', '.join(o.name for o in outputs)})", hint="re-convert the model")
        return cls(
            name=name,
            version=str(_require(data, "version", "manifest")),
            task=task,
            model=str(_require(data, "model", "manifest")),
            inputs=tuple(TensorSpec.from_dict(t) for t in _require(data, "inputs", "manifest")),
            outputs=outputs,
            preprocess=ImagePreprocess.from_dict(pre) if task in IMAGE_TASKS else TextPreprocess.from_dict(pre),
            postprocess=post,
            files=files,
            golden=data.get("golden"),
            precision=_choice(data.get("precision", cls.precision), PRECISIONS, "manifest precision"),
            graphs=_graphs(data.get("graphs", {})),
            engines=tuple(data.get("engines", ())),
            reports=dict(data.get("reports", {})),
            created_by=str(data.get("created_by", cls.created_by)),
            schema_version=int(version),
            knowledge_base=_knowledge_base(data.get("knowledge_base")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "model": self.model,
            "precision": self.precision,
            "graphs": dict(self.graphs),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocess": self.preprocess.to_dict(),
            "postprocess": self.postprocess.to_dict(),
            "golden": self.golden,
            "engines": list(self.engines),
            "reports": dict(self.reports),
            "created_by": self.created_by,
            **({"knowledge_base": dict(self.knowledge_base)} if self.knowledge_base else {}),
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in sorted(self.files.items())},
        }

    def summary(self) -> dict[str, Any]:
        """A short, JSON-serialisable description for ``Model.info`` and ``edge-sdk inspect``."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "precision": self.precision,
            "graphs": dict(self.graphs),
            "labels": list(self.postprocess.labels),
            **({"threshold": self.postprocess.threshold} if self.postprocess.kind == "anomaly" else {}),
            **({"knowledge_base": {k: self.knowledge_base.get(k) for k in ("count", "dim", "faults")}}
               if self.knowledge_base else {}),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocess": self.preprocess.to_dict(),
            "engines": list(self.engines),
            "files": len(self.files),
        }

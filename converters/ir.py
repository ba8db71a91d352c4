"""The converters' one graph representation: every pass reads an ONNX model through ``Graph``.

``Graph(model)`` indexes an ``onnx.ModelProto`` once: nodes in order (one Python object per node,
so passes may key on identity), the node writing and the nodes reading each tensor, initializers,
constants (initializers and ``Constant`` outputs, through ``Identity``), graph inputs and outputs,
the inferred shapes (computed on first use, best effort) and the model family. A pass is a
function ``ModelProto -> ModelProto`` that reads a ``Graph`` of its input and writes a copy
(``copy``); the module's functions are the edits every pass shares: ``bypass`` (redirect readers,
then drop what died), ``drop_dead``, ``forget_shapes``, ``check``, and activation probing
(``with_outputs``, ``probe``, ``outputs_on``) on onnxruntime CPU.

The representation is the protobuf itself, the format every tool on the convert path reads and
writes (onnx.checker and shape inference, onnxruntime sessions and its Q/DQ quantizer, the
TensorRT parser), so a pass hands its result on without a conversion. See the README's design
notes for the comparison with onnx-ir and onnx-graphsurgeon this choice rests on.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sdk.errors import ConversionError, InternalError

__all__ = ["Graph", "TRANSFORMER_MARKERS", "WEIGHTED", "attr", "bypass", "check", "copy", "drop_dead", "family",
           "forget_shapes", "infer", "name_nodes", "node_key", "outputs_on", "probe", "with_outputs"]

Feeds = dict[str, np.ndarray]

#: The ops that carry a weight: what pruning cuts, Q/DQ quantizes and TensorRT's rules check.
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: An op that only transformers use: a graph holding one is quantized and pruned as a transformer.
TRANSFORMER_MARKERS = frozenset({"Softmax", "LayerNormalization", "Erf", "Gelu"})


def node_key(node: onnx.NodeProto) -> str:
    """The name a node is reported and looked up under: its name, or its first output when unnamed."""
    return node.name or node.output[0]


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """Attribute ``name`` of ``node`` as a Python value, or ``default`` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def family(model: onnx.ModelProto) -> str:
    """``"transformer"`` when the graph holds an op only transformers use, else ``"cnn"``."""
    return "transformer" if {n.op_type for n in model.graph.node} & TRANSFORMER_MARKERS else "cnn"


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: passes never edit the model they were given."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a stable name (quantization and reports refer to nodes by name)."""
    out = copy(model)
    taken = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return out


def infer(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    """``model`` with inferred ``value_info``; with ``strict=False`` a graph shape inference cannot
    follow comes back as given (its shapes then stay unknown)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        if strict:
            raise
        return model


class Graph:
    """Look-ups over one ``onnx.ModelProto`` (see the module docstring); it does not copy the model,
    so build a new one after editing it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.nodes: tuple[onnx.NodeProto, ...] = tuple(g.node)
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self.inits = {i.name: i for i in g.initializer}
        self.inputs = frozenset(v.name for v in g.input if v.name not in self.inits)
        self.outputs = frozenset(o.name for o in g.output)
        self.writers: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}  # each reading node once
        self.uses: Counter[str] = Counter()  # reads, counting a node that reads a tensor twice twice
        for node in self.nodes:
            self.writers.update({o: node for o in node.output if o})
            for name in dict.fromkeys(node.input):
                self.readers.setdefault(name, []).append(node)
            self.uses.update(node.input)
        self.by_key = {node_key(n): n for n in self.nodes}
        self.constants = frozenset(self.inits) | {n.output[0] for n in self.nodes if n.op_type == "Constant"}

    @cached_property
    def family(self) -> str:
        return family(self.model)

    def array(self, name: str) -> np.ndarray:
        """The value of initializer ``name``."""
        return numpy_helper.to_array(self.inits[name])

    def const(self, name: str, *, identity: bool = True) -> np.ndarray | None:
        """Value of an initializer, a ``Constant`` output or (with ``identity``) an ``Identity`` of
        either; else None."""
        for _ in range(4 if identity else 1):
            if name in self.inits:
                return self.array(name)
            node = self.writers.get(name)
            if node is None:
                return None
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
                return _constant_value(node.attribute[0])
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def reads(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """``(node, input index)`` of every read of tensor ``name``."""
        return [(n, k) for n in self.readers.get(name, []) for k, i in enumerate(n.input) if i == name]

    def is_scalar(self, name: str) -> bool:
        value = self.const(name)
        return value is not None and value.size == 1

    def matmul_weight(self, node: onnx.NodeProto) -> onnx.TensorProto | None:
        """The 2-D initializer at input 1 of a MatMul, else None."""
        if node.op_type != "MatMul" or len(node.input) < 2:
            return None
        init = self.inits.get(node.input[1])
        return init if init is not None and len(init.dims) == 2 else None

    def bias_after(self, tensor: str, width: int) -> tuple[onnx.NodeProto, str] | None:
        """``(Add node, bias name)`` when ``tensor``'s only reader adds an own ``[width]`` initializer."""
        users = self.readers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != "Add" or tensor in self.outputs:
            return None
        other = [i for i in users[0].input if i != tensor]
        init = self.inits.get(other[0]) if len(other) == 1 else None
        if init is None or list(init.dims) != [width] or self.uses[init.name] != 1:
            return None
        return users[0], init.name

    @cached_property
    def value_info(self) -> dict[str, onnx.ValueInfoProto]:
        """Inferred type and shape of every tensor shape inference could follow."""
        g = infer(self.model).graph
        return {v.name: v for v in (*g.input, *g.value_info, *g.output)}

    @cached_property
    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Inferred shapes; ``None`` for a dimension that is not a fixed number."""
        return {name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
                for name, v in self.value_info.items() if v.type.tensor_type.HasField("shape")}

    def dims(self, name: str) -> tuple[int | str, ...] | None:
        """Inferred shape with symbolic dimensions by name; None when a dimension or the shape is unknown."""
        value = self.value_info.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in value.type.tensor_type.shape.dim)
        return None if None in dims else dims  # type: ignore[return-value]

    def elem_type(self, name: str, default: int = onnx.TensorProto.FLOAT) -> int:
        value = self.value_info.get(name)
        return (value.type.tensor_type.elem_type or default) if value is not None else default


def _constant_value(attribute: onnx.AttributeProto) -> np.ndarray | None:
    value = helper.get_attribute_value(attribute)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if attribute.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if attribute.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    return None


# --- edits ----------------------------------------------------------------------------------------

def drop_dead(model: onnx.ModelProto) -> int:
    """Remove (in place) nodes whose outputs nobody reads, then unread initializers and value_info;
    the number of nodes removed."""
    g = model.graph
    before = len(g.node)
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    forget_shapes(model, {v.name for v in g.value_info} - used)
    return before - len(g.node)


def forget_shapes(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Drop the ``value_info`` of ``names`` (in place): tensors whose shape an edit changed."""
    stale = set(names)
    kept = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def bypass(model: onnx.ModelProto, rename: Mapping[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` where every read of a tensor in ``rename`` reads its replacement instead
    (chains followed), with the nodes and initializers that no longer reach an output dropped."""
    out = copy(model)
    for node in out.graph.node:
        for k, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[k] = name
    drop_dead(out)
    return out


def check(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """``model`` if it passes the full onnx.checker; a pass that produced an invalid graph is a bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"{what} model fails onnx.checker: {exc}") from exc
    return model


# --- activation probing -------------------------------------------------------------------------

def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``names`` added as graph outputs (typed as inferred)."""
    graph = Graph(model)
    out = copy(model)
    extra = [n for n in dict.fromkeys(names) if n not in graph.outputs]
    out.graph.output.extend(helper.make_tensor_value_info(n, graph.elem_type(n), None) for n in extra)
    return out


def _session(model: onnx.ModelProto, *, optimize: bool, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def probe(
    model: onnx.ModelProto, batches: Iterable[Feeds], names: Iterable[str], *, optimize: bool = False,
    threads: int | None = None, error: type[ConversionError] = ConversionError,
) -> Iterator[tuple[Feeds, dict[str, np.ndarray]]]:
    """Run ``model`` (onnxruntime CPU) on every batch with the tensors ``names`` exposed as outputs;
    yield each batch's feeds and ``{name: value}`` (graph inputs come from the feeds).

    Unoptimized by default, so every tensor keeps its meaning; with ``optimize`` onnxruntime may
    fuse, but never removes a node whose output is a graph output, so the values are the same.
    A batch that does not run raises ``error`` naming the batch."""
    wanted = list(dict.fromkeys(names))
    graph_inputs = {i.name for i in model.graph.input}
    fetch = [n for n in wanted if n not in graph_inputs]
    session = _session(with_outputs(model, fetch), optimize=optimize, threads=threads)
    for i, feeds in enumerate(batches):
        try:
            values = dict(zip(fetch, session.run(fetch, feeds)))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise error(f"calibration batch {i} does not run on the model: {exc}",
                        hint="pass feed dicts keyed by the model's input names, with their dtypes") from None
        values.update({k: np.asarray(v) for k, v in feeds.items() if k in wanted})
        yield feeds, values


def outputs_on(model: onnx.ModelProto, batches: Sequence[Feeds]) -> list[np.ndarray]:
    """Every graph output of ``model`` on every batch (float64), batch by batch, through an optimized
    onnxruntime CPU session (an unoptimized one runs a CNN about 10x slower)."""
    session = _session(model, optimize=True)
    return [np.asarray(out, dtype=np.float64) for feeds in batches for out in session.run(None, feeds)]

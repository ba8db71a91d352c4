"""Text-embedding packages, optionally carrying a knowledge base of past incidents.

``read_incidents`` reads the incidents CSV; ``build_knowledge_base`` (and ``convert`` with
``task="text-embedding"``) writes a package with the embedding model, its tokenizer, golden
vectors and the index. The index is embedded with onnxruntime through the runtime's own
:class:`~runtime.knowledge.Embedder`, the code that embeds queries on the device.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from converters.arguments import Options, golden_feeds, read_tokenizer, text_preprocess
from converters.data import Sample
from converters.graph import ModelSource, io_specs, load_onnx
from converters.ir import name_nodes
from converters.report import ConversionReport
from edge_sdk.errors import ConversionError
from runtime.knowledge import Embedder, Incident, index_entry, index_files, l2_normalize
from runtime.manifest import Manifest, Postprocess, TensorSpec
from runtime.package import Package, golden_bytes, sha256_bytes, write_package
from runtime.pipeline import Pipeline, make_encoder
from runtime.runners.onnxrt import OnnxRuntimeRunner
from runtime.select import Selection

log = logging.getLogger(__name__)

TASK = "text-embedding"
REQUIRED_COLUMNS = ("text", "fault", "fix")
OPTIONAL_COLUMNS = ("id", "asset", "date")
_COLUMNS_HINT = "required columns: text, fault, fix; optional: id, asset, date"


def read_incidents(path: str | os.PathLike[str]) -> list[Incident]:
    """Incidents from a UTF-8 CSV (a BOM is fine) with a header naming its columns (any case).

    ``text`` and ``fault`` must be non-empty; ``fix`` may be empty. Without an ``id`` column
    incidents are numbered from 1 in file order; with one, ids must be non-empty and unique.
    """
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"incidents file {str(p)!r} does not exist", hint="pass the path of a CSV file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConversionError(f"{p} line {line} is not UTF-8 ({exc.reason} at byte {exc.start})",
                              hint="save the file as UTF-8 (CSV UTF-8 in a spreadsheet program)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        incidents = _rows(reader, _header(header, p), len(header), p)
    except csv.Error as exc:
        raise ConversionError(f"{p} line {reader.line_num} is not valid CSV ({exc})",
                              hint="quote fields that contain commas, quotes or line breaks") from None
    if not incidents:
        raise ConversionError(f"{p} holds no incidents", hint="add one row per past incident under the header")
    return incidents


def _header(row: Sequence[str], path: Path) -> dict[str, int]:
    names = [name.strip().lower() for name in row]
    columns: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in columns and name:
            raise ConversionError(f"{path} line 1: column {name!r} appears twice", hint="keep one of them")
        columns[name] = index
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            raise ConversionError(f"{path} line 1: column {name!r} is missing; the header is {names}",
                                  hint=f"add a {name!r} column ({_COLUMNS_HINT})")
    ignored = sorted(set(columns) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS))
    if ignored:
        log.warning("%s: ignoring column(s) %s (%s)", path, ignored, _COLUMNS_HINT)
    return {name: i for name, i in columns.items() if name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}


def _rows(reader: Any, columns: dict[str, int], width: int, path: Path) -> list[Incident]:
    incidents: list[Incident] = []
    seen: dict[str, int] = {}
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not any(field.strip() for field in row):
            continue
        if len(row) != width:
            raise ConversionError(f"{path} line {start} has {len(row)} fields; the header names {width}",
                                  hint="quote fields that contain commas, and fill every column")
        values = {name: row[i].strip() for name, i in columns.items()}
        for name in ("text", "fault"):
            if not values[name]:
                raise ConversionError(f"{path} line {start}: column {name!r} is empty",
                                      hint=f"write the incident's {name}, or delete the row")
        ident = values.get("id", str(len(incidents) + 1))
        if not ident:
            raise ConversionError(f"{path} line {start}: column 'id' is empty",
                                  hint="give every incident an id, or drop the id column to number them")
        if ident in seen:
            raise ConversionError(f"{path} line {start}: id {ident!r} is already used on line {seen[ident]}",
                                  hint="give every incident a unique id")
        seen[ident] = start
        incidents.append(Incident(id=ident, text=values["text"], fault=values["fault"], fix=values["fix"],
                                  asset=values.get("asset") or None, date=values.get("date") or None))
    return incidents


def build_knowledge_base(
    model: ModelSource,
    csv: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str],
    max_length: int = 128,
    pooling: str = "mean",
    normalize: bool = True,
    name: str | None = None,
    version: str = "1",
    archive: bool = True,
    output_name: str | None = None,
    threads: int | None = None,
) -> Package:
    """Write a text-embedding package at ``output`` carrying the incidents of the CSV file ``csv`` as an
    index (see :func:`read_incidents`), embedded by ``model`` with ``pooling`` over its token vectors."""
    opts = Options(name=name, version=version, archive=archive, output_name=output_name, threads=threads,
                   knowledge_base=csv, pooling=pooling, normalize=normalize)
    package, _, _ = _write(model, output, tokenizer, max_length, None, opts)
    return package


def convert_embedding(
    model: ModelSource, output: str | os.PathLike[str], *, labels: Any, preprocess: Any,
    tokenizer: str | os.PathLike[str] | None, max_length: int, calibration: str | os.PathLike[str] | None,
    validation: Any, opts: Options,
) -> ConversionReport:
    """``convert(task="text-embedding", ...)``: golden texts come from the incidents, else ``calibration``
    (a text file, one text per line), else a few synthetic texts."""
    start = time.perf_counter()
    unused = {"labels": labels, "preprocess": preprocess, "validation": validation, "quantize": opts.quantize,
              "prune": opts.prune}
    given = [key for key, value in unused.items() if value is not None]
    if given:
        raise ConversionError(f"{', '.join(given)} cannot be used with task 'text-embedding'",
                              hint="an embedding package has no labels; int8 and pruning are not supported for it yet")
    package, golden, notes = _write(model, output, tokenizer, max_length, calibration, opts)
    m = package.manifest
    return ConversionReport(
        package=str(package.path), name=m.name, task=m.task, precision=m.precision, labels=(),
        inputs=tuple(t.to_dict() for t in m.inputs), outputs=tuple(t.to_dict() for t in m.outputs),
        golden_samples=golden, seconds=time.perf_counter() - start, notes=tuple(notes))


def _write(model: ModelSource, output: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None,
           max_length: int, calibration: str | os.PathLike[str] | None,
           opts: Options) -> tuple[Package, int, list[str]]:
    """Check the model, embed the incidents, and write the package; its golden sample count and notes."""
    incidents = read_incidents(opts.knowledge_base) if opts.knowledge_base is not None else []
    proto, manifest, tokenizer_json = _prepare(model, output, tokenizer, max_length, opts)
    model_bytes = proto.SerializeToString()
    runner = OnnxRuntimeRunner(model_bytes, manifest.inputs, manifest.outputs, threads=opts.threads).activate()
    encoder = make_encoder(manifest, tokenizer_json)
    try:
        samples = [Sample(i.text, i.fault) for i in incidents]  # golden texts spread over the faults
        golden_in = golden_feeds(TASK, encoder, samples, calibration, manifest.inputs, (), opts.golden_samples)
        golden_out = runner.infer(golden_in)
        embedder = Embedder(Pipeline(manifest, Selection("onnxruntime-cpu", runner, ()), encoder))
        embeddings = l2_normalize(embedder.embed([i.text for i in incidents])) if incidents else None
    finally:
        runner.deactivate()
    files = {"model.onnx": model_bytes, "golden.npz": golden_bytes(golden_in, golden_out),
             "tokenizer.json": tokenizer_json.encode("utf-8")}
    notes = ["precision fp32: int8 is not supported for text-embedding packages yet"]
    kb = None
    if embeddings is not None:
        files.update(index_files(embeddings, incidents))
        kb = index_entry(embeddings, incidents, model=manifest.model, model_sha256=sha256_bytes(model_bytes),
                         source=Path(str(opts.knowledge_base)).name)
        notes.append(f"knowledge base: {kb['count']} incidents, dimension {kb['dim']}, "
                     f"{len(kb['faults'])} faults ({', '.join(kb['faults'][:8])})")
    manifest = replace(manifest, knowledge_base=kb, reports={"conversion": {"precision": "fp32", "notes": notes}})
    package = write_package(manifest, files, output, archive=opts.archive, sign=opts.sign)
    log.info("wrote %s", package.path)
    return package, len(next(iter(golden_in.values()))), notes


def _prepare(model: ModelSource, output: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None,
             max_length: int, opts: Options) -> tuple[Any, Manifest, str]:
    """Load and check the graph; the manifest without files."""
    proto = name_nodes(load_onnx(model))
    inputs, outputs = io_specs(proto)
    pre = text_preprocess(inputs, max_length)
    tokenizer_json = read_tokenizer(tokenizer)
    out = _embedding_output(outputs, opts.output_name, opts.pooling)
    if opts.pooling == "mean" and pre.attention_mask is None:
        raise ConversionError("mean pooling needs the attention mask to leave padding out, and the graph has no "
                              "attention_mask input", hint="export the model with attention_mask, or use pooling='cls'")
    manifest = Manifest(
        name=opts.name or Path(output).name.split(".")[0] or "model", version=opts.version, task=TASK,
        model="model.onnx", inputs=inputs, outputs=(out,), preprocess=pre,
        postprocess=Postprocess(output=out.name, labels=(), softmax=False, kind="embedding", pooling=opts.pooling,
                                normalize=opts.normalize),
        files={}, created_by="edge-sdk converters",
    )
    return proto, manifest, tokenizer_json


def _embedding_output(outputs: Sequence[TensorSpec], name: str | None, pooling: str) -> TensorSpec:
    candidates = [o for o in outputs if name in (None, o.name)]
    if len(candidates) != 1:
        raise ConversionError(f"cannot choose the embedding output among {[o.name for o in outputs]}",
                              hint="pass output_name=... naming the [batch, dim] or [batch, sequence, dim] output")
    out = candidates[0]
    rank = 2 if pooling == "none" else 3
    if out.dtype not in ("float32", "float16") or len(out.shape) != rank:
        want = "[batch, dim]" if rank == 2 else "[batch, sequence, dim]"
        raise ConversionError(f"output '{out.name}' is {out.dtype} {list(out.shape)}; pooling {pooling!r} needs "
                              f"float {want}", hint="pooling='none' takes pooled [batch, dim] vectors; 'mean' or "
                              "'cls' take token vectors [batch, sequence, dim]")
    return out


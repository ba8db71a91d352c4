"""``edge-sdk kb``: build a knowledge base of past incidents into a package, and search it.

Thin glue over ``converters.knowledge`` (build, workstation) and ``runtime.knowledge``
(search, device). ``kb build`` needs the 'convert' extra; ``kb search`` does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_sdk.errors import BackendUnavailableError

_FAULT_WIDTH, _FIX_WIDTH, _TEXT_WIDTH = 18, 36, 60


def _cut(value: str, width: int) -> str:
    value = " ".join(value.split())
    return value if len(value) <= width else value[: width - 3] + "..."


def _cmd_kb_build(args: argparse.Namespace) -> int:
    try:
        from converters.knowledge import build_knowledge_base
    except ImportError as exc:
        raise BackendUnavailableError(f"edge-sdk kb build needs the 'convert' extra ({exc.name} is missing)",
                                      hint="pip install 'edge-sdk[convert]'") from None
    options: dict[str, Any] = {k: v for k, v in {"name": args.name, "version": args.version,
                                                 "output_name": args.output_name}.items() if v is not None}
    package = build_knowledge_base(args.model, args.csv, args.output, tokenizer=args.tokenizer,
                                   max_length=args.max_length, pooling=args.pooling, archive=not args.directory,
                                   **options)
    m = package.manifest
    kb = dict(m.knowledge_base or {})
    if args.json:
        print(json.dumps({"package": str(package.path), "name": m.name, "version": m.version, "task": m.task,
                          "pooling": m.postprocess.pooling, "knowledge_base": kb}, indent=2, sort_keys=True))
        return 0
    print(f"package: {package.path}")
    print(f"model: {m.name} {m.version} ({m.task}, pooling {m.postprocess.pooling}, max length "
          f"{m.preprocess.to_dict()['max_length']})")
    print(f"knowledge base: {kb['count']} incidents, dimension {kb['dim']}, faults: {', '.join(kb['faults'])}")
    return 0


def _cmd_kb_search(args: argparse.Namespace) -> int:
    from runtime.knowledge import KnowledgeBase

    with KnowledgeBase.from_package(args.package, backend=args.backend, threads=args.threads) as kb:
        matches = kb.search(args.text, k=args.k, min_similarity=args.min_similarity, fault=args.fault)
        skipped = kb.embedder.pipeline.skipped
        if args.json:
            print(json.dumps({"query": args.text, "backend": kb.backend, "incidents": len(kb),
                              "matches": [m.to_dict() for m in matches]}, indent=2, sort_keys=True))
        else:
            print(f"{'rank':>4}  {'similarity':>10}  {'fault':<{_FAULT_WIDTH}}  {'fix':<{_FIX_WIDTH}}  text")
            for m in matches:
                i = m.incident
                print(f"{m.rank:>4}  {m.similarity:>10.3f}  {_cut(i.fault, _FAULT_WIDTH):<{_FAULT_WIDTH}}  "
                      f"{_cut(i.fix, _FIX_WIDTH):<{_FIX_WIDTH}}  {_cut(i.text, _TEXT_WIDTH)}")
            if not matches:
                print(f"(no incident reaches similarity {args.min_similarity})")
    for s in skipped:
        print(f"(skipped {s.backend}: {s.reason})", file=sys.stderr)
    return 0


def add_kb_parser(sub: Any) -> None:
    """Register ``edge-sdk kb build`` and ``edge-sdk kb search`` on the top-level subparsers."""
    p = sub.add_parser("kb", help="knowledge bases of past incidents: build one into a package, search it")
    kb = p.add_subparsers(dest="kb_command", required=True)

    p = kb.add_parser("build", help="embed an incidents CSV (text, fault, fix[, id, asset, date]) into a package")
    p.add_argument("csv", help="incidents CSV with a header: text, fault, fix; optional id, asset, date")
    p.add_argument("--model", required=True, help="the embedding model (.onnx)")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer.json")
    p.add_argument("-o", "--output", required=True, help="package path to write")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "none"],
                   help="token vectors -> one vector: masked mean, first token, or none for a [batch, dim] output")
    p.add_argument("--max-length", type=int, default=128, help="text truncation length")
    p.add_argument("--output-name", help="the embedding output, when the graph has several")
    p.add_argument("--name", help="package name (default: from the output file name)")
    p.add_argument("--version", help="package version")
    p.add_argument("--directory", action="store_true", help="write a directory instead of one archive file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_kb_build)

    p = kb.add_parser("search", help="the past incidents most similar to a text")
    p.add_argument("package")
    p.add_argument("text", help="the symptom or report to look up")
    p.add_argument("-k", type=int, default=5, help="how many incidents to return")
    p.add_argument("--fault", help="only incidents of this fault")
    p.add_argument("--min-similarity", type=float, help="leave out incidents below this cosine similarity")
    p.add_argument("--backend", default="auto", help="auto, or a comma-separated policy (e.g. onnxruntime-cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_kb_search)

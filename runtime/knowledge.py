"""Retrieval over a knowledge base of past incidents, carried by a text-embedding package.

A ``text-embedding`` package may carry an index of past incidents (text, fault, fix):
``kb/embeddings.npy`` (float32 [N, D], rows L2-normalised) and ``kb/incidents.jsonl``
(one incident per line, in index order), both listed with their sha256 like every other
file and declared in ``manifest.knowledge_base`` with their count and dimension.

The same :class:`Embedder` embeds the index on the workstation and the queries on the
device (encode -> infer -> pool -> L2-normalise), so both sides agree by construction.
Similarity is cosine (a dot product of unit vectors).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from edge_sdk.errors import InferenceError, PackageError, PipelineError
from runtime.closing import Closing
from runtime.manifest import Manifest, TextPreprocess
from runtime.package import Package
from runtime.pipeline import Pipeline

EMBEDDINGS_FILE = "kb/embeddings.npy"
INCIDENTS_FILE = "kb/incidents.jsonl"
DEFAULT_BATCH = 32
_NORM_TOLERANCE = 1e-3
_DIM_PROBE = "dimension probe"


@dataclass(frozen=True)
class Incident:
    """One past incident: what was reported, the fault found and the fix applied."""

    id: str
    text: str
    fault: str
    fix: str
    asset: str | None = None
    date: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Incident:
        if not isinstance(data, Mapping):
            raise PackageError(f"{where} is {data!r}; expected a JSON object", hint="rebuild it with edge-sdk kb build")
        fields = {}
        for key in ("id", "text", "fault", "fix"):
            if not isinstance(data.get(key), str):
                raise PackageError(f"{where} has {key}={data.get(key)!r}; expected a string",
                                   hint="rebuild the knowledge base with edge-sdk kb build")
            fields[key] = data[key]
        optional = {k: str(data[k]) for k in ("asset", "date") if data.get(k) is not None}
        return cls(**fields, **optional)

    def to_dict(self) -> dict[str, str]:
        out = {"id": self.id, "text": self.text, "fault": self.fault, "fix": self.fix}
        out.update({k: v for k, v in (("asset", self.asset), ("date", self.date)) if v is not None})
        return out


@dataclass(frozen=True)
class Match:
    """A past incident returned by a search, with its cosine similarity and 1-based rank."""

    incident: Incident
    similarity: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "similarity": self.similarity, "incident": self.incident.to_dict()}


def pool(hidden: np.ndarray, mask: np.ndarray | None, pooling: str) -> np.ndarray:
    """[B, D] vectors from a model output: ``none`` takes [B, D] as is, ``cls`` the first token of
    [B, S, D], ``mean`` the mean over the tokens the attention mask keeps."""
    want = 2 if pooling == "none" else 3
    if hidden.ndim != want:
        raise PipelineError(f"embedding output has shape {list(hidden.shape)}; pooling {pooling!r} expects "
                            f"{'[batch, dim]' if want == 2 else '[batch, sequence, dim]'}",
                            hint="rebuild the package with the pooling that fits the model's output")
    if pooling == "none":
        return hidden.astype(np.float32, copy=False)
    if pooling == "cls":
        return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)
    if mask is None:
        raise PipelineError("mean pooling needs the attention mask, and the package declares none",
                            hint="rebuild the package from a model with an attention_mask input, or use pooling='cls'")
    if mask.shape != hidden.shape[:2]:
        raise PipelineError(f"attention mask {list(mask.shape)} does not cover the embedding output "
                            f"{list(hidden.shape)}; expected [batch, sequence] to match",
                            hint="the model changes the sequence length; use pooling='cls' or pool inside the graph")
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden.astype(np.float32) * weights).sum(axis=1)
    return summed / np.maximum(weights.sum(axis=1), 1.0)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class Embedder:
    """Texts -> [N, D] float32 vectors through a text-embedding package's pipeline."""

    def __init__(self, pipeline: Pipeline, batch_size: int = DEFAULT_BATCH) -> None:
        m = pipeline.manifest
        if m.postprocess.kind != "embedding" or not isinstance(m.preprocess, TextPreprocess):
            raise PackageError(f"package {m.name} is a {m.task} model; expected a text-embedding package",
                               hint="build one with edge-sdk kb build or convert(task='text-embedding')")
        if batch_size < 1:
            raise PipelineError(f"batch_size is {batch_size}; expected at least 1")
        spec = next((o for o in m.outputs if o.name == m.postprocess.output), None)
        if spec is None:
            raise PackageError(f"package {m.name} pools output {m.postprocess.output!r}, which it does not declare",
                               hint=f"declared outputs: {[o.name for o in m.outputs]}; rebuild the package")
        self.pipeline = pipeline
        self.batch_size = batch_size
        self._mask = m.preprocess.attention_mask
        self._dim: int | None = spec.shape[-1] if isinstance(spec.shape[-1], int) else None

    @property
    def dim(self) -> int:
        """The embedding dimension: declared by the output's last axis, else measured once."""
        if self._dim is None:
            self._dim = int(self.embed([_DIM_PROBE]).shape[1])
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in batches of ``batch_size``; pooled and, when the manifest says so, L2-normalised."""
        if isinstance(texts, str) or len(texts) == 0:
            raise PipelineError("embed takes a non-empty list of texts", hint="wrap a single text in a list")
        post = self.pipeline.manifest.postprocess
        parts = []
        for start in range(0, len(texts), self.batch_size):
            feeds = self.pipeline.encode(texts[start : start + self.batch_size])
            outputs = self.pipeline.infer(feeds)
            vectors = pool(outputs[post.output], feeds.get(self._mask) if self._mask else None, post.pooling)
            parts.append(l2_normalize(vectors) if post.normalize else vectors)
        out = np.concatenate(parts, axis=0)
        if not np.isfinite(out).all():
            raise InferenceError(f"the embedding model produced non-finite values on {self.pipeline.backend}",
                                 hint="check the model; try backend='onnxruntime-cpu'")
        return out

    def close(self) -> None:
        self.pipeline.close()


def index_files(embeddings: np.ndarray, incidents: Sequence[Incident]) -> dict[str, bytes]:
    """The package files of an index: ``kb/embeddings.npy`` and ``kb/incidents.jsonl``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(embeddings, dtype=np.float32), allow_pickle=False)
    lines = [json.dumps(i.to_dict(), ensure_ascii=False, sort_keys=True) for i in incidents]
    return {EMBEDDINGS_FILE: buf.getvalue(), INCIDENTS_FILE: ("\n".join(lines) + "\n").encode("utf-8")}


def index_entry(embeddings: np.ndarray, incidents: Sequence[Incident], **extra: Any) -> dict[str, Any]:
    """The ``manifest.knowledge_base`` entry of an index."""
    faults = sorted({i.fault for i in incidents})
    return {"embeddings": EMBEDDINGS_FILE, "incidents": INCIDENTS_FILE, "count": int(embeddings.shape[0]),
            "dim": int(embeddings.shape[1]), "similarity": "cosine", "faults": faults, **extra}


def load_index(package: Package) -> tuple[np.ndarray, tuple[Incident, ...]]:
    """Read and check a package's index (files verified against the package hashes on read)."""
    m, kb = package.manifest, package.manifest.knowledge_base
    if m.task != "text-embedding" or kb is None:
        raise PackageError(f"package {m.name} ({m.task}) carries no knowledge base",
                           hint="build one with edge-sdk kb build INCIDENTS.csv --model ... -o ...")
    name = str(kb["embeddings"])
    try:
        embeddings = np.load(io.BytesIO(package.read_bytes(name)), allow_pickle=False)
    except ValueError as exc:
        raise PackageError(f"{name} in package {m.name} is not a .npy array ({exc})") from None
    if embeddings.dtype != np.float32 or embeddings.ndim != 2 or not np.isfinite(embeddings).all():
        raise PackageError(f"{name} in package {m.name} is {embeddings.dtype} {list(embeddings.shape)}; "
                           "expected finite float32 [count, dim]", hint="rebuild the knowledge base")
    _check_declared(m, embeddings)
    norms = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero((np.abs(norms - 1.0) > _NORM_TOLERANCE) & (norms != 0.0))
    if bad.size:
        raise PackageError(f"row {int(bad[0])} of {name} has norm {float(norms[bad[0]]):.4f}; expected "
                           "L2-normalised rows", hint="rebuild the knowledge base with edge-sdk kb build")
    incidents = _read_incidents(package, str(kb["incidents"]))
    if len(incidents) != embeddings.shape[0]:
        raise PackageError(f"package {m.name} has {len(incidents)} incidents but {embeddings.shape[0]} embeddings",
                           hint="rebuild the knowledge base")
    return embeddings, incidents


def _check_declared(m: Manifest, embeddings: np.ndarray) -> None:
    kb = m.knowledge_base or {}
    graph = m.files.get(str(kb.get("model", m.model)))
    if kb.get("model_sha256") is not None and (graph is None or graph.sha256 != kb["model_sha256"]):
        raise PackageError(f"the knowledge base of {m.name} was embedded by another graph than its "
                           f"{kb.get('model', m.model)}; its similarities would be meaningless",
                           hint="rebuild the knowledge base with this model")
    for axis, key in enumerate(("count", "dim")):
        declared = kb.get(key)
        if declared is not None and declared != embeddings.shape[axis]:
            raise PackageError(f"the knowledge base of {m.name} declares {key} {declared!r}, but its embeddings "
                               f"are {list(embeddings.shape)}", hint="rebuild the knowledge base")


def _read_incidents(package: Package, name: str) -> tuple[Incident, ...]:
    try:
        lines = package.read_bytes(name).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PackageError(f"{name} in package {package.manifest.name} is not UTF-8 ({exc})") from None
    incidents = []
    for number, line in enumerate(lines, start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PackageError(f"{name} line {number} is not JSON ({exc})", hint="rebuild the knowledge base") from None
        incidents.append(Incident.from_dict(data, f"{name} line {number}"))
    return tuple(incidents)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first; equal scores keep index order (deterministic)."""
    n = scores.shape[0]
    if k >= n:
        candidates = np.arange(n)
    else:
        kth = scores[np.argpartition(scores, n - k)[n - k :]].min()
        candidates = np.flatnonzero(scores >= kth)  # every tie at the boundary, so that order decides
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order][:k]


class KnowledgeBase(Closing):
    """Past incidents and their embeddings, searched by cosine similarity to a query text."""

    def __init__(self, embedder: Embedder, embeddings: np.ndarray, incidents: Sequence[Incident]) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(incidents):
            raise PackageError(f"the index is {list(embeddings.shape)} for {len(incidents)} incidents; "
                               "expected one embedding row per incident")
        if embeddings.shape[1] != embedder.dim:
            raise PackageError(f"the index has dimension {embeddings.shape[1]} but the package's model embeds to "
                               f"{embedder.dim}", hint="rebuild the knowledge base with this model")
        self.embedder = embedder
        self.incidents = tuple(incidents)
        self._embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self._faults = np.array([i.fault for i in self.incidents], dtype=object)

    @classmethod
    def from_package(cls, path: str | os.PathLike[str] | Package, backend: str | Sequence[str] = "auto",
                     threads: int | None = None, *, verify: bool = True) -> KnowledgeBase:
        """Open and verify a package, read its index, and activate its embedding model."""
        package = path if isinstance(path, Package) else Package.open(path)
        embeddings, incidents = load_index(package)
        pipeline = Pipeline.from_package(package, backend, threads=threads, verify=verify)
        try:
            return cls(Embedder(pipeline), embeddings, incidents)
        except BaseException:
            pipeline.close()
            raise

    @property
    def faults(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._faults)))

    @property
    def backend(self) -> str:
        return self.embedder.pipeline.backend

    def __len__(self) -> int:
        return len(self.incidents)

    def search(self, text: str, k: int = 5, min_similarity: float | None = None, *,
               fault: str | None = None) -> list[Match]:
        """The ``k`` past incidents most similar to ``text``, best first, equal similarities in incident
        order; fewer when the base is smaller or some fall below ``min_similarity``. ``fault`` keeps only
        incidents of that fault. Similarities are cosines, clipped to [-1, 1] against rounding."""
        return self.search_batch([text], k, min_similarity, fault=fault)[0]

    def search_batch(self, texts: Sequence[str], k: int = 5, min_similarity: float | None = None, *,
                     fault: str | None = None) -> list[list[Match]]:
        """:meth:`search` for several query texts, embedded in batches."""
        _check_query(texts, k, min_similarity)
        pool_ids = self._candidates(fault)
        index = self._embeddings if fault is None else self._embeddings[pool_ids]
        queries = l2_normalize(self.embedder.embed(list(texts)))
        scores = queries @ index.T
        results = []
        for row in scores:
            best = top_k(row, k)
            matches = [Match(self.incidents[pool_ids[i]], float(np.clip(row[i], -1.0, 1.0)), rank)
                       for rank, i in enumerate(best, start=1)]
            results.append([m for m in matches if min_similarity is None or m.similarity >= min_similarity])
        return results

    def _candidates(self, fault: str | None) -> np.ndarray:
        if fault is None:
            return np.arange(len(self.incidents))
        if fault not in self.faults:
            raise PipelineError(f"fault {fault!r} is not in the knowledge base",
                                hint=f"known faults: {', '.join(self.faults)}")
        return np.flatnonzero(self._faults == fault)

    def close(self) -> None:
        self.embedder.close()


def _check_query(texts: Sequence[str], k: int, min_similarity: float | None) -> None:
    if isinstance(texts, str) or len(texts) == 0:
        raise PipelineError("search_batch takes a non-empty list of query texts",
                            hint="use search(text) for one query")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"query #{i} is {text!r}; expected a non-empty text",
                                hint="describe the symptom, e.g. 'grinding noise at the drive-end bearing'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PipelineError(f"k is {k!r}; expected an int >= 1 (the number of incidents to return)")
    if min_similarity is not None and (isinstance(min_similarity, bool) or not isinstance(min_similarity, (int, float))
                                       or not -1.0 <= min_similarity <= 1.0):
        raise PipelineError(f"min_similarity is {min_similarity!r}; expected a cosine similarity in [-1, 1] or None")

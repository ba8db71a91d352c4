"""Pipelines: input -> preprocess -> runner -> postprocess -> :class:`Prediction`.

Pre- and post-processing come from the package manifest and are shared by
every backend; backends differ only in how they run the graph.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edge_sdk.errors import PackageError, PipelineError
from runtime.closing import Closing
from runtime.manifest import ImagePreprocess, Manifest, TextPreprocess
from runtime.package import Package
from runtime.prediction import (Prediction, Timings, anomaly_predictions, anomaly_scores, class_scores,
                                to_predictions)
from runtime.preprocess.image import preprocess_image, preprocess_images
from runtime.preprocess.text import TextBatch, TextEncoder, TextFeeds, aggregate_windows, fixed_sequence_length
from runtime.parity import Parity
from runtime.runners.base import DEFAULT_MAX_BATCH, Runner
from runtime.select import Selection, Skipped, select_runner

log = logging.getLogger(__name__)

Encoder = Callable[[Sequence[Any]], dict[str, np.ndarray]]
#: Texts whose windows ``predict_batch`` reads in one tokenizer call before running their buckets.
TEXTS_PER_PASS = 1024
#: At most this many image decode threads beside the model (see Pipeline.decode_workers).
MAX_DECODE_WORKERS = 4
#: Backends whose inference runs off the CPU: every core but the feeding one may decode.
GPU_BACKENDS = frozenset({"tensorrt", "tensorrt-dla", "onnxruntime-tensorrt", "onnxruntime-cuda"})


def make_encoder(m: Manifest, tokenizer_json: str | None = None) -> Encoder:
    """The manifest's preprocessing as a function from a batch of raw inputs to feeds."""
    pre = m.preprocess
    if isinstance(pre, ImagePreprocess):
        name = m.inputs[0].name
        return lambda images: {name: preprocess_images(images, pre)}
    if tokenizer_json is None:
        raise PackageError(f"package {m.name} is a text model but no tokenizer was given")
    encoder = TextEncoder(tokenizer_json, pre, fixed_sequence_length(m.inputs, pre))
    return TextFeeds(encoder, {t.name: np.dtype(t.dtype) for t in m.inputs})


class Pipeline(Closing):
    """A package, its preprocessing and an active runner, ready to predict."""

    def __init__(
        self, manifest: Manifest, selection: Selection, encoder: Encoder, package: Package | None = None
    ) -> None:
        self.manifest = manifest
        self.package = package
        self.selection = selection
        self._encode = encoder

    @property
    def parity(self) -> Parity | None:
        """The golden-vector check the backend passed before serving (None when not verified)."""
        return self.selection.parity

    @classmethod
    def from_package(
        cls,
        path: str | os.PathLike[str] | Package,
        backend: str | Sequence[str] = "auto",
        *,
        threads: int | None = None,
        precision: str = "auto",
        verify: bool = True,
    ) -> Pipeline:
        """Open and verify a package, select a backend, and (by default) check it against the golden outputs."""
        package = path if isinstance(path, Package) else Package.open(path)
        m = package.manifest
        tokenizer = package.read_bytes(m.preprocess.tokenizer).decode("utf-8") if isinstance(
            m.preprocess, TextPreprocess) else None
        encoder = make_encoder(m, tokenizer)
        selection = select_runner(package, backend, threads=threads, precision=precision, verify=verify)
        return cls(m, selection, encoder, package)

    @property
    def backend(self) -> str:
        return self.selection.backend

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        return self.selection.skipped

    def predict(self, item: Any) -> Prediction:
        return self.predict_batch([item])[0]

    def predict_batch(self, items: Sequence[Any], *, max_batch: int = DEFAULT_MAX_BATCH) -> list[Prediction]:
        """Predict every item, running at most ``max_batch`` at a time.

        Text classification reads the windows of every text first (up to :data:`TEXTS_PER_PASS` texts
        per tokenizer call) and runs each length bucket ``max_batch`` windows at a time, so texts of
        mixed lengths fill whole batches per bucket instead of many small ones per chunk of texts."""
        if isinstance(items, (str, bytes)):
            raise PipelineError("predict_batch takes a sequence of inputs, not a single str/bytes",
                                hint="use predict(x) for one input or predict_batch([x])")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise PipelineError(f"max_batch is {max_batch!r}; expected an int >= 1")
        windowed = self._windowed()
        step = TEXTS_PER_PASS if windowed is not None else max_batch
        chunks = [items[start : start + step] for start in range(0, len(items), step)]
        workers = self.decode_workers() if windowed is None and len(chunks) > 1 else 0
        if workers:
            return self._run_prefetched(chunks, workers)
        out: list[Prediction] = []
        for chunk in chunks:
            out.extend(self._run_windows(chunk, windowed, max_batch) if windowed is not None else self._run(chunk))
        return out

    def decode_workers(self) -> int:
        """Threads ``predict_batch`` decodes and preprocesses images on while the model runs the previous
        batch: the cores the backend leaves idle (all but one beside a GPU backend, those beyond the
        runner's ``threads`` on the CPU, none when it uses every core), at most :data:`MAX_DECODE_WORKERS`.
        OpenCV's own thread pool is left as the process set it: on frames up to 1080p its parallel
        regions gained nothing for decode and resize (PNG decode 1.15 vs 1.36 ms, INTER_AREA resize
        0.75 vs 0.63 ms with 2 threads against 1), so the workers are what runs in parallel."""
        if not isinstance(self.manifest.preprocess, ImagePreprocess):
            return 0
        cores = os.cpu_count() or 1
        if self.backend in GPU_BACKENDS:
            busy = 1  # the thread that feeds the GPU
        else:
            busy = getattr(self.selection.runner, "threads", None) or cores
        return max(0, min(cores - busy, MAX_DECODE_WORKERS))

    def encode_batches(self, items: Sequence[Any], *, max_batch: int = DEFAULT_MAX_BATCH) -> list[dict[str, np.ndarray]]:
        """The feeds ``predict_batch(items, max_batch=...)`` runs the graph on, in order: to time the model
        alone (``[pipeline.infer(f) for f in feeds]``) on exactly the batches a prediction runs."""
        windowed = self._windowed()
        if windowed is None:
            return [self.encode(items[s : s + max_batch]) for s in range(0, len(items), max_batch)]
        return [feeds for s in range(0, len(items), TEXTS_PER_PASS)
                for group in windowed.windows(items[s : s + TEXTS_PER_PASS]).groups
                for feeds in _row_chunks(group.feeds, max_batch)]

    def encode(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """Stage 1: raw inputs -> the graph's feeds, as the manifest's preprocessing declares."""
        return self._encode(items)

    def infer(self, feeds: Mapping[str, np.ndarray], runner: Runner | None = None) -> dict[str, np.ndarray]:
        """Stage 2: run the graph (on ``runner``, e.g. a replica, or the selected one)."""
        return (runner or self.selection.runner).infer(feeds)

    def scores(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Stage 3a: the per-input scores the postprocessing declares ([batch, classes] or [batch])."""
        post = self.manifest.postprocess
        if post.kind == "embedding":
            raise PipelineError(f"package {self.manifest.name} is an embedding model; it has no class scores",
                                hint="use runtime.knowledge.Embedder (or a knowledge-base search) for it")
        if post.kind == "anomaly":
            return anomaly_scores(outputs[post.output])
        return class_scores(outputs[post.output], post)

    def maps(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Stage 3a': the [batch, h, w] anomaly maps, when the package declares them; else None."""
        name = self.manifest.postprocess.map_output
        return None if name is None else np.asarray(outputs[name])

    def wrap(self, scores: np.ndarray, timings: Sequence[Timings], maps: np.ndarray | None = None) -> list[Prediction]:
        """Stage 3b: per-input scores (and anomaly maps) -> :class:`Prediction` objects with provenance."""
        post, name, precision = self.manifest.postprocess, self.manifest.name, self.selection.precision_label
        if post.kind == "anomaly":
            return anomaly_predictions(scores, post, backend=self.backend, model=name, precision=precision,
                                       timings=timings, maps=maps)
        return to_predictions(scores, post, backend=self.backend, model=name, precision=precision, timings=timings)

    def _windowed(self) -> TextFeeds | None:
        """The text preprocessing when this pipeline classifies texts by windows, else None."""
        if isinstance(self._encode, TextFeeds) and self.manifest.postprocess.kind != "embedding":
            return self._encode
        return None

    def _run(self, items: Sequence[Any]) -> list[Prediction]:
        """One batch of images (or an embedding model's texts): encode, infer, score."""
        t0 = time.perf_counter()
        feeds = self.encode(items)
        t1 = time.perf_counter()
        outputs = self.infer(feeds)
        t2 = time.perf_counter()
        probs = self.scores(outputs)
        t3 = time.perf_counter()
        timing = Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return self.wrap(probs, [timing] * len(items), self.maps(outputs))

    def _run_prefetched(self, chunks: Sequence[Sequence[Any]], workers: int) -> list[Prediction]:
        """Image batches with the next batch decoded on ``workers`` threads while the model runs this one."""
        pre = self.manifest.preprocess
        assert isinstance(pre, ImagePreprocess)
        h, w = pre.output_hw
        row = (pre.channels, h, w) if pre.layout == "nchw" else (h, w, pre.channels)
        name = self.manifest.inputs[0].name

        def submit(pool: ThreadPoolExecutor, chunk: Sequence[Any]) -> tuple[np.ndarray, list[Future[Any]], float]:
            batch = np.empty((len(chunk), *row), np.dtype(pre.dtype))
            return batch, [pool.submit(preprocess_image, item, pre, batch[i]) for i, item in enumerate(chunk)], \
                time.perf_counter()

        out: list[Prediction] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="edge-sdk-decode") as pool:
            pending = submit(pool, chunks[0])
            for index, chunk in enumerate(chunks):
                batch, futures, started = pending
                for future in futures:
                    future.result()  # a bad image raises here, as it would unprefetched
                t1 = time.perf_counter()
                if index + 1 < len(chunks):
                    pending = submit(pool, chunks[index + 1])
                outputs = self.infer({name: batch})
                t2 = time.perf_counter()
                probs = self.scores(outputs)
                t3 = time.perf_counter()
                timing = Timings((t1 - started) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
                out.extend(self.wrap(probs, [timing] * len(chunk), self.maps(outputs)))
        return out

    def _run_windows(self, texts: Sequence[Any], text: TextFeeds, max_batch: int) -> list[Prediction]:
        """Text classification: windows padded to length buckets, each bucket run ``max_batch`` windows at a
        time, windows aggregated per text."""
        t0 = time.perf_counter()
        batch = text.windows(texts)
        t1 = time.perf_counter()
        outputs = [[self.infer(feeds) for feeds in _row_chunks(group.feeds, max_batch)] for group in batch.groups]
        t2 = time.perf_counter()
        window_scores = batch.place([np.concatenate([self.scores(o) for o in runs]) for runs in outputs])
        probs = aggregate_windows(window_scores, batch.owner, batch.n_texts, text.encoder.spec.aggregate)
        t3 = time.perf_counter()
        timing = Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return [_with_windows(p, batch, i) for i, p in enumerate(self.wrap(probs, [timing] * len(texts)))]

    def close(self) -> None:
        self.selection.runner.deactivate()


def _row_chunks(feeds: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` split along the batch axis into runs of at most ``size`` rows (views, no copies)."""
    rows = len(next(iter(feeds.values())))
    return [{k: v[s : s + size] for k, v in feeds.items()} for s in range(0, rows, size)]


def _with_windows(prediction: Prediction, batch: TextBatch, index: int) -> Prediction:
    """Record in ``extra`` how many windows a text was read in (and how many it had, when capped)."""
    kept, total = batch.windows_per_text[index], batch.total_windows[index]
    if kept == 1 and total == 1:
        return prediction
    extra = {**prediction.extra, "windows": kept, **({"windows_total": total} if total > kept else {})}
    return replace(prediction, extra=MappingProxyType(extra))

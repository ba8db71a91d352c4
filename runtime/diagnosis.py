"""One diagnosis per asset from everything known about it: reports, alarm texts and camera frames.

A :class:`Diagnoser` holds the models (by name), the fusion rule and, optionally, a knowledge
base of past incidents. Each input names its asset; its prediction becomes
:class:`~runtime.fusion.Evidence`, the asset's evidence is fused, and the texts seen for the
asset are searched in the knowledge base for similar incidents. For streams,
:meth:`Diagnoser.sink` turns every frame prediction into evidence for the asset its camera watches.

The SDK gives it pipelines (named by their packages); the daemon gives it its model registry
(named as configured, hot-swapped under it) through the :class:`Models` protocol. Either way a
model's entry in the fusion rule is found by :meth:`Diagnoser.rule_key`, the same at start, on a
hot swap and for every piece of evidence: the package's name when the rule has it, else the name
the model is served under. Embedding models (knowledge bases) are served but never fused.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from runtime.assets import check_asset_id
from edge_sdk.errors import PipelineError
from runtime.closing import Closing
from runtime.frame import Frame
from runtime.fusion import Diagnosis, Evidence, Fuser, FusionRule
from runtime.manifest import ImagePreprocess, Manifest
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction

__all__ = ["Diagnoser", "Models", "pick_model"]


class Models(Protocol):
    """What a diagnoser needs of the models it fuses: their names, manifests, and predictions."""

    @property
    def names(self) -> Sequence[str]: ...
    def manifest(self, name: str) -> Manifest: ...
    def predict(self, name: str, items: list[Any]) -> list[Prediction]: ...


class _Pipelines:
    """Loaded pipelines as :class:`Models`, named by their packages."""

    def __init__(self, pipelines: Sequence[Pipeline]) -> None:
        self.pipelines: dict[str, Pipeline] = {}
        for pipeline in pipelines:
            name = pipeline.manifest.name
            if name in self.pipelines:
                raise PipelineError(f"two models are named {name!r}", hint="give each package its own name")
            self.pipelines[name] = pipeline

    @property
    def names(self) -> Sequence[str]:
        return tuple(self.pipelines)

    def manifest(self, name: str) -> Manifest:
        if name not in self.pipelines:
            raise PipelineError(f"model {name!r} is not loaded; loaded: {sorted(self.pipelines)}")
        return self.pipelines[name].manifest

    def predict(self, name: str, items: list[Any]) -> list[Prediction]:
        self.manifest(name)
        return self.pipelines[name].predict_batch(items)

    def __getitem__(self, name: str) -> Pipeline:
        """The pipeline of model ``name`` (e.g. to stream through it)."""
        self.manifest(name)
        return self.pipelines[name]

    def close(self) -> None:
        for pipeline in self.pipelines.values():
            pipeline.close()


def _is_embedding(manifest: Manifest) -> bool:
    return manifest.postprocess.kind == "embedding"


def pick_model(models: Models, kind: str, model: str | None) -> str:
    """The model named ``model``, else the only ``kind`` ("text" or "image") model that is not an embedding."""
    if model is not None:
        models.manifest(model)  # raises for a model that is not served
        return model
    names = [n for n in models.names if not _is_embedding(models.manifest(n))
             and isinstance(models.manifest(n).preprocess, ImagePreprocess) == (kind == "image")]
    if len(names) != 1:
        raise PipelineError(f"{len(names)} {kind} models are served ({names}); expected exactly one",
                            hint="name the model with model=... (the daemon: ?model=NAME)")
    return names[0]


class Diagnoser(Closing):
    """Models + a fusion rule (+ a knowledge base) -> a :class:`Diagnosis` per asset."""

    def __init__(self, rule: FusionRule, models: Models | Sequence[Pipeline], *, knowledge: Any = None,
                 similar_k: int = 3, max_assets: int = 10_000) -> None:
        self.rule = rule
        self.models: Models = _Pipelines(models) if isinstance(models, (list, tuple)) else models  # type: ignore[assignment]
        if not self.models.names:
            raise PipelineError("a diagnoser needs at least one model")
        for name in self.models.names:
            self.check(name)
        self.knowledge, self.similar_k = knowledge, similar_k
        self.fuser = Fuser(rule, max_assets=max_assets)

    @classmethod
    def from_packages(cls, rule: FusionRule | Mapping[str, Any], packages: Sequence[str | os.PathLike[str]], *,
                      knowledge: str | os.PathLike[str] | None = None, backend: str | Sequence[str] = "auto",
                      threads: int | None = None, similar_k: int = 3) -> Diagnoser:
        """Load and verify every package (and the knowledge base) and check them against the rule."""
        from runtime.knowledge import KnowledgeBase

        fusion = rule if isinstance(rule, FusionRule) else FusionRule.from_dict(rule)
        loaded: list[Pipeline] = []
        try:
            for path in packages:
                loaded.append(Pipeline.from_package(path, backend, threads=threads))
            kb = KnowledgeBase.from_package(knowledge, backend, threads=threads) if knowledge else None
            return cls(fusion, loaded, knowledge=kb, similar_k=similar_k)
        except Exception:
            for pipeline in loaded:
                pipeline.close()
            raise

    def rule_key(self, name: str, manifest: Manifest | None = None) -> str:
        """The fusion rule's entry for the model served as ``name``: its package's name when the rule
        has that entry, else ``name``."""
        package = (manifest or self.models.manifest(name)).name
        return package if package in self.rule.models else name

    def check(self, name: str, manifest: Manifest | None = None) -> None:
        """Refuse now, not at the first prediction, a model the rule has no entry or label map for
        (``manifest``: a package about to be swapped in under ``name``)."""
        manifest = manifest or self.models.manifest(name)
        if _is_embedding(manifest):
            return
        key = self.rule_key(name, manifest)
        if key not in self.rule.models:
            hint = f"add [fusion.models.{name}] with its label map"
            if manifest.name != name:
                hint += f" (or [fusion.models.{manifest.name}], the package's own name)"
            raise PipelineError(f"model {name!r} (package {manifest.name!r}) has no entry in the fusion rule", hint=hint)
        self.rule.check_labels(key, manifest.postprocess.labels)

    def observe(self, asset_id: str, kind: str, item: Any, *, model: str | None = None, source: str | None = None,
                timestamp: float | None = None) -> tuple[Prediction, Diagnosis]:
        """Predict ``item`` (a text or an image) with the ``kind`` model and fuse it as evidence about ``asset_id``."""
        name = pick_model(self.models, kind, model)
        prediction = self.models.predict(name, [item])[0]
        if kind == "text":
            similar = self.knowledge.search(item, k=self.similar_k) if self.knowledge is not None else None
            return prediction, self.add(asset_id, prediction, kind="text", source=source or "report", model=name,
                                        timestamp=timestamp, ref=item[:200], similar=similar)
        return prediction, self.add(asset_id, prediction, kind=kind, source=source or "camera", model=name,
                                    timestamp=timestamp)

    def text(self, asset_id: str, text: str, *, model: str | None = None, source: str = "report",
             timestamp: float | None = None) -> Diagnosis:
        """Classify a report or alarm text about ``asset_id`` and return the asset's fused diagnosis."""
        return self.observe(asset_id, "text", text, model=model, source=source, timestamp=timestamp)[1]

    def image(self, asset_id: str, image: Any, *, model: str | None = None, source: str = "camera",
              timestamp: float | None = None) -> Diagnosis:
        """Classify (or score) an image of ``asset_id`` and return the asset's fused diagnosis."""
        return self.observe(asset_id, "image", image, model=model, source=source, timestamp=timestamp)[1]

    def add(self, asset_id: str, prediction: Prediction, *, kind: str, source: str, timestamp: float | None = None,
            ref: str | int | None = None, similar: Sequence[Any] | None = None, model: str | None = None) -> Diagnosis:
        """Add one prediction made elsewhere (e.g. by a stream) as evidence about ``asset_id``; ``model`` is
        the name the model that made it is served under (default: its package's name)."""
        check_asset_id(asset_id)
        key = self.rule_key(model) if model is not None else prediction.model
        evidence = Evidence(asset_id=asset_id, prediction=prediction, kind=kind, source=source, ref=ref, model=key,
                            timestamp=time.time() if timestamp is None else timestamp)
        return self.fuser.add(evidence, similar=similar)

    def diagnosis(self, asset_id: str) -> Diagnosis | None:
        return self.fuser.diagnosis(asset_id)

    def sink(self, assets: Mapping[str, str] | Callable[[Frame], str],
             on_diagnosis: Callable[[Diagnosis], None] | None = None,
             model: str | None = None) -> Callable[[Prediction, Frame], None]:
        """A stream sink: each frame prediction becomes image evidence for the asset its source watches.

        ``assets`` maps source id (or ``source_id/roi`` for a region) to asset id, or is a function
        of the frame. ``on_diagnosis`` receives the updated diagnosis. ``model``: the name the stream's
        model is served under.
        """
        def asset_of(prediction: Prediction, frame: Frame) -> str:
            if callable(assets):
                return assets(frame)
            roi = prediction.extra.get("roi")
            key = f"{frame.source_id}/{roi}" if roi else frame.source_id
            if key in assets:
                return assets[key]
            if frame.source_id in assets:
                return assets[frame.source_id]
            raise PipelineError(f"no asset is declared for source {key!r}", hint="add it to the source -> asset map")

        def diagnose(prediction: Prediction, frame: Frame) -> None:
            diagnosis = self.add(asset_of(prediction, frame), prediction, kind="image", source=frame.source_id,
                                 timestamp=frame.timestamp, ref=frame.index, model=model)
            if on_diagnosis is not None:
                on_diagnosis(diagnosis)

        return diagnose

    def close(self) -> None:
        """Close the pipelines this diagnoser loaded (not a registry it was given) and the knowledge base."""
        if isinstance(self.models, _Pipelines):
            self.models.close()
        if self.knowledge is not None:
            self.knowledge.close()

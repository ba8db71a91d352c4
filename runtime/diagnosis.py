"""One diagnosis per asset from everything known about it: reports, alarm texts and camera frames.

A :class:`Diagnoser` holds the loaded models (by package name), the fusion rule and,
optionally, a knowledge base of past incidents. Each input names its asset; its
prediction becomes :class:`~runtime.fusion.Evidence`, the asset's evidence is fused, and
the texts seen for the asset are searched in the knowledge base for similar incidents.
For streams, :meth:`Diagnoser.sink` turns every frame prediction into evidence for the
asset its camera watches.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

from edge_sdk.errors import PipelineError
from runtime.frame import Frame
from runtime.fusion import Diagnosis, Evidence, Fuser, FusionRule
from runtime.manifest import ImagePreprocess
from runtime.pipeline import Pipeline
from runtime.prediction import Prediction

class Diagnoser:
    """Models + a fusion rule (+ a knowledge base) -> a :class:`Diagnosis` per asset."""

    def __init__(self, rule: FusionRule, models: Sequence[Pipeline], *, knowledge: Any = None, similar_k: int = 3,
                 max_assets: int = 10_000) -> None:
        self.rule = rule
        self.models: dict[str, Pipeline] = {}
        for pipeline in models:
            name = pipeline.manifest.name
            if name in self.models:
                raise PipelineError(f"two models are named {name!r}", hint="give each package its own name")
            if name not in rule.models:
                raise PipelineError(f"model {name!r} has no entry in the fusion rule",
                                    hint=f"add [fusion.models.{name}] with its label map")
            rule.check_labels(name, pipeline.manifest.postprocess.labels)
            self.models[name] = pipeline
        if not self.models:
            raise PipelineError("a diagnoser needs at least one model")
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

    def _model(self, kind: str, model: str | None) -> Pipeline:
        candidates = [p for p in self.models.values()
                      if (isinstance(p.manifest.preprocess, ImagePreprocess)) == (kind == "image")]
        if model is not None:
            if model not in self.models:
                raise PipelineError(f"model {model!r} is not loaded; loaded: {sorted(self.models)}")
            return self.models[model]
        if len(candidates) != 1:
            raise PipelineError(f"{len(candidates)} {kind} models are loaded ({[p.manifest.name for p in candidates]}); "
                                "expected exactly one", hint="name the model with model=...")
        return candidates[0]

    def text(self, asset_id: str, text: str, *, model: str | None = None, source: str = "report",
             timestamp: float | None = None) -> Diagnosis:
        """Classify a report or alarm text about ``asset_id`` and return the asset's fused diagnosis."""
        prediction = self._model("text", model).predict(text)
        similar = self.knowledge.search(text, k=self.similar_k) if self.knowledge is not None else None
        return self.add(asset_id, prediction, kind="text", source=source, timestamp=timestamp, ref=text[:200],
                        similar=similar)

    def image(self, asset_id: str, image: Any, *, model: str | None = None, source: str = "camera",
              timestamp: float | None = None) -> Diagnosis:
        """Classify (or score) an image of ``asset_id`` and return the asset's fused diagnosis."""
        prediction = self._model("image", model).predict(image)
        return self.add(asset_id, prediction, kind="image", source=source, timestamp=timestamp)

    def add(self, asset_id: str, prediction: Prediction, *, kind: str, source: str, timestamp: float | None = None,
            ref: str | int | None = None, similar: Sequence[Any] | None = None) -> Diagnosis:
        """Add one prediction made elsewhere (e.g. by a stream) as evidence about ``asset_id``."""
        evidence = Evidence(asset_id=asset_id, prediction=prediction, kind=kind, source=source, ref=ref,
                            timestamp=time.time() if timestamp is None else timestamp)
        return self.fuser.add(evidence, similar=similar)

    def diagnosis(self, asset_id: str) -> Diagnosis | None:
        return self.fuser.diagnosis(asset_id)

    def sink(self, assets: Mapping[str, str] | Callable[[Frame], str],
             on_diagnosis: Callable[[Diagnosis], None] | None = None) -> Callable[[Prediction, Frame], None]:
        """A stream sink: each frame prediction becomes image evidence for the asset its source watches.

        ``assets`` maps source id (or ``source_id/roi`` for a region) to asset id, or is a function
        of the frame. ``on_diagnosis`` receives the updated diagnosis.
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
                                 timestamp=frame.timestamp, ref=frame.index)
            if on_diagnosis is not None:
                on_diagnosis(diagnosis)

        return diagnose

    def close(self) -> None:
        for pipeline in self.models.values():
            pipeline.close()
        if self.knowledge is not None:
            self.knowledge.close()

    def __enter__(self) -> Diagnoser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

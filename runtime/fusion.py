"""Fusion: text and image evidence about one asset combined into one :class:`Diagnosis`.

Each model speaks its own labels ("scratch", "bearing", "ok"); a :class:`FusionRule`, declared
in configuration (the daemon's ``[fusion]`` TOML table, read by :meth:`FusionRule.from_dict`),
maps them onto one shared fault vocabulary and says how much each model counts. The rule,
exactly:

1. Freshness: evidence older than ``max_age_s`` relative to ``now`` (by default the newest
   evidence's timestamp) is ignored.
2. Projection: each prediction's ``scores`` are mapped label -> fault by its model's ``map``
   (``"*"`` catches every label not named); labels mapped to the same fault add up, and the result
   is normalised to sum to 1, so a model without softmax counts with its weight and no more. A
   label with no mapping is an error, never dropped. Anomaly predictions carry a 0/1 decision in
   ``scores``, so they vote for one fault with their full weight.
3. Weighted late fusion: ``P(f) = sum_e w_e * p_e(f) / sum_e w_e``, ``w_e`` the weight of
   evidence e's model. ``P`` sums to 1 over the vocabulary.
4. Decision: a fault is eligible only if ``P(f) >= threshold(f)`` (its ``thresholds`` entry, else
   ``default_threshold``); the normal class is always eligible. The diagnosis is the most probable
   eligible class (ties: vocabulary order). A fault below its threshold therefore gives way to the
   next most probable passing fault, or to normal when normal is more probable than every passing
   fault: a threshold can demote a fault, never promote it over a more probable class.
5. Explanation: evidence whose own top fault (the argmax of step 2) is the diagnosis supports
   it, the rest conflicts; both are ordered strongest first (weight x own probability).
6. Abstention: a model may only speak about some faults (a surface camera says nothing about a
   bearing). When its predicted label is in its ``abstain`` list (``abstain = ["ok"]``), its
   evidence is kept (in ``Diagnosis.abstained``) but has no weight in step 3, unless every
   piece of evidence abstains: then they vote with their weights as usual.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from edge_sdk.errors import PipelineError
from runtime.prediction import Prediction

__all__ = ["CATCH_ALL", "Contribution", "Diagnosis", "Evidence", "Fuser", "FusionRule", "ModelRule", "fuse"]

log = logging.getLogger(__name__)

CATCH_ALL = "*"  # a map entry that maps every label the map does not name
_TOLERANCE = 1e-9  # float noise allowed when a fused probability meets its threshold exactly
_RULE_KEYS = ("faults", "normal", "default_threshold", "thresholds", "max_age_s", "models")
_MODEL_KEYS = ("weight", "map", "abstain")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ModelRule:
    """One model's label -> fault map and its weight in the fused average."""

    map: Mapping[str, str]
    weight: float = 1.0
    abstain: frozenset[str] = frozenset()  # labels on which the model does not vote

    def fault_of(self, label: str) -> str | None:
        return self.map.get(label, self.map.get(CATCH_ALL))


@dataclass(frozen=True)
class FusionRule:
    """The shared fault vocabulary, per-model maps and weights, per-fault thresholds, max age."""

    faults: tuple[str, ...]
    models: Mapping[str, ModelRule]
    normal: str = "none"
    default_threshold: float = 0.5
    thresholds: Mapping[str, float] = field(default_factory=dict)
    max_age_s: float = 60.0
    key: str = "fusion"  # where the rule sits in the configuration; error messages name it

    def __post_init__(self) -> None:
        if self.normal not in self.faults:
            raise PipelineError(f"{self.key}.normal is {self.normal!r}; expected one of {list(self.faults)}",
                                hint=f"add {self.normal!r} to {self.key}.faults or set {self.key}.normal")
        for fault in self.thresholds:
            if fault not in self.faults or fault == self.normal:
                raise PipelineError(f"{_path(self.key, 'thresholds', fault)}: {fault!r} is not a fault; "
                                    f"expected one of {[f for f in self.faults if f != self.normal]}",
                                    hint="the normal class needs no threshold; fix the name or add it to faults")
        for model, rule in self.models.items():
            for label, fault in rule.map.items():
                if fault not in self.faults:
                    raise PipelineError(f"{_path(self.key, 'models', model, 'map', label)} is {fault!r}; "
                                        f"expected one of the faults {list(self.faults)}",
                                        hint=f"fix the name or add {fault!r} to {self.key}.faults")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, key: str = "fusion") -> FusionRule:
        """Read and validate a rule from plain data (a parsed TOML table found at ``key``)."""
        _known_keys(config, _RULE_KEYS, key)
        faults = _faults(config.get("faults"), f"{key}.faults")
        options: dict[str, Any] = {}
        if "normal" in config:
            options["normal"] = _text(config["normal"], f"{key}.normal")
        if "default_threshold" in config:
            options["default_threshold"] = _probability(config["default_threshold"], f"{key}.default_threshold")
        if "thresholds" in config:
            table = _table(config["thresholds"], f"{key}.thresholds")
            options["thresholds"] = MappingProxyType(
                {str(f): _probability(v, _path(key, "thresholds", f)) for f, v in table.items()})
        if "max_age_s" in config:
            options["max_age_s"] = _number(config["max_age_s"], f"{key}.max_age_s", "a number of seconds > 0",
                                           lambda v: v > 0)
        models = _table(config.get("models"), f"{key}.models")
        if not models:
            raise PipelineError(f"{key}.models is empty; expected one table per model",
                                hint=f"add [{key}.models.<model>] with weight and map")
        parsed = {str(name): _model(spec, _path(key, "models", name)) for name, spec in models.items()}
        return cls(faults=faults, models=MappingProxyType(parsed), key=key, **options)

    def threshold(self, fault: str) -> float:
        return self.thresholds.get(fault, self.default_threshold)

    def check_labels(self, model: str, labels: Iterable[str]) -> None:
        """Raise now, not at the first prediction, if ``model`` has labels the rule cannot map."""
        rule = self._model_rule(model)
        for label in labels:
            self._fault(model, rule, label)

    def project(self, prediction: Prediction, model: str | None = None) -> dict[str, float]:
        """The prediction's scores as a distribution over the fault vocabulary (rule step 2), by the rule
        of ``model`` (default: the package name the prediction carries)."""
        model = model or prediction.model
        rule = self._model_rule(model)
        out = dict.fromkeys(self.faults, 0.0)
        for label, score in prediction.scores.items():
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score < 0:
                raise PipelineError(f"model {model!r} gave label {label!r} the score {score!r}; "
                                    "expected a finite probability >= 0",
                                    hint="fuse class or anomaly predictions, not raw logits or embeddings")
            out[self._fault(model, rule, label)] += float(score)
        total = sum(out.values())
        if total <= 0:
            raise PipelineError(f"model {model!r} gave scores {dict(prediction.scores)}; "
                                "expected some probability mass", hint="check the model's postprocess")
        return {fault: p / total for fault, p in out.items()}

    def _model_rule(self, model: str) -> ModelRule:
        if model not in self.models:
            raise PipelineError(f"evidence from model {model!r} has no fusion rule; expected one of {list(self.models)}",
                                hint=f"add [{_path(self.key, 'models', model)}] with weight and map")
        return self.models[model]

    def _fault(self, model: str, rule: ModelRule, label: str) -> str:
        fault = rule.fault_of(label)
        if fault is None:
            where = _path(self.key, "models", model, "map")
            raise PipelineError(f"model {model!r} produced label {label!r}, which {where} does not map; "
                                f"expected one of {sorted(rule.map)}",
                                hint=f"add {_key(label)} = \"<fault>\" (one of {list(self.faults)}) or "
                                     f"\"*\" = \"<fault>\" to [{where}]")
        return fault


@dataclass(frozen=True)
class Evidence:
    """One prediction about one asset: what said it (kind, source), when, and what it looked at."""

    asset_id: str
    prediction: Prediction
    timestamp: float  # seconds, on the same clock for every piece of evidence (e.g. time.time())
    kind: str  # "text", "image", or another modality
    source: str = ""  # a camera id, "report", an alarm channel; one slot per (model, source) in a Fuser
    ref: str | int | None = None  # a frame index, a text snippet
    model: str = ""  # the fusion rule's name for the model that made it; "" = prediction.model (the package's)

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", self.prediction.model)
        if not isinstance(self.asset_id, str) or not self.asset_id:
            raise PipelineError(f"evidence asset_id is {self.asset_id!r}; expected a non-empty string",
                                hint="tag every input with the id of the asset it is about")
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, (int, float)) \
                or not math.isfinite(self.timestamp):
            raise PipelineError(f"evidence timestamp is {self.timestamp!r}; expected finite seconds",
                                hint="use the frame's or the report's time.time()")


@dataclass(frozen=True)
class Contribution:
    """How one piece of evidence entered a diagnosis: its weight and its own mapped vote."""

    evidence: Evidence
    weight: float  # 0 when the model abstained
    fault: str  # this evidence's own most probable fault
    probabilities: Mapping[str, float]  # its scores mapped onto the fault vocabulary
    abstained: bool = False  # its label is one the model's rule says it abstains on

    @property
    def strength(self) -> float:
        return self.weight * self.probabilities[self.fault]

    def to_dict(self) -> dict[str, Any]:
        prediction = self.evidence.prediction
        return {"model": self.evidence.model, "label": prediction.label, "score": prediction.score,
                "kind": self.evidence.kind, "source": self.evidence.source, "weight": self.weight,
                "fault": self.fault, "probability": self.probabilities[self.fault],
                "timestamp": self.evidence.timestamp, "ref": self.evidence.ref, "abstained": self.abstained}


@dataclass(frozen=True)
class Diagnosis:
    """The fused verdict on one asset, with the evidence for and against it."""

    asset_id: str
    fault: str
    confidence: float  # fused probability of ``fault``
    probabilities: Mapping[str, float]  # fault -> fused probability; sums to 1
    is_fault: bool  # fault is not the normal class (and so reached its threshold)
    evidence: tuple[Contribution, ...]  # supports ``fault``, strongest first
    conflicting: tuple[Contribution, ...]  # pointed at another fault, strongest first
    similar: tuple[Any, ...]  # similar past incidents, as given
    timestamp: float  # of the newest evidence used
    abstained: tuple[Contribution, ...] = ()  # evidence from models that abstained (no vote)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (similar incidents via their ``to_dict`` or as dataclasses)."""
        return {"asset_id": self.asset_id, "fault": self.fault, "confidence": self.confidence,
                "probabilities": dict(self.probabilities), "is_fault": self.is_fault,
                "evidence": [c.to_dict() for c in self.evidence],
                "conflicting": [c.to_dict() for c in self.conflicting],
                "abstained": [c.to_dict() for c in self.abstained],
                "similar": [_plain(item) for item in self.similar], "timestamp": self.timestamp}


def fuse(evidence: Sequence[Evidence], rule: FusionRule, *, similar: Sequence[Any] = (),
         now: float | None = None) -> Diagnosis:
    """Combine evidence about one asset into a :class:`Diagnosis` by ``rule`` (module docstring)."""
    if not evidence:
        raise PipelineError("no evidence to fuse; expected at least one Evidence",
                            hint="fuse only once a model has said something about the asset")
    assets = sorted({e.asset_id for e in evidence})
    if len(assets) > 1:
        raise PipelineError(f"evidence is about assets {assets}; expected one asset per diagnosis",
                            hint="fuse each asset's evidence separately (Fuser does)")
    fresh = _fresh(evidence, rule.max_age_s, now)
    if not fresh:
        raise PipelineError(f"all {len(evidence)} pieces of evidence for asset {assets[0]!r} are older than "
                            f"{rule.key}.max_age_s={rule.max_age_s} at now={now}; expected at least one fresh",
                            hint=f"pass newer evidence or raise {rule.key}.max_age_s")
    contributions = [_contribution(e, rule) for e in fresh]
    voting = [c for c in contributions if not c.abstained]
    if not voting:  # every model abstained: they still say what they saw, with their own weights
        voting = [replace(c, weight=rule.models[c.evidence.model].weight, abstained=False)
                  for c in contributions]
        contributions = voting
    total = sum(c.weight for c in voting)
    probabilities = {f: sum(c.weight * c.probabilities[f] for c in voting) / total for f in rule.faults}
    fault = _decide(probabilities, rule)
    ranked = sorted(voting, key=lambda c: (-c.strength, -c.evidence.timestamp))
    return Diagnosis(
        asset_id=assets[0], fault=fault, confidence=probabilities[fault],
        probabilities=MappingProxyType(probabilities), is_fault=fault != rule.normal,
        evidence=tuple(c for c in ranked if c.fault == fault),
        conflicting=tuple(c for c in ranked if c.fault != fault),
        similar=tuple(similar), timestamp=max(e.timestamp for e in fresh),
        abstained=tuple(c for c in contributions if c.abstained))


@dataclass
class _Asset:
    latest: dict[tuple[str, str], Evidence]  # (model, source) -> the newest evidence
    similar: tuple[Any, ...] = ()


class Fuser:
    """Keeps the latest evidence per (asset, model, source) and fuses it on every update.

    Thread-safe. Holds at most ``max_assets`` assets; the least recently updated is forgotten first.
    """

    def __init__(self, rule: FusionRule, *, max_assets: int = 10_000) -> None:
        if isinstance(max_assets, bool) or not isinstance(max_assets, int) or max_assets < 1:
            raise PipelineError(f"max_assets is {max_assets!r}; expected an integer >= 1",
                                hint="for example max_assets=10_000")
        self.rule = rule
        self.max_assets = max_assets
        self._lock = threading.Lock()
        self._assets: OrderedDict[str, _Asset] = OrderedDict()

    def add(self, evidence: Evidence, *, similar: Sequence[Any] | None = None) -> Diagnosis:
        """Record ``evidence`` and return its asset's fused diagnosis.

        ``similar`` replaces the asset's similar incidents; None keeps those given before (an image
        frame does not erase what a report's knowledge-base lookup found). Evidence older than what
        is held for its (model, source) does not replace it.
        """
        self.rule.project(evidence.prediction, evidence.model)  # refuse an unmappable prediction before storing it
        with self._lock:
            asset = self._assets.pop(evidence.asset_id, None) or _Asset(latest={})
            self._assets[evidence.asset_id] = asset  # most recently updated last
            slot = (evidence.model, evidence.source)
            held = asset.latest.get(slot)
            if held is None or evidence.timestamp >= held.timestamp:
                asset.latest[slot] = evidence
            else:
                log.debug("evidence for %s %s at %s is older than the one held; kept the newer",
                          evidence.asset_id, slot, evidence.timestamp)
            if similar is not None:
                asset.similar = tuple(similar)
            kept = _fresh(list(asset.latest.values()), self.rule.max_age_s, None)
            asset.latest = {(e.model, e.source): e for e in kept}
            self._evict()
            return fuse(kept, self.rule, similar=asset.similar)

    def diagnosis(self, asset_id: str, *, now: float | None = None) -> Diagnosis | None:
        """The asset's current diagnosis; None if it is unknown or all its evidence is stale at ``now``."""
        with self._lock:
            asset = self._assets.get(asset_id)
            if asset is None:
                return None
            fresh = _fresh(list(asset.latest.values()), self.rule.max_age_s, now)
            return fuse(fresh, self.rule, similar=asset.similar, now=now) if fresh else None

    def assets(self) -> tuple[str, ...]:
        """Asset ids held, least recently updated first."""
        with self._lock:
            return tuple(self._assets)

    def forget(self, asset_id: str) -> bool:
        """Drop an asset's evidence; False if it was not held."""
        with self._lock:
            return self._assets.pop(asset_id, None) is not None

    def _evict(self) -> None:
        while len(self._assets) > self.max_assets:
            asset_id, _ = self._assets.popitem(last=False)
            log.debug("fuser holds more than %d assets; forgot %s", self.max_assets, asset_id)


def _fresh(evidence: Sequence[Evidence], max_age_s: float, now: float | None) -> list[Evidence]:
    reference = max(e.timestamp for e in evidence) if now is None else now
    return [e for e in evidence if reference - e.timestamp <= max_age_s]


def _contribution(evidence: Evidence, rule: FusionRule) -> Contribution:
    probabilities = rule.project(evidence.prediction, evidence.model)
    top = max(rule.faults, key=lambda f: (probabilities[f], -rule.faults.index(f)))
    model = rule.models[evidence.model]
    abstains = evidence.prediction.label in model.abstain
    return Contribution(evidence=evidence, weight=0.0 if abstains else model.weight, fault=top,
                        probabilities=MappingProxyType(probabilities), abstained=abstains)


def _decide(probabilities: Mapping[str, float], rule: FusionRule) -> str:
    eligible = [f for f in rule.faults
                if f == rule.normal or probabilities[f] + _TOLERANCE >= rule.threshold(f)]
    return max(eligible, key=lambda f: (probabilities[f], -rule.faults.index(f)))


def _plain(item: Any) -> Any:
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    return item if isinstance(item, (str, int, float, bool, type(None))) else repr(item)


# -- configuration parsing -------------------------------------------------------------------------

def _key(name: Any) -> str:
    text = str(name)
    return text if _BARE_KEY.match(text) else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path(*parts: Any) -> str:
    return ".".join([str(parts[0]), *(_key(p) for p in parts[1:])])


def _known_keys(table: Any, allowed: Sequence[str], path: str) -> None:
    unknown = sorted(set(_table(table, path)) - set(allowed))
    if unknown:
        raise PipelineError(f"{path} has unknown keys {unknown}; expected only {list(allowed)}",
                            hint="fix the spelling or remove the key")


def _table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PipelineError(f"{path} is {value!r}; expected a table", hint=f"declare [{path}] in the configuration")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{path} is {value!r}; expected a non-empty string", hint=f'for example {path} = "none"')
    return value


def _number(value: Any, path: str, expected: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise PipelineError(f"{path} is {value!r}; expected {expected}", hint=f"set {path} to {expected}")
    return float(value)


def _probability(value: Any, path: str) -> float:
    return _number(value, path, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def _faults(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise PipelineError(f"{path} is {value!r}; expected a list of at least two fault names, the normal one included",
                            hint=f'for example {path} = ["none", "leak"]')
    faults = tuple(_text(v, f"{path}[{i}]") for i, v in enumerate(value))
    duplicates = sorted({f for f in faults if faults.count(f) > 1})
    if duplicates:
        raise PipelineError(f"{path} repeats {duplicates}; expected unique fault names", hint="list each fault once")
    return faults


def _model(spec: Any, path: str) -> ModelRule:
    _known_keys(spec, _MODEL_KEYS, path)
    if "map" not in spec:
        raise PipelineError(f"{path} has no map; expected a table label -> fault",
                            hint=f'add {path}.map = {{<label> = "<fault>", "*" = "<fault>"}}')
    table = _table(spec["map"], f"{path}.map")
    if not table:
        raise PipelineError(f"{path}.map is empty; expected at least one label -> fault entry",
                            hint='map every label the model produces, or use "*" = "<fault>"')
    labels = {str(label): _text(fault, _path(path, "map", label)) for label, fault in table.items()}
    options: dict[str, Any] = {}
    if "weight" in spec:
        options["weight"] = _number(spec["weight"], f"{path}.weight", "a finite number > 0",
                                    lambda v: 0 < v < math.inf)
    if "abstain" in spec:
        abstain = spec["abstain"]
        if not isinstance(abstain, (list, tuple)) or not all(isinstance(a, str) and a for a in abstain):
            raise PipelineError(f"{path}.abstain is {abstain!r}; expected a list of the model's labels",
                                hint='e.g. abstain = ["ok"]: a surface camera that sees no defect says nothing '
                                     "about bearings")
        options["abstain"] = frozenset(abstain)
    return ModelRule(map=MappingProxyType(labels), **options)

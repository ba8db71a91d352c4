"""Fusion of text and image evidence: the rule, its configuration, and the stateful Fuser."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from edge_sdk.errors import PipelineError
from runtime.fusion import Diagnosis, Evidence, Fuser, FusionRule, fuse
from runtime.manifest import Postprocess
from runtime.prediction import Prediction, Timings, anomaly_predictions, to_predictions

TEXT_LABELS = ("bearing", "leak", "overheating", "normal")
IMAGE_LABELS = ("scratch", "ok")
_TIMING = Timings(0.0, 0.0, 0.0)

CONFIG: dict[str, Any] = {
    "faults": ["none", "bearing_wear", "leak", "overheating", "surface_defect"],
    "normal": "none",
    "default_threshold": 0.5,
    "thresholds": {"leak": 0.4},
    "max_age_s": 60,
    "models": {
        "reports": {"weight": 1.0, "map": {"bearing": "bearing_wear", "leak": "leak",
                                            "overheating": "overheating", "normal": "none"}},
        "defects": {"weight": 2.0, "map": {"scratch": "surface_defect", "ok": "none"}},
        "anomaly": {"weight": 1.0, "map": {"good": "none", "anomalous": "surface_defect"}},
    },
}


def rule(**changes: Any) -> FusionRule:
    config = copy.deepcopy(CONFIG)
    config.update(changes)
    return FusionRule.from_dict(config)


def weighted(reports: float, defects: float, **changes: Any) -> FusionRule:
    config = copy.deepcopy(CONFIG)
    config.update(changes)
    config["models"]["reports"]["weight"] = reports
    config["models"]["defects"]["weight"] = defects
    return FusionRule.from_dict(config)


def classes(model: str, labels: tuple[str, ...], probs: list[float]) -> Prediction:
    spec = Postprocess(output="logits", labels=labels)
    return to_predictions(np.array([probs]), spec, backend="onnxruntime-cpu", model=model, timings=[_TIMING])[0]


def text(leak: float = 0.7, *, asset: str = "pump-7", t: float = 100.0, **probs: float) -> Evidence:
    rest = (1.0 - leak) / 3
    p = {"bearing": rest, "leak": leak, "overheating": rest, "normal": rest, **probs}
    prediction = classes("reports", TEXT_LABELS, [p[label] for label in TEXT_LABELS])
    return Evidence(asset, prediction, t, kind="text", source="report", ref="oil dripping under the pump")


def image(scratch: float = 0.9, *, asset: str = "pump-7", t: float = 100.0, source: str = "cam1",
          ref: int = 0) -> Evidence:
    prediction = classes("defects", IMAGE_LABELS, [scratch, 1.0 - scratch])
    return Evidence(asset, prediction, t, kind="image", source=source, ref=ref)


def anomaly(score: float, *, t: float = 100.0) -> Evidence:
    spec = Postprocess(output="score", labels=("good", "anomalous"), kind="anomaly", threshold=0.5)
    prediction = anomaly_predictions(np.array([score]), spec, backend="onnxruntime-cpu", model="anomaly",
                                     timings=[_TIMING])[0]
    return Evidence("pump-7", prediction, t, kind="image", source="cam2", ref=3)


def models_of(contributions: tuple[Any, ...]) -> list[str]:
    return [c.evidence.prediction.model for c in contributions]


# -- the fusion rule ---------------------------------------------------------------------------------

def test_conflicting_evidence_goes_to_the_heavier_model() -> None:
    d = fuse([text(leak=0.7), image(scratch=0.9)], weighted(reports=1.0, defects=2.0))
    assert d.fault == "surface_defect" and d.is_fault
    assert d.confidence == pytest.approx((2 * 0.9) / 3)
    assert d.probabilities["leak"] == pytest.approx(0.7 / 3)
    assert d.probabilities["none"] == pytest.approx((0.1 + 2 * 0.1) / 3)
    assert models_of(d.evidence) == ["defects"] and models_of(d.conflicting) == ["reports"]
    assert d.conflicting[0].fault == "leak" and d.conflicting[0].weight == 1.0


def test_reversed_weights_flip_the_diagnosis_and_the_split() -> None:
    d = fuse([text(leak=0.7), image(scratch=0.9)], weighted(reports=2.0, defects=1.0))
    assert d.fault == "leak" and d.is_fault
    # 0.467 is below the default 0.5 but reaches leak's own threshold 0.4.
    assert d.confidence == pytest.approx(2 * 0.7 / 3)
    assert d.probabilities["surface_defect"] == pytest.approx(0.9 / 3)
    assert models_of(d.evidence) == ["reports"] and models_of(d.conflicting) == ["defects"]


def test_supporting_evidence_is_ordered_strongest_first() -> None:
    weak, strong = image(0.6, source="cam1"), image(0.95, source="cam2")
    d = fuse([weak, text(leak=0.7), strong], rule())
    assert d.fault == "surface_defect"
    assert [c.evidence.source for c in d.evidence] == ["cam2", "cam1"]


def test_a_fault_below_its_threshold_gives_way_to_the_next_passing_fault() -> None:
    r = rule(thresholds={"leak": 0.6, "bearing_wear": 0.3})
    d = fuse([text(leak=0.45, bearing=0.35, overheating=0.1, normal=0.1)], r)
    assert d.fault == "bearing_wear" and d.is_fault and d.confidence == pytest.approx(0.35)
    assert models_of(d.conflicting) == ["reports"]  # the report itself pointed at leak


def test_a_fault_below_its_threshold_gives_way_to_normal_when_normal_is_next() -> None:
    d = fuse([text(leak=0.45, normal=0.35, bearing=0.1, overheating=0.1)], rule(thresholds={"leak": 0.6}))
    assert d.fault == "none" and not d.is_fault and d.confidence == pytest.approx(0.35)


def test_a_threshold_never_promotes_a_fault_over_a_more_probable_normal() -> None:
    d = fuse([text(leak=0.3, normal=0.6, bearing=0.05, overheating=0.05)], rule(thresholds={"leak": 0.2}))
    assert d.fault == "none" and not d.is_fault


def test_a_probability_exactly_at_its_threshold_passes() -> None:
    d = fuse([text(leak=0.4, normal=0.3, bearing=0.2, overheating=0.1)], rule())
    assert d.fault == "leak" and d.is_fault


def test_stale_evidence_is_ignored_relative_to_the_newest_or_now() -> None:
    old_text, new_image = text(leak=0.99, t=0.0), image(scratch=0.9, t=100.0)
    d = fuse([old_text, new_image], weighted(reports=10.0, defects=1.0))
    assert d.fault == "surface_defect" and models_of(d.evidence) == ["defects"] and d.conflicting == ()
    assert d.timestamp == 100.0
    assert fuse([old_text, new_image], weighted(reports=10.0, defects=1.0, max_age_s=1000)).fault == "leak"
    with pytest.raises(PipelineError, match=r"older than fusion.max_age_s=60.0 at now=500"):
        fuse([old_text, new_image], rule(), now=500.0)


def test_anomaly_prediction_votes_with_its_decision() -> None:
    assert fuse([anomaly(0.8)], rule()).fault == "surface_defect"
    assert fuse([anomaly(0.2)], rule()).fault == "none"
    d = fuse([text(leak=0.7), anomaly(0.8)], rule())
    assert d.probabilities["surface_defect"] == pytest.approx(0.5)
    assert d.fault == "surface_defect" and models_of(d.evidence) == ["anomaly"]


def test_catch_all_maps_every_label_not_named_and_sums_them() -> None:
    config = copy.deepcopy(CONFIG)
    config["models"]["defects"]["map"] = {"scratch": "surface_defect", "*": "none"}
    prediction = classes("defects", ("scratch", "ok", "dust"), [0.2, 0.5, 0.3])
    d = fuse([Evidence("pump-7", prediction, 0.0, "image")], FusionRule.from_dict(config))
    assert d.fault == "none" and d.confidence == pytest.approx(0.8)


def test_scores_without_softmax_are_normalised_before_weighting() -> None:
    spec = Postprocess(output="logits", labels=IMAGE_LABELS, softmax=False)
    prediction = to_predictions(np.array([[0.9, 0.9]]), spec, backend="cpu", model="defects", timings=[_TIMING])[0]
    d = fuse([Evidence("pump-7", prediction, 0.0, "image")], rule())
    assert d.probabilities["surface_defect"] == pytest.approx(0.5)


@pytest.mark.parametrize("evidence", [
    [text(0.7), image(0.9)], [text(0.2, t=1.0)], [image(0.5), anomaly(0.9), text(0.9)], [anomaly(0.1)],
])
def test_probabilities_cover_the_vocabulary_and_sum_to_one(evidence: list[Evidence]) -> None:
    d = fuse(evidence, rule())
    assert list(d.probabilities) == CONFIG["faults"]
    assert sum(d.probabilities.values()) == pytest.approx(1.0)
    assert d.confidence == d.probabilities[d.fault]
    assert all(0.0 <= p <= 1.0 for p in d.probabilities.values())


def test_unmapped_label_names_model_label_and_the_key_to_add() -> None:
    prediction = classes("defects", ("scratch", "ok", "dust"), [0.2, 0.5, 0.3])
    with pytest.raises(PipelineError, match=r"model 'defects' produced label 'dust', which "
                                            r"fusion.models.defects.map does not map") as err:
        fuse([Evidence("pump-7", prediction, 0.0, "image")], rule())
    assert err.value.hint is not None and 'dust = "<fault>"' in err.value.hint
    assert "[fusion.models.defects.map]" in err.value.hint
    with pytest.raises(PipelineError, match="produced label 'dust'"):
        rule().check_labels("defects", ("scratch", "ok", "dust"))
    rule().check_labels("defects", IMAGE_LABELS)


def test_a_model_without_a_rule_is_refused_with_the_key_to_add() -> None:
    prediction = classes("thermal", ("hot", "cold"), [0.9, 0.1])
    with pytest.raises(PipelineError, match=r"model 'thermal' has no fusion rule") as err:
        fuse([Evidence("pump-7", prediction, 0.0, "image")], rule())
    assert err.value.hint is not None and "[fusion.models.thermal]" in err.value.hint


def test_evidence_about_two_assets_or_none_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"assets \['fan-1', 'pump-7'\]; expected one asset"):
        fuse([text(), image(asset="fan-1")], rule())
    with pytest.raises(PipelineError, match="no evidence to fuse"):
        fuse([], rule())


def test_evidence_checks_its_asset_and_timestamp() -> None:
    with pytest.raises(PipelineError, match="asset_id is ''"):
        text(asset="")
    with pytest.raises(PipelineError, match="timestamp is nan"):
        text(t=float("nan"))


# -- configuration -----------------------------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = config
        for part in parents:
            node = node[part]
        del node[last]
    return change


@pytest.mark.parametrize("change, message", [
    (_set("models/defects/map/scratch", "scatch_defect"),
     r"fusion.models.defects.map.scratch is 'scatch_defect'; expected one of the faults"),
    (_set("models/defects/weight", -1), r"fusion.models.defects.weight is -1; expected a finite number > 0"),
    (_set("models/defects/weight", 0), r"fusion.models.defects.weight is 0; expected"),
    (_set("models/defects/weight", True), r"fusion.models.defects.weight is True; expected"),
    (_set("models/defects/weight", "2"), r"fusion.models.defects.weight is '2'; expected"),
    (_set("thresholds/leak", 1.5), r"fusion.thresholds.leak is 1.5; expected a number in \[0, 1\]"),
    (_set("thresholds/lek", 0.3), r"fusion.thresholds.lek: 'lek' is not a fault"),
    (_set("thresholds/none", 0.3), r"fusion.thresholds.none: 'none' is not a fault"),
    (_set("default_threshold", -0.1), r"fusion.default_threshold is -0.1; expected a number in \[0, 1\]"),
    (_set("normal", "ok"), r"fusion.normal is 'ok'; expected one of \['none', 'bearing_wear'"),
    (_drop("normal"), None),  # default "none" is in faults: valid
    (_set("treshold", 0.5), r"fusion has unknown keys \['treshold'\]; expected only \['faults', 'normal'"),
    (_set("models/defects/wieght", 2), r"fusion.models.defects has unknown keys \['wieght'\]; "
                                       r"expected only \['weight', 'map', 'abstain'\]"),
    (_drop("models/defects/map"), r"fusion.models.defects has no map"),
    (_set("models/defects/map", {}), r"fusion.models.defects.map is empty"),
    (_set("models/defects/map/ok", 3), r"fusion.models.defects.map.ok is 3; expected a non-empty string"),
    (_set("models/my cam", {"map": {"x": "leak"}, "weight": 0}), r'fusion.models."my cam".weight is 0'),
    (_set("models", {}), r"fusion.models is empty"),
    (_drop("models"), r"fusion.models is None; expected a table"),
    (_set("faults", ["none", "leak", "leak"]), r"fusion.faults repeats \['leak'\]"),
    (_set("faults", ["none"]), r"fusion.faults is \['none'\]; expected a list of at least two"),
    (_set("max_age_s", 0), r"fusion.max_age_s is 0; expected a number of seconds > 0"),
])
def test_config_errors_name_the_key_path_the_value_and_the_fix(
        change: Callable[[dict[str, Any]], None], message: str | None) -> None:
    config = copy.deepcopy(CONFIG)
    change(config)
    if message is None:
        assert FusionRule.from_dict(config).normal == "none"
        return
    with pytest.raises(PipelineError, match=message) as err:
        FusionRule.from_dict(config)
    assert err.value.hint


def test_config_defaults_and_a_custom_key_path() -> None:
    r = FusionRule.from_dict({"faults": ["none", "leak"], "models": {"m": {"map": {"*": "leak"}}}})
    assert (r.normal, r.default_threshold, r.max_age_s, r.models["m"].weight) == ("none", 0.5, 60.0, 1.0)
    assert r.threshold("leak") == 0.5 and rule().threshold("leak") == 0.4
    with pytest.raises(PipelineError, match=r"daemon.fusion.models.m.weight is -2"):
        FusionRule.from_dict({"faults": ["none", "leak"], "models": {"m": {"map": {"*": "leak"}, "weight": -2}}},
                             key="daemon.fusion")


# -- the diagnosis as data -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Match:  # the shape of runtime.knowledge.Match, without importing it
    incident: str
    similarity: float
    rank: int


def test_to_dict_round_trips_through_json() -> None:
    d = fuse([text(0.7), image(0.9), anomaly(0.8)], rule(), similar=[_Match("INC-12 seal leak", 0.83, 1)])
    data = d.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["fault"] == "surface_defect" and data["similar"] == [
        {"incident": "INC-12 seal leak", "similarity": 0.83, "rank": 1}]
    first = data["evidence"][0]
    assert {k: first[k] for k in ("model", "label", "kind", "source", "weight")} == {
        "model": "defects", "label": "scratch", "kind": "image", "source": "cam1", "weight": 2.0}
    assert first["score"] == pytest.approx(0.9)
    assert data["conflicting"][0]["ref"] == "oil dripping under the pump"


# -- the stateful Fuser -------------------------------------------------------------------------------

def test_fuser_keeps_the_latest_evidence_per_model_and_source() -> None:
    fuser = Fuser(rule())
    assert fuser.add(image(0.9, source="cam1", t=1.0)).fault == "surface_defect"
    d = fuser.add(image(0.05, source="cam1", t=2.0))  # replaces cam1's older frame
    assert d.fault == "none" and len(d.evidence) + len(d.conflicting) == 1
    d = fuser.add(image(0.95, source="cam1", t=1.5))  # arrives late: older than the one held
    assert d.fault == "none" and d.evidence[0].evidence.timestamp == 2.0
    d = fuser.add(image(0.95, source="cam2", t=3.0))  # another camera adds, not replaces
    assert len(d.evidence) + len(d.conflicting) == 2 and d.probabilities["surface_defect"] == pytest.approx(0.5)


def test_fuser_is_per_asset_and_prunes_expired_evidence() -> None:
    fuser = Fuser(rule())
    fuser.add(text(0.9, asset="pump-7", t=0.0))
    assert fuser.add(image(0.9, asset="fan-1", t=1.0)).asset_id == "fan-1"
    d = fuser.diagnosis("pump-7")
    assert d is not None and d.fault == "leak"
    d = fuser.add(image(0.9, asset="pump-7", t=100.0))  # the report is now 100 s old: pruned
    assert models_of(d.evidence) == ["defects"] and d.conflicting == ()
    assert fuser.diagnosis("pump-7", now=1000.0) is None and fuser.diagnosis("unknown") is None
    assert set(fuser.assets()) == {"pump-7", "fan-1"}


def test_fuser_keeps_similar_incidents_until_replaced() -> None:
    fuser = Fuser(rule())
    fuser.add(text(0.9), similar=[_Match("INC-12", 0.8, 1)])
    assert fuser.add(image(0.1)).similar == (_Match("INC-12", 0.8, 1),)
    assert fuser.add(text(0.9), similar=[]).similar == ()


def test_fuser_forgets_the_least_recently_updated_asset() -> None:
    fuser = Fuser(rule(), max_assets=2)
    for asset in ("a", "b", "a", "c"):
        fuser.add(image(asset=asset))
    assert fuser.assets() == ("a", "c") and fuser.diagnosis("b") is None
    assert fuser.forget("a") and not fuser.forget("a") and fuser.assets() == ("c",)
    with pytest.raises(PipelineError, match="max_assets is 0; expected an integer >= 1"):
        Fuser(rule(), max_assets=0)


def test_fuser_refuses_an_unmappable_prediction_without_storing_it() -> None:
    fuser = Fuser(rule())
    with pytest.raises(PipelineError, match="produced label 'dust'"):
        fuser.add(Evidence("pump-7", classes("defects", ("scratch", "dust"), [0.5, 0.5]), 0.0, "image"))
    assert fuser.assets() == ()


def test_fuser_survives_concurrent_adds() -> None:
    fuser = Fuser(rule(), max_assets=100)
    assets, threads_n, per_thread = [f"asset-{i}" for i in range(5)], 8, 200
    errors: list[BaseException] = []
    results: list[Diagnosis] = []

    def work(worker: int) -> None:
        try:
            for i in range(per_thread):
                results.append(fuser.add(image(0.9 if worker % 2 else 0.1, asset=assets[i % 5],
                                               source=f"cam{worker}", t=float(i), ref=i)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == threads_n * per_thread
    assert sorted(fuser.assets()) == assets
    for index, asset in enumerate(assets):
        d = fuser.diagnosis(asset)
        assert d is not None and len(d.evidence) + len(d.conflicting) == threads_n
        last_ref = max(i for i in range(per_thread) if i % 5 == index)
        assert {c.evidence.ref for c in d.evidence + d.conflicting} == {last_ref}
        assert d.probabilities["surface_defect"] == pytest.approx(0.5)


def test_a_model_abstains_on_labels_it_cannot_judge() -> None:
    """A surface camera that sees no defect says nothing about a bearing the report hears."""
    from runtime.fusion import FusionRule, fuse

    rule = FusionRule.from_dict({
        "faults": ["none", "bearing_wear", "surface_defect"], "default_threshold": 0.3,
        "models": {"reports": {"map": {"bearing": "bearing_wear", "normal": "none"}},
                   "camera": {"map": {"ok": "none", "scratch": "surface_defect"}, "abstain": ["ok"]}}})
    report = classes("reports", ("bearing", "normal"), [0.9, 0.1])
    ok_frame = classes("camera", ("ok", "scratch"), [0.95, 0.05])
    d = fuse([Evidence("m1", report, 1.0, "text"), Evidence("m1", ok_frame, 2.0, "image")], rule)
    assert d.fault == "bearing_wear" and d.confidence == pytest.approx(0.9)
    assert [c.evidence.kind for c in d.abstained] == ["image"] and not d.conflicting
    assert d.to_dict()["abstained"][0]["abstained"] is True
    alone = fuse([Evidence("m2", ok_frame, 2.0, "image")], rule)  # nobody else spoke: the camera votes
    assert alone.fault == "none" and alone.confidence == pytest.approx(0.95) and not alone.abstained
    scratch = classes("camera", ("ok", "scratch"), [0.2, 0.8])
    d = fuse([Evidence("m3", report, 1.0, "text"), Evidence("m3", scratch, 2.0, "image")], rule)
    assert not d.abstained and len(d.conflicting) == 1  # a defect seen is a vote
    with pytest.raises(PipelineError, match="abstain is 'ok'; expected a list"):
        FusionRule.from_dict({"faults": ["none", "x"], "models": {"c": {"map": {"*": "x"}, "abstain": "ok"}}})

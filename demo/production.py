"""The demo's production-line step: a camera line streamed through the int8 defect model, and
reports + camera frames fused into one diagnosis per asset, with similar past incidents.

    python -m demo.production --build build/demo     (demo.run runs it after its accuracy tables)

Expects the demo models (``text/embed.onnx`` included) and the int8 packages that ``demo.run`` writes.

1. **Knowledge base.** ``kb/incidents.csv`` (id, asset, date, text, fault, fix): reports generated
   from the corpus's *training* templates (another seed), the asset tag moved from the text into
   its own column, and a fix per fault from ``FIXES``. ``packages/incidents.kb.edgepkg`` embeds
   them with ``text/embed.onnx``; it is rebuilt only when missing or older than its inputs.
2. **Camera line.** The held-out surface images become parts on a belt, two 320x240 frames each,
   written losslessly (FFV1) and as MJPG; the part sits in the region the stream crops, at the
   model's input size. ``edge_sdk.stream`` runs the video through the int8 package (policy "all",
   dynamic batching) at full speed, then at a camera's frame rate, then the MJPG copy. Accuracy is
   the stream's predictions against the label of the image each frame was made from.
3. **Diagnosis.** ``RULE`` (printed) maps both models onto one fault vocabulary: report classes by
   name with ``normal`` -> ``none``; the camera's ``ok`` -> ``none``, every defect ->
   ``surface_defect``. Both count the same; a fault needs a fused probability of 0.4 and must be
   the most probable class. A camera that sees an ``ok`` surface abstains: it cannot see a worn
   bearing, so it does not vote against one (it votes only when nothing else is known). Each of three assets gets a held-out report (the asset is the tag it
   names), classified by ``Diagnoser.text`` and searched in the knowledge base, and a camera, a
   short video of one part streamed into the diagnoser through ``Diagnoser.sink``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

import edge_sdk
from demo.corpus import LABELS as REPORT_LABELS
from demo.corpus import MACHINES, generate
from demo._cli import run_demo
from demo._table import table
from edge_sdk.errors import PackageError
from runtime.diagnosis import Diagnoser
from runtime.frame import Source
from runtime.fusion import Contribution, Diagnosis
from runtime.knowledge import KnowledgeBase
from runtime.pipeline import Pipeline
from runtime.sources import PacedSource, open_source

IMAGE_PACKAGE = "surface-defects.int8.edgepkg"
TEXT_PACKAGE = "fault-reports.int8.edgepkg"
KB_PACKAGE = "incidents.kb.edgepkg"

# -- the knowledge base of past incidents -------------------------------------------------------
INCIDENT_SEED = 4404  # not a seed of the model's splits, so the incidents are new reports
INCIDENTS_PER_FAULT = 16
FIXES: dict[str, tuple[str, ...]] = {
    "bearing_wear": ("replaced the drive-end bearing, checked alignment", "replaced both bearings, re-greased",
                     "bearing changed at the next stop; vibration back to 1.2 mm/s"),
    "overheating": ("cleaned the cooling fins and the fan cover", "replaced the broken fan blade",
                    "descaled the heat exchanger, restored cooling water flow"),
    "lubrication": ("re-greased with the specified grease, reset the relube interval",
                    "drained and refilled the oil, replaced the breather", "replaced the auto-lubricator cartridge"),
    "misalignment": ("laser-aligned motor and pump, added shims", "replaced the coupling insert and realigned",
                     "tightened the motor feet, corrected soft foot"),
    "electrical_fault": ("re-terminated the loose cable lug", "rewound the stator, insulation test passed",
                         "replaced the contactor and the blown fuse"),
    "sensor_failure": ("replaced the sensor and recalibrated the loop", "repaired the chafed sensor cable",
                       "replaced the corroded connector"),
    "leak": ("replaced the shaft seal", "replaced the gasket, torqued the flange", "replaced the hose and fitting"),
}
KINDS = {prefix.upper(): kind for kind, prefix, _, _ in MACHINES}  # "P" -> "pump"
TAG = re.compile(rf"\b({'|'.join(sorted(KINDS, key=len, reverse=True))})-?(\d{{1,3}})\b", re.IGNORECASE)  # P-104
REPEAT = re.compile(r"\b(\w+(?: \w+){0,2})(?: \(\1\)| \1\b)", re.IGNORECASE)  # "pump (pump)", "pump pump"

# -- the camera line ----------------------------------------------------------------------------
FRAME_W, FRAME_H = 320, 240
# x, y, width, height of the part in the frame: the region the model sees, at the model's input size
PART_BOX = [48, 8, 224, 224]
FRAMES_PER_PART = 2
LINE_SEED = 7
FPS = 30.0
PACED_FPS = 60.0
BATCHING = {"max_batch": 8, "max_wait_ms": 4.0}

# -- the diagnosis --------------------------------------------------------------------------------
RULE: dict[str, Any] = {
    "faults": ["none", "bearing_wear", "overheating", "lubrication", "misalignment", "electrical_fault",
               "sensor_failure", "leak", "surface_defect"],
    "normal": "none",
    "default_threshold": 0.4,
    "models": {
        "fault-reports": {"weight": 1.0, "map": {"normal": "none",
                                                 **{f: f for f in REPORT_LABELS if f != "normal"}}},
        "surface-defects": {"weight": 1.0, "map": {"ok": "none", "*": "surface_defect"}, "abstain": ["ok"]},
    },
}
# (report label, camera part label) per asset: a fault the camera cannot see, a healthy asset, and a
# report of "nothing wrong" while the camera sees a defect (the conflict).
SCENARIOS = (("bearing_wear", "ok"), ("normal", "ok"), ("normal", "crack"))
CAMERA_FRAMES = 8
CLEAR_SCORE = 0.8


def run(build: Path) -> None:
    """Build (or reuse) the knowledge base, stream the camera line, diagnose three assets."""
    packages, out = build / "packages", build / "production"
    out.mkdir(parents=True, exist_ok=True)
    for name in (IMAGE_PACKAGE, TEXT_PACKAGE):
        if not (packages / name).is_file():
            raise PackageError(f"{packages / name} does not exist; the production step needs the int8 packages",
                               hint=f"run python -m demo.run --build {build}")
    started = time.perf_counter()
    kb = knowledge_base(build)
    print(f"\n== production line ({time.perf_counter() - started:.1f} s for the knowledge base {kb.name})")
    camera_line(build / "image" / "data" / "test", packages / IMAGE_PACKAGE, out)
    diagnose(build, packages, kb, out)


# -- knowledge base ---------------------------------------------------------------------------------
def _asset(text: str) -> str | None:
    match = TAG.search(text)
    return f"{match.group(1).upper()}-{int(match.group(2))}" if match else None


def _generic(text: str) -> str:
    """A report with its asset tag replaced by the kind of machine: the asset has its own column, and
    similar incidents should match on symptoms, not on tags."""
    return REPEAT.sub(r"\1", TAG.sub(lambda m: KINDS[m.group(1).upper()], text))


def incidents_csv() -> str:
    """Past incidents as CSV text: reports from the training templates, a fix per fault; deterministic."""
    rng = random.Random(INCIDENT_SEED)
    reports = [(label, text) for label, text in generate(INCIDENT_SEED, INCIDENTS_PER_FAULT, "train")
               if label in FIXES]
    rng.shuffle(reports)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "asset", "date", "text", "fault", "fix"])
    day = 0
    for n, (fault, text) in enumerate(reports, start=1):
        day += rng.randint(3, 14)
        date = time.strftime("%Y-%m-%d", time.gmtime(1672531200 + day * 86400))  # from 2023-01-01
        writer.writerow([f"INC-{n:03d}", _asset(text) or "", date, _generic(text), fault, rng.choice(FIXES[fault])])
    return buf.getvalue()


def knowledge_base(build: Path) -> Path:
    """``kb/incidents.csv`` (rewritten only when its content changes) and the KB package built from it."""
    from converters.knowledge import build_knowledge_base

    text = build / "text"
    model, tokenizer = text / "embed.onnx", text / "tokenizer.json"
    if not model.is_file():
        raise PackageError(f"{model} does not exist; the knowledge base needs the embedding model",
                           hint=f"run python -m demo.build_text_model --out {text}")
    csv_path, package = build / "kb" / "incidents.csv", build / "packages" / KB_PACKAGE
    content = incidents_csv()
    if not csv_path.is_file() or csv_path.read_text(encoding="utf-8") != content:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(content, encoding="utf-8")
    newest_input = max(p.stat().st_mtime for p in (csv_path, model, tokenizer))
    if not package.is_file() or package.stat().st_mtime <= newest_input:
        started = time.perf_counter()
        built = build_knowledge_base(model, csv_path, package, tokenizer=tokenizer, max_length=128,
                                     pooling="none", normalize=True, name="incidents")
        kb = built.manifest.knowledge_base or {}
        print(f"built {package.name}: {kb.get('count')} incidents, dimension {kb.get('dim')}, "
              f"in {time.perf_counter() - started:.1f} s")
    return package


# -- camera line ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineRun:
    """What one pass of the line video through the stream measured."""

    name: str
    predictions: int
    seconds: float  # first frame read -> last prediction
    latency_ms: tuple[float, float]  # p50, p99, frame read -> prediction
    mean_batch: float
    backend: str
    accuracy: float
    per_label: dict[str, float]
    dropped: int


def _frame(part: np.ndarray, index: int) -> np.ndarray:
    """A camera frame: a moving belt with the part on it, scaled as the model's preprocessing scales it."""
    frame = np.full((FRAME_H, FRAME_W, 3), 58, np.uint8)
    for x in range(index * 6 % 24 - 24, FRAME_W, 24):
        cv2.line(frame, (x, 0), (x, FRAME_H - 1), (44, 44, 44), 3)
    x, y, w, h = PART_BOX
    frame[y : y + h, x : x + w] = cv2.resize(part, (w, h), interpolation=cv2.INTER_AREA)
    return frame


def write_videos(paths: dict[str, Path], parts: Sequence[Path], frames_per_part: int) -> list[str]:
    """Write ``parts`` (each ``frames_per_part`` times) into one video per codec (fourcc -> path);
    return the true label of each frame."""
    writers = {fourcc: cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), FPS, (FRAME_W, FRAME_H))
               for fourcc, path in paths.items()}
    labels: list[str] = []
    try:
        for fourcc, writer in writers.items():
            if not writer.isOpened():
                raise RuntimeError(f"this OpenCV cannot write {fourcc} video to {paths[fourcc]}")
        for part in parts:
            image = cv2.imread(str(part), cv2.IMREAD_COLOR)
            if image is None:
                raise RuntimeError(f"cannot read {part}")
            for _ in range(frames_per_part):
                frame = _frame(image, len(labels))
                for writer in writers.values():
                    writer.write(frame)
                labels.append(part.parent.name)
    finally:
        for writer in writers.values():
            writer.release()
    return labels


def stream_line(name: str, source: Source, model: Any, truth: Sequence[str]) -> LineRun:
    """Stream ``source`` through ``model`` (policy "all", dynamic batching, the part's region)."""
    results, arrivals = [], []
    for result in edge_sdk.stream(source, model, policy="all", batching=BATCHING,
                                  rois={source.id: {"part": PART_BOX}}):
        results.append(result)
        arrivals.append(time.time())
    if not results:
        raise RuntimeError(f"the {name} stream gave no predictions")
    latencies = np.array([r.latency_ms for r in results])
    hits = Counter(t for r in results if r.prediction.label == (t := truth[r.frame.index]))
    counts = Counter(truth[r.frame.index] for r in results)
    return LineRun(
        name=name, predictions=len(results),
        seconds=max(arrivals) - min(r.frame.timestamp for r in results),
        latency_ms=(float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))),
        mean_batch=len(results) / sum(1.0 / r.prediction.batch_size for r in results),
        backend=f"{results[0].prediction.backend} {results[0].prediction.precision}",
        accuracy=sum(hits.values()) / len(results),
        per_label={label: hits[label] / n for label, n in sorted(counts.items())},
        dropped=source.state.dropped)


def camera_line(test_dir: Path, package: Path, out: Path) -> None:
    """The held-out parts as a line video, streamed at full speed, at camera pace, and as MJPG."""
    parts = sorted(test_dir.glob("*/*.png"))
    random.Random(LINE_SEED).shuffle(parts)
    lossless, mjpg = out / "line.avi", out / "line-mjpg.avi"
    truth = write_videos({"FFV1": lossless, "MJPG": mjpg}, parts, FRAMES_PER_PART)
    print(f"\n-- camera line: {len(truth)} frames {FRAME_W}x{FRAME_H} ({len(parts)} held-out parts x "
          f"{FRAMES_PER_PART} frames), region 'part' {PART_BOX}, policy 'all', batching {BATCHING}")
    with edge_sdk.load(package) as model:
        runs = [
            stream_line(f"{lossless.name} (FFV1, lossless), full speed", open_source(lossless, source_id="line-1"),
                        model, truth),
            stream_line(f"{lossless.name} at a {PACED_FPS:.0f} fps camera's pace",
                        PacedSource(open_source(lossless, source_id="line-1"), PACED_FPS), model, truth),
            stream_line(f"{mjpg.name} (MJPG), full speed", open_source(mjpg, source_id="line-1"), model, truth),
        ]
        offline = sum(p.label == path.parent.name for p, path in zip(model.predict_batch(parts), parts)) / len(parts)
    rows = [(r.name, str(r.predictions), f"{r.predictions / r.seconds:.0f}", f"{r.latency_ms[0]:.1f}",
             f"{r.latency_ms[1]:.1f}", f"{r.mean_batch:.1f}", str(r.dropped), f"{r.accuracy:.3f}") for r in runs]
    table(("stream", "predictions", "frames/s", "p50 ms", "p99 ms", "mean batch", "dropped", "accuracy"), rows)
    print(f"  ({runs[0].backend}; latency = frame read -> prediction; at full speed the file is read as fast as the "
          "model takes frames, so it is mostly the wait in the stream's bounded queues)")
    lossy = max(runs[0].per_label, key=lambda k: runs[0].per_label[k] - runs[2].per_label[k])
    print(f"  the same {len(parts)} parts as PNG files, one predict_batch: accuracy {offline:.3f}; per label, "
          f"lossless stream: {', '.join(f'{k} {v:.2f}' for k, v in runs[0].per_label.items())}")
    print(f"  MJPG compression changes accuracy by {runs[2].accuracy - runs[0].accuracy:+.3f}, most on {lossy!r} "
          f"({runs[0].per_label[lossy]:.2f} -> {runs[2].per_label[lossy]:.2f}); the head was trained on lossless images")


# -- diagnosis --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    asset: str
    report: str
    part: Path  # the image the asset's camera shows
    video: Path


def _first_clear(model: Pipeline, candidates: Iterable[tuple[Any, str]], what: str) -> Any:
    """The first ``(input, label)`` candidate that ``model`` classifies as its label with ``CLEAR_SCORE``."""
    for item, label in candidates:
        p = model.predict(item)
        if p.label == label and p.score >= CLEAR_SCORE:
            return item
    raise RuntimeError(f"{model.manifest.name} classifies no {what} as {what.split()[0]} with score {CLEAR_SCORE}")


def scenarios(dx: Diagnoser, build: Path, out: Path) -> list[Scenario]:
    """Per SCENARIOS entry: the first held-out report of the label about a new asset, and the first
    held-out part of the label, that the int8 models classify as that label with a score of at least
    ``CLEAR_SCORE``: clear-cut inputs, since this step shows fusion (the models' accuracy over every
    held-out sample is measured above). Each asset's camera is a short video of its part."""
    lines = [line.partition("\t") for line in (build / "text" / "data" / "test.tsv").read_text("utf-8").splitlines()]
    text_model, image_model = dx.models["fault-reports"], dx.models["surface-defects"]
    chosen: list[Scenario] = []
    for report_label, part_label in SCENARIOS:
        used = {s.asset for s in chosen}
        report = _first_clear(text_model, ((text, label) for label, _, text in lines if label == report_label
                                             and _asset(text) not in used | {None}), f"{report_label} report")
        parts = sorted((build / "image" / "data" / "test" / part_label).glob("*.png"))
        part = _first_clear(image_model, ((path, part_label) for path in parts), f"{part_label} part")
        asset = _asset(report) or ""
        video = out / f"cam-{asset}.avi"
        write_videos({"FFV1": video}, [part], CAMERA_FRAMES)
        chosen.append(Scenario(asset, report, part, video))
    return chosen


def _rule_lines() -> list[str]:
    lines = [f"fusion rule: faults {RULE['faults']}, normal {RULE['normal']!r}, "
             f"a fault needs fused probability >= {RULE['default_threshold']}"]
    for model, spec in RULE["models"].items():
        renamed = [f"{label} -> {fault}" for label, fault in spec["map"].items() if label not in ("*", fault)]
        same = [label for label, fault in spec["map"].items() if label == fault]
        mapping = [*renamed, *([f"{'/'.join(same)} -> same name"] if same else []),
                   *([f"others -> {spec['map']['*']}"] if "*" in spec["map"] else [])]
        abstain = f"; abstains on {', '.join(spec['abstain'])}" if spec.get("abstain") else ""
        lines.append(f"  {model} (weight {spec['weight']}): {', '.join(mapping)}{abstain}")
    return lines


def _evidence(c: Contribution) -> str:
    p, e = c.evidence.prediction, c.evidence
    where = f"{e.source} frame {e.ref}" if e.kind == "image" else e.source
    return f"{p.model} says {p.label} {p.score:.3f} ({where}) -> {c.fault}"


def _print_diagnosis(d: Diagnosis, s: Scenario) -> None:
    top = sorted(d.probabilities.items(), key=lambda kv: -kv[1])[:3]
    print(f"\nasset {d.asset_id}: report \"{s.report}\"")
    print(f"  camera cam-{d.asset_id}: {CAMERA_FRAMES} frames of {s.part.parent.name}/{s.part.name}")
    print(f"  diagnosis: {d.fault} ({'fault' if d.is_fault else 'no fault'}), confidence {d.confidence:.3f}  "
          f"[{', '.join(f'{f} {p:.3f}' for f, p in top)}]")
    for title, items in (("supports  ", d.evidence), ("conflicts ", d.conflicting), ("abstains  ", d.abstained)):
        for c in items:
            print(f"    {title}{_evidence(c)}")
    print("  similar past incidents:")
    table(("incident", "similarity", "fault", "fix", "past report"),
          [(m.incident.id, f"{m.similarity:.3f}", m.incident.fault, m.incident.fix, _clip(m.incident.text, 56))
           for m in d.similar])


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _retrieval(kb: KnowledgeBase | None, test_tsv: Path) -> str:
    """How often the most similar incidents have the fault of a held-out report (normal ones excluded)."""
    if kb is None:
        raise RuntimeError("the diagnoser was loaded without its knowledge base")
    reports = [(label, text) for label, _, text in (line.partition("\t") for line in
               test_tsv.read_text(encoding="utf-8").splitlines()) if label in FIXES]
    results = kb.search_batch([text for _, text in reports], k=3)
    top1 = sum(r[0].incident.fault == label for (label, _), r in zip(reports, results))
    top3 = sum(any(m.incident.fault == label for m in r) for (label, _), r in zip(reports, results))
    return (f"knowledge base: {len(kb)} past incidents; for {len(reports)} held-out fault reports the most "
            f"similar incident has the report's fault {top1 / len(reports):.2f} of the time, one of the 3 most "
            f"similar {top3 / len(reports):.2f} (chance {1 / len(kb.faults):.2f})")


def diagnose(build: Path, packages: Path, kb: Path, out: Path) -> None:
    """Three assets, each a held-out report and a camera streamed into the diagnoser; print and save."""
    print("\n-- diagnosis: a report and a camera per asset, fused")
    print("\n".join(_rule_lines()))
    print(f"inputs: per asset the first held-out report and part of the wanted labels that the int8 models "
          f"call right with score >= {CLEAR_SCORE} (clear cases; accuracy on all of them is above)")
    started = time.perf_counter()
    with Diagnoser.from_packages(RULE, [packages / TEXT_PACKAGE, packages / IMAGE_PACKAGE], knowledge=kb) as dx:
        loaded = time.perf_counter() - started
        chosen = scenarios(dx, build, out)
        fed = time.perf_counter()
        for s in chosen:
            dx.text(s.asset, s.report)
        sources = [open_source(s.video, source_id=f"cam-{s.asset}") for s in chosen]
        sink = dx.sink({source.id: s.asset for source, s in zip(sources, chosen)})
        for _ in edge_sdk.stream(sources, dx.models["surface-defects"], batching=BATCHING,
                                 rois={source.id: {"part": PART_BOX} for source in sources}, sinks=[sink]):
            pass
        diagnoses = [dx.diagnosis(s.asset) for s in chosen]
        fusing = time.perf_counter() - fed
        retrieval = _retrieval(dx.knowledge, build / "text" / "data" / "test.tsv")
    for d, s in zip(diagnoses, chosen):
        if d is None:
            raise RuntimeError(f"asset {s.asset} has no fresh evidence; raise RULE['max_age_s']")
        _print_diagnosis(d, s)
    (out / "diagnoses.json").write_text(json.dumps([d.to_dict() for d in diagnoses if d], indent=2) + "\n")
    print(f"\n{retrieval}")
    print(f"loaded and verified 3 packages in {loaded:.1f} s; 3 reports + {len(chosen) * CAMERA_FRAMES} camera "
          f"frames fused in {fusing:.1f} s; diagnoses written to {out / 'diagnoses.json'}")


def main(argv: list[str] | None = None) -> int:
    return run_demo(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())

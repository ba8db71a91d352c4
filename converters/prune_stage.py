"""The pruning stage of ``convert``: parse ``prune=``, prune on the calibration data, measure, report.

Forms of ``prune``:

* ``"magnitude"`` / ``{"method": "magnitude", "sparsity": 0.5, "norm": "l1", "scope": "layer"}``
  and ``{"method": "activation", ...}``: weights zeroed (compression and accuracy studies;
  dense CPU kernels gain no speed from zeros);
* ``"2:4"`` / ``{"method": "2:4"}``: 2:4 semi-structured sparsity along the input dimension,
  recorded so that TensorRT builds enable sparse tactics on Ampere-class GPUs (Orin);
* ``{"method": "structured", "ratio": 0.3}``: channels (CNN) or FFN neurons (transformer)
  removed physically, the next layer re-fitted by least squares: smaller and faster everywhere;
  ``"heads": 0.25`` also removes that share of every block's attention heads (transformers);
* ``{"method": "structured", "budget": 1.0}``: a search per group kind, within ``budget``
  accuracy points of the unpruned model on the validation data: the largest FFN ratio, then on
  top of it the largest attention-head ratio (transformers); the most residual blocks (3, 2, 1),
  then on top the largest channel ratio (CNNs).
  Every kind's steps are reported; a kind with no ratio within the budget is left unpruned;
* ``{"method": "heads", "ratio": 0.25}``: the least used attention heads of every block
  removed (Q/K/V columns, output-projection rows, reshape constants);
* ``{"method": "layers", "count": 1}``: the residual blocks (transformer layers, or CNN blocks
  ``y = x + f(x)``) with the least influence on their output, bypassed;
* ``"joint": true`` with structured CNN pruning also prunes channel groups coupled through
  residual Add chains (the same channels in every block of a stage). Off by default: without
  fine-tuning those narrow, shared channels cost far more accuracy per speed-up
  (EfficientNet-Lite0, ratio 0.1: 85.3% joint against 86.7% without, from 91.3%).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from converters.pruning.common import PruneResult, macs_per_sample, nonzero_params, params
from edge_sdk.errors import PruningError

log = logging.getLogger(__name__)

METHODS = ("magnitude", "activation", "2:4", "structured", "heads", "layers")
BUDGET_RATIOS = (0.5, 0.4, 0.3, 0.2, 0.1)
Feeds = dict[str, np.ndarray]
Metric = Callable[[onnx.ModelProto], float]  # accuracy in points (0-100) of an fp32 graph


@dataclass(frozen=True)
class PruneSpec:
    method: str
    ratio: float | None = None  # structured
    sparsity: float = 0.5  # magnitude / activation
    norm: str = "l1"
    scope: str = "layer"
    budget: float | None = None
    count: int = 1  # layers
    heads: float | None = None  # structured with a ratio: also this share of attention heads
    joint: bool = False  # structured CNN channels: also prune groups coupled through residual Adds


def parse_prune(prune: str | Mapping[str, Any]) -> PruneSpec:
    """Validate ``convert(prune=...)``; every error names the value and the accepted forms."""
    data = {"method": prune} if isinstance(prune, str) else dict(prune)
    method = data.pop("method", None)
    if method not in METHODS:
        raise PruningError(f"prune method is {method!r}; expected one of {', '.join(METHODS)}",
                           hint='e.g. prune={"method": "structured", "ratio": 0.3} or prune="2:4"')
    known = {"ratio", "sparsity", "norm", "scope", "budget", "count", "heads", "joint"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PruningError(f"prune has unknown key(s) {unknown}", hint=f"known keys: {', '.join(sorted(known))}")
    spec = PruneSpec(method=method, **data)
    if spec.method == "heads" and spec.ratio is None:
        raise PruningError("head pruning needs 'ratio' (0-1)", hint='e.g. {"method": "heads", "ratio": 0.25}')
    if method == "structured" and (spec.ratio is None) == (spec.budget is None):
        raise PruningError("structured pruning needs exactly one of 'ratio' (0-1) or 'budget' (accuracy points)",
                           hint='e.g. {"method": "structured", "ratio": 0.3}')
    if not isinstance(spec.joint, bool) or (spec.joint and method != "structured"):
        raise PruningError(f"prune joint is {spec.joint!r}; expected true or false, with method 'structured'",
                           hint='e.g. {"method": "structured", "ratio": 0.2, "joint": true}')
    if spec.heads is not None and (method != "structured" or spec.ratio is None or not 0.0 < spec.heads < 1.0):
        raise PruningError(f"prune heads is {spec.heads!r}; it goes with method 'structured' and a 'ratio', "
                           "as a fraction between 0 and 1", hint='e.g. {"method": "structured", "ratio": 0.2, '
                                                                 '"heads": 0.25}')
    if spec.ratio is not None and not 0.0 < spec.ratio < 1.0:
        raise PruningError(f"prune ratio is {spec.ratio!r}; expected a fraction between 0 and 1")
    if not isinstance(spec.count, int) or spec.count < 1:
        raise PruningError(f"prune count is {spec.count!r}; expected a number of blocks >= 1")
    if spec.budget is not None and not spec.budget >= 0:
        raise PruningError(f"prune budget is {spec.budget!r}; expected accuracy points >= 0")
    return spec


def _structured(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], joint: bool = False) -> PruneResult:
    from converters.qdq import plan_placement

    if plan_placement(model).family == "transformer":
        from converters.pruning.transformer import prune_ffn

        return prune_ffn(model, ratio, batches)
    from converters.pruning.cnn import prune_channels

    return prune_channels(model, ratio, batches, joint=joint)


def _apply(spec: PruneSpec, model: onnx.ModelProto, batches: Sequence[Feeds]) -> PruneResult:
    if spec.method in ("magnitude", "activation"):
        from converters.pruning.weights import prune_weights

        return prune_weights(model, spec.sparsity, method=spec.method, norm=spec.norm, scope=spec.scope,
                             batches=batches)
    if spec.method == "2:4":
        from converters.pruning.sparse24 import prune_2_4

        return prune_2_4(model, batches=batches)
    if spec.method == "heads":
        from converters.pruning.heads import prune_heads

        return prune_heads(model, spec.ratio or 0.0, batches)
    if spec.method == "layers":
        from converters.qdq import plan_placement

        if plan_placement(model).family != "transformer":
            from converters.pruning.cnn_blocks import prune_residual_blocks

            return prune_residual_blocks(model, spec.count, batches)
        from converters.pruning.transformer import prune_layers

        return prune_layers(model, spec.count, batches)
    result = _structured(model, spec.ratio or 0.0, batches, spec.joint)
    if spec.heads is None:
        return result
    from converters.pruning.heads import prune_heads

    heads = prune_heads(result.model, spec.heads, batches)
    return PruneResult(model=heads.model, method="structured", layers=result.layers + heads.layers,
                       notes=result.notes + heads.notes)


BUDGET_BLOCKS = (3, 2, 1)  # residual CNN blocks to remove, most first
Kind = tuple[str, str, Sequence[float], Callable[[onnx.ModelProto, Any, Sequence[Feeds]], PruneResult]]


def _kinds(model: onnx.ModelProto) -> list[Kind]:
    """The group kinds a budget search walks through, in order: (kind, parameter, values, prune)."""
    from converters.qdq import plan_placement

    if plan_placement(model).family == "transformer":
        from converters.pruning.heads import prune_heads
        from converters.pruning.transformer import prune_ffn

        return [("ffn", "ratio", BUDGET_RATIOS, prune_ffn), ("heads", "ratio", BUDGET_RATIOS, prune_heads)]
    from converters.pruning.cnn import prune_channels
    from converters.pruning.cnn_blocks import prune_residual_blocks

    # Whole residual blocks first: on EfficientNet-Lite0 they cost the least accuracy per speed-up.
    return [("blocks", "count", BUDGET_BLOCKS, prune_residual_blocks),
            ("channels", "ratio", BUDGET_RATIOS, prune_channels)]


def _budget_search(model: onnx.ModelProto, budget: float, batches: Sequence[Feeds], metric: Metric,
                   baseline: float, steps: list[dict[str, Any]]) -> PruneResult:
    """Per group kind, the most pruning that keeps the accuracy within ``budget`` points of the
    unpruned model (each kind applied on top of the previous ones); ``steps`` records every try."""
    current, layers, notes, applied = model, [], [], []
    for kind, parameter, values, prune in _kinds(model):
        for value in values:  # most pruning first: stop at the first within budget
            try:
                candidate = prune(current, value, batches)
            except PruningError as exc:  # e.g. fewer removable blocks than asked
                steps.append({"kind": kind, parameter: value, "value": value, "error": exc.message})
                continue
            score = metric(candidate.model)
            steps.append({"kind": kind, parameter: value, "value": value, "metric": score, "drop": baseline - score})
            if baseline - score <= budget:
                current = candidate.model
                layers += list(candidate.layers)
                notes += list(candidate.notes)
                applied.append(f"{kind} {parameter} {value}")
                break
        else:
            notes.append(f"{kind}: nothing down to {parameter} {values[-1]} stays within {budget} points; not pruned")
    if not applied:
        raise PruningError(f"no pruning of any kind stays within {budget} points",
                           hint="raise the budget or convert without prune")
    log.info("budget search within %s points applied %s", budget, ", ".join(applied))
    return PruneResult(model=current, method="structured", layers=tuple(layers), notes=tuple(notes))


def _speedup(before: onnx.ModelProto, after: onnx.ModelProto, batch: Feeds, rounds: int = 7) -> float:
    """CPU speed of ``after`` relative to ``before`` on one calibration batch: the two sessions
    alternate, one warm-up each, and the medians are compared (robust on a busy machine)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (before, after)]
    times: list[list[float]] = [[], []]
    for session in sessions:
        session.run(None, batch)
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, batch)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[0]) / np.median(times[1]))


def run_pruning(
    spec: PruneSpec, model: onnx.ModelProto, batches: Sequence[Feeds], metric: Metric | None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Prune ``model`` as ``spec`` says; the pruned model and the report for the package."""
    baseline = metric(model) if metric else None
    steps: list[dict[str, Any]] = []
    if spec.budget is not None:
        if metric is None or baseline is None:
            raise PruningError("a pruning budget needs validation data to measure accuracy on",
                               hint="pass validation=..., or prune with a fixed ratio")
        result = _budget_search(model, spec.budget, batches, metric, baseline, steps)
    else:
        result = _apply(spec, model, batches)
    after = metric(result.model) if metric else None
    report = {
        "method": result.method, "spec": spec.__dict__, "params_before": params(model),
        "params_after": params(result.model), "nonzero_after": nonzero_params(result.model),
        "macs_before": macs_per_sample(model, batches[0]), "macs_after": macs_per_sample(result.model, batches[0]),
        "size_before": len(model.SerializeToString()), "size_after": len(result.model.SerializeToString()),
        "accuracy_before": baseline, "accuracy_after": after, "budget_steps": steps,
        "cpu_speedup": _speedup(model, result.model, batches[0]),
        "chosen": {step["kind"]: step["value"] for step in steps
                   if "drop" in step and step["drop"] <= (spec.budget or 0.0)},
        "layers": list(result.layers), "notes": list(result.notes),
    }
    if result.method == "2:4":
        from converters.pruning.sparse24 import sparsity_record

        report.update(sparsity_record(result))
    log.info("pruning %s: %d -> %d parameters", result.method, report["params_before"], report["params_after"])
    return result.model, report

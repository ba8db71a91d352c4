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
* ``{"method": "structured", "budget": 1.0}``: the most pruning within ``budget`` accuracy
  points of the unpruned model on the validation data, allocated per unit (each FFN and
  attention block of a transformer, each channel group and residual block of a CNN) from a
  sensitivity analysis on the calibration data (``converters.pruning.allocation``); the
  report's ``chosen.ratios`` is the allocation, ``budget_steps`` every allocation measured;
* ``{"method": "structured", "ratios": {"ffn:<MatMul>": 0.5, "heads:<MatMul>": 0.25}}``: a
  given per-unit allocation (e.g. a budget search's ``chosen.ratios``, reapplied without the search);
* ``{"method": "heads", "ratio": 0.25}``: the least used attention heads of every block
  removed (Q/K/V columns, output-projection rows, reshape constants);
* ``{"method": "layers", "count": 1}``: the residual blocks (transformer layers, or CNN blocks
  ``y = x + f(x)``) with the least influence on their output, bypassed;
* ``"joint": true`` with structured CNN pruning also prunes channel groups coupled through
  residual Add chains (the same channels in every block of a stage). Off by default: without
  fine-tuning those narrow, shared channels cost far more accuracy per speed-up (the README's
  pruning section says what was measured).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from converters import ir
from converters.pruning.allocation import Pruner, Unit, greedy_path, search_path, sensitivity
from converters.pruning.common import PruneResult, macs_per_sample, nonzero_params, params
from edge_sdk.errors import PruningError

log = logging.getLogger(__name__)

METHODS = ("magnitude", "activation", "2:4", "structured", "heads", "layers")
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
    ratios: Mapping[str, float] | None = None  # structured: "kind:unit" -> ratio, e.g. a budget search's choice


def parse_prune(prune: str | Mapping[str, Any]) -> PruneSpec:
    """Validate ``convert(prune=...)``; every error names the value and the accepted forms."""
    data = {"method": prune} if isinstance(prune, str) else dict(prune)
    method = data.pop("method", None)
    if method not in METHODS:
        raise PruningError(f"prune method is {method!r}; expected one of {', '.join(METHODS)}",
                           hint='e.g. prune={"method": "structured", "ratio": 0.3} or prune="2:4"')
    known = {"ratio", "sparsity", "norm", "scope", "budget", "count", "heads", "joint", "ratios"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PruningError(f"prune has unknown key(s) {unknown}", hint=f"known keys: {', '.join(sorted(known))}")
    spec = PruneSpec(method=method, **data)
    if spec.method == "heads" and spec.ratio is None:
        raise PruningError("head pruning needs 'ratio' (0-1)", hint='e.g. {"method": "heads", "ratio": 0.25}')
    if method == "structured" and sum(x is not None for x in (spec.ratio, spec.budget, spec.ratios)) != 1:
        raise PruningError("structured pruning needs exactly one of 'ratio' (0-1), 'budget' (accuracy points) "
                           "or 'ratios' (per unit)", hint='e.g. {"method": "structured", "ratio": 0.3}')
    if spec.ratios is not None:
        _check_unit_ratios(spec)
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


def _check_unit_ratios(spec: PruneSpec) -> None:
    ratios = spec.ratios
    if spec.method != "structured" or not isinstance(ratios, Mapping) or not ratios:
        raise PruningError(f"prune ratios is {ratios!r}; expected a non-empty mapping 'kind:unit' -> ratio "
                           "with method 'structured'",
                           hint='e.g. {"method": "structured", "ratios": {"ffn:/layer.0/MatMul": 0.5}}; '
                                "a budget search reports its choice as chosen.ratios")
    for key, value in ratios.items():
        kind, _, name = str(key).partition(":")
        if kind not in ("channels", "ffn", "heads", "blocks") or not name:
            raise PruningError(f"prune ratios key {key!r} is not 'kind:unit' with kind channels, ffn, heads "
                               "or blocks", hint="use the keys of a budget search's chosen.ratios")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "blocks" and (not numeric or value not in (0, 1)):
            raise PruningError(f"prune ratios[{key!r}] is {value!r}; a residual block is kept (0) or removed (1)")
        if kind != "blocks" and (not numeric or not 0.0 <= value < 1.0):
            raise PruningError(f"prune ratios[{key!r}] is {value!r}; expected a fraction 0 <= ratio < 1")


def _structured(model: onnx.ModelProto, ratio: float, batches: Sequence[Feeds], joint: bool = False) -> PruneResult:
    if ir.family(model) == "transformer":
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
        if ir.family(model) != "transformer":
            from converters.pruning.cnn_blocks import prune_residual_blocks

            return prune_residual_blocks(model, spec.count, batches)
        from converters.pruning.transformer import prune_layers

        return prune_layers(model, spec.count, batches)
    if spec.ratios is not None:
        units, prune = allocation_units(model, batches, spec.joint)
        ratios = {Unit(*key.split(":", 1)): float(r) for key, r in spec.ratios.items()}
        unknown = sorted(str(u) for u in set(ratios) - set(units))
        if unknown:
            raise PruningError(f"prune ratios name {unknown}, which are not prunable units of this model",
                               hint=f"prunable units: {', '.join(map(str, units))}")
        return prune(ratios)
    result = _structured(model, spec.ratio or 0.0, batches, spec.joint)
    if spec.heads is None:
        return result
    from converters.pruning.heads import prune_heads

    heads = prune_heads(result.model, spec.heads, batches)
    return PruneResult(model=heads.model, method="structured", layers=result.layers + heads.layers,
                       notes=result.notes + heads.notes)


def allocation_units(model: onnx.ModelProto, batches: Sequence[Feeds], joint: bool = False,
                     ) -> tuple[list[Unit], Pruner]:
    """The units a per-unit allocation can prune, and the function applying per-unit ratios to ``model``:
    FFNs and attention blocks of a transformer; channel groups and residual blocks (ratio 1: bypassed)
    of a CNN."""
    if ir.family(model) == "transformer":
        from converters.pruning.heads import find_attention_blocks, prune_heads
        from converters.pruning.transformer import find_ffn_groups, prune_ffn

        units = [Unit("ffn", g.up) for g in find_ffn_groups(model)[0]]
        units += [Unit("heads", b.out) for b in find_attention_blocks(model)[0]]

        def prune_transformer(ratios: Mapping[Unit, float]) -> PruneResult:
            ffn = {u.name: r for u, r in ratios.items() if u.kind == "ffn"}
            heads = {u.name: r for u, r in ratios.items() if u.kind == "heads"}
            result = prune_ffn(model, 0.0, batches, ratios=ffn) if ffn else PruneResult(model, "structured", (), ())
            if heads:
                more = prune_heads(result.model, 0.0, batches, ratios=heads)
                result = PruneResult(more.model, "structured", result.layers + more.layers, result.notes + more.notes)
            return result

        return units, prune_transformer
    from converters.pruning.cnn import ChannelPruner
    from converters.pruning.cnn_blocks import find_residual_blocks

    pruner = ChannelPruner(model, batches, joint=joint)

    def prune_cnn(ratios: Mapping[Unit, float]) -> PruneResult:
        channels = {u.name: r for u, r in ratios.items() if u.kind == "channels"}
        blocks = [u.name for u, r in sorted(ratios.items()) if u.kind == "blocks" and r >= 1.0]
        result = pruner.prune(0.0, channels, bypass=blocks)
        return PruneResult(result.model, "structured", result.layers, result.notes)

    units = [Unit("channels", name) for name in pruner.units]
    return units + [Unit("blocks", b.add) for b in find_residual_blocks(model)[0]], prune_cnn


def _budget_search(model: onnx.ModelProto, spec: PruneSpec, batches: Sequence[Feeds], metric: Metric,
                   baseline: float, steps: list[dict[str, Any]]) -> tuple[PruneResult, dict[str, Any]]:
    """The largest per-unit allocation within ``spec.budget`` points (see ``converters.pruning.allocation``);
    every measured step goes to ``steps``; the chosen allocation is returned for the report."""
    budget = float(spec.budget or 0.0)
    units, prune = allocation_units(model, batches, spec.joint)
    start = time.perf_counter()
    table = sensitivity(model, units, prune, batches, grids={"blocks": (1.0,)})
    path = greedy_path(table)
    macs = macs_per_sample(model, batches[0])

    def describe(result: PruneResult) -> dict[str, Any]:
        return {"macs_saved": 1.0 - macs_per_sample(result.model, batches[0]) / macs}

    result, allocation = search_path(path, prune, metric, baseline, budget, steps, describe)
    log.info("budget search within %s points: %d units pruned, in %.1f s", budget, len(allocation),
             time.perf_counter() - start)
    chosen = {"ratios": {str(u): r for u, r in sorted(allocation.items())},
              "step": path.index(allocation), "of": len(path), "units": len(units),
              "sensitivity": {str(u): [[p.ratio, p.distortion, p.saved] for p in points]
                              for u, points in table.items()}}
    return result, chosen


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
    chosen: dict[str, Any] = {}
    if spec.budget is not None:
        if metric is None or baseline is None:
            raise PruningError("a pruning budget needs validation data to measure accuracy on",
                               hint="pass validation=..., or prune with a fixed ratio")
        result, chosen = _budget_search(model, spec, batches, metric, baseline, steps)
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
        "chosen": chosen,
        "layers": list(result.layers), "notes": list(result.notes),
    }
    if result.method == "2:4":
        from converters.pruning.sparse24 import sparsity_record

        report.update(sparsity_record(result))
    log.info("pruning %s: %d -> %d parameters", result.method, report["params_before"], report["params_after"])
    return result.model, report

"""How much to prune where, under an accuracy budget: per-unit sensitivity, a greedy path, a search.

A uniform ratio prunes every layer alike, but layers differ widely: on EfficientNet-Lite0 the
1152-channel expansions of the last stage lose nothing at 75% while the 16-channel early
projection loses output fidelity at 12.5%. So the budget search allocates per *unit* (a CNN
channel group or residual block, a transformer FFN or attention block), in the manner of
sensitivity analysis:

1. **Sensitivity** (label-free, calibration data): each unit alone is pruned at every ratio of
   ``GRID`` (a residual block: removed), with the usual scoring and least-squares refit, and two
   things are measured: the *distortion*, the relative squared error of the model's outputs
   against the unpruned model, and the multiply-accumulates per sample it *saves*. MACs are
   deterministic, so the same model and data always give the same path; they undercount the
   memory-bound early, high-resolution layers of a CNN (on EfficientNet-Lite0 the 112x112
   expansion takes about twice its MAC share of the CPU time), which the greedy path then
   prunes a little later than their time alone would suggest.
2. **Greedy path**: starting from nothing pruned, repeatedly take the step (one unit, to a higher
   ratio of its grid) with the least added distortion per MAC saved. Distortions are treated as
   additive, which is the usual first-order assumption; the path is a list of allocations, each
   pruning more than the one before.
3. **Search** (labelled validation data): a bisection along the path for the last allocation
   whose measured accuracy stays within the budget. Only measured allocations are ever chosen,
   so the result never exceeds the budget on the validation data it was searched on.

The cost is one forward pass over the calibration data per unit and ratio, plus about
``log2(len(path))`` validation runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import onnx

from converters.ir import outputs_on
from converters.pruning.common import Feeds, PruneResult, macs_per_sample, relative_error
from edge_sdk.errors import PruningError

__all__ = ["GRID", "Unit", "Point", "sensitivity", "greedy_path", "search_path"]

log = logging.getLogger(__name__)

#: Ratios each unit is tried at, in eighths: coarse enough to keep the analysis cheap, fine
#: enough that the kept widths stay multiples of 8 on the wide layers.
GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
SENSITIVITY_BATCHES = 8  # of the calibration batches: 64 samples at the readers' batch size

Metric = Callable[[onnx.ModelProto], float]


@dataclass(frozen=True, order=True)
class Unit:
    """What one ratio applies to: a channel group, a residual block (ratio 1: bypassed), an FFN or an
    attention block, by name."""

    kind: str  # "channels" | "blocks" | "ffn" | "heads"
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


Allocation = dict[Unit, float]
Pruner = Callable[[Mapping[Unit, float]], PruneResult]  # per-unit ratios applied to the original model


@dataclass(frozen=True)
class Point:
    """One unit pruned alone at ``ratio``: output distortion and MACs per sample saved."""

    ratio: float
    distortion: float
    saved: float


def sensitivity(model: onnx.ModelProto, units: Sequence[Unit], prune: Pruner, batches: Sequence[Feeds],
                grid: Sequence[float] = GRID, cost: Callable[[onnx.ModelProto], float] | None = None,
                grids: Mapping[str, Sequence[float]] | None = None) -> dict[Unit, list[Point]]:
    """Per unit, one ``Point`` per ratio of ``grid`` (``grids[kind]`` for its kind; fewer when a ratio
    cannot be applied); ``saved`` is what ``cost`` (default: MACs per sample) falls by. The
    distortion is measured on at most ``SENSITIVITY_BATCHES`` batches."""
    batches = batches[:SENSITIVITY_BATCHES]
    reference = outputs_on(model, batches)
    if cost is None:
        cost = lambda m: macs_per_sample(m, batches[0])  # noqa: E731
    base = cost(model)
    table: dict[Unit, list[Point]] = {}
    for unit in units:
        points: list[Point] = []
        for ratio in (grids or {}).get(unit.kind, grid):
            try:
                pruned = prune({unit: ratio}).model
            except PruningError as exc:
                log.info("%s at ratio %s: %s", unit, ratio, exc.message)
                break
            saved = base - cost(pruned)
            if points and saved <= points[-1].saved:  # rounding to multiples of 8 gave the same width
                continue
            points.append(Point(ratio, relative_error(outputs_on(pruned, batches), reference), saved))
        table[unit] = points
        log.info("sensitivity %s: %s", unit, " ".join(f"{p.ratio}:{p.distortion:.2g}" for p in points))
    return table


def greedy_path(table: Mapping[Unit, Sequence[Point]]) -> list[Allocation]:
    """Allocations of growing size: each adds the step of least distortion per MAC saved (a step may
    jump several ratios of one unit, so a unit whose cost is not convex is not stuck)."""
    level = {unit: -1 for unit in table}
    path: list[Allocation] = []
    while True:
        best: tuple[tuple[float, float], Unit, int] | None = None
        for unit in sorted(table):
            points, at = table[unit], level[unit]
            d0, s0 = (0.0, 0) if at < 0 else (points[at].distortion, points[at].saved)
            for j in range(at + 1, len(points)):
                gain = points[j].saved - s0
                if gain <= 0:
                    continue
                key = (max(points[j].distortion - d0, 0.0) / gain, -gain)  # ties: the longer step
                if best is None or key < best[0]:
                    best = (key, unit, j)
        if best is None:
            return path
        level[best[1]] = best[2]
        path.append({u: table[u][i].ratio for u, i in level.items() if i >= 0})


def search_path(path: Sequence[Allocation], prune: Pruner, metric: Metric, baseline: float, budget: float,
                steps: list[dict[str, Any]], describe: Callable[[PruneResult], dict[str, Any]] | None = None,
                ) -> tuple[PruneResult, Allocation]:
    """The last allocation of ``path`` within ``budget`` points of ``baseline``, by bisection (the
    accuracy falls, if not strictly, along the path). Every measured step is appended to ``steps``."""
    if not path:
        raise PruningError("nothing to prune: no unit of this model can be pruned", hint="convert without prune")
    low, high = -1, len(path)  # path[low] is within the budget (-1: nothing pruned), path[high] is not
    found: tuple[PruneResult, Allocation] | None = None
    while high - low > 1:
        mid = (low + high) // 2
        result = prune(path[mid])
        score = metric(result.model)
        drop = baseline - score
        steps.append({"kind": "allocation", "step": mid, "of": len(path), "units": len(path[mid]),
                      "metric": score, "drop": drop, **(describe(result) if describe else {})})
        log.info("allocation step %d/%d (%d units): %.2f points (drop %.2f)", mid, len(path), len(path[mid]),
                 score, drop)
        if drop <= budget:
            low, found = mid, (result, path[mid])
        else:
            high = mid
    if found is None:
        least = ", ".join(f"{unit} {ratio}" for unit, ratio in path[0].items())
        raise PruningError(f"no pruning stays within {budget} points: even the least ({least}) costs more",
                           hint="raise the budget or convert without prune")
    return found

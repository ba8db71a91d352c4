"""Parity before serving: a backend must reproduce the package's golden outputs before it serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_sdk.errors import InferenceError, PackageIntegrityError
from runtime.package import Package
from runtime.runners.base import Runner

log = logging.getLogger(__name__)

#: Largest difference allowed per precision, as a share of the largest reference output, or absolute
#: when every output is below 1 (the divisor is ``max(1, largest |output|)``: probabilities and
#: small logits are not judged on a scale that makes rounding noise look large).
#: Integer kernels round differently across instruction sets and TensorRT tactics.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}


@dataclass(frozen=True)
class Parity:
    """How closely a backend reproduces the package's golden outputs of one graph."""

    samples: int
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_parity(package: Package, runner: Runner, graph: str, precision: str | None = None,
                 tolerance: float | None = None) -> Parity:
    """Run the golden feeds on ``runner`` and compare with the stored outputs of ``graph``; raise on mismatch.

    ``precision`` is what the runner computes in ("fp32", "fp16", "int8"; default: the graph's): an fp16
    engine built from the fp32 graph is judged against the fp32 golden outputs with the fp16 tolerance."""
    precision = precision or ("fp32" if graph == "fp32" else "int8")
    if precision not in TOLERANCE:
        raise InferenceError(f"precision {precision!r} has no parity tolerance; expected one of {list(TOLERANCE)}")
    limit = TOLERANCE[precision] if tolerance is None else tolerance
    inputs, expected = package.golden(graph)
    if not inputs or not expected:
        raise PackageIntegrityError(f"package {package.manifest.name} has no golden vectors for its {graph} graph")
    got = runner.infer(inputs)
    worst = 0.0
    for name, ref in expected.items():
        if name not in got or got[name].shape != ref.shape:
            raise InferenceError(f"golden output {name!r} is missing or has another shape on {runner.backend}")
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, float(np.abs(got[name].astype(np.float64) - ref).max()) / scale)
    parity = Parity(samples=len(next(iter(inputs.values()))), max_abs_diff=worst, tolerance=limit)
    if not parity.ok:
        raise InferenceError(
            f"{runner.backend} output ({precision} on the {graph} graph) differs from the package's golden outputs "
            f"by {worst:.3g} "
            f"(tolerance {limit:g}); refusing to serve it",
            hint="re-convert the package or select another backend",
        )
    log.info("parity on %s (%s on %s): %d samples, max relative diff %.2e", runner.backend, precision, graph,
             parity.samples, worst)
    return parity

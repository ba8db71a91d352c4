"""The conversion report: what was built, from what, and how well it does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from converters.evaluate import Evaluation


@dataclass(frozen=True)
class ConversionReport:
    package: str
    name: str
    task: str
    precision: str
    labels: tuple[str, ...]
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    golden_samples: int
    seconds: float
    validation: Evaluation | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "name": self.name,
            "task": self.task,
            "precision": self.precision,
            "labels": list(self.labels),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "golden_samples": self.golden_samples,
            "seconds": round(self.seconds, 3),
            "validation": self.validation.to_dict() if self.validation else None,
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """Human-readable summary for the CLI."""
        out = [
            f"package: {self.package}",
            f"model: {self.name} ({self.task}, {self.precision}, {len(self.labels)} labels)",
            f"golden vectors: {self.golden_samples}",
        ]
        if self.validation:
            v = self.validation
            out.append(f"validation: accuracy {v.accuracy:.3f} on {v.samples} samples ({v.backend}), "
                       f"median {v.median_latency_ms:.2f} ms/sample")
        out.extend(f"note: {n}" for n in self.notes)
        out.append(f"converted in {self.seconds:.1f} s")
        return out

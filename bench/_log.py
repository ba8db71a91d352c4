"""Progress lines for the benchmarks: ``[name  12.3s] message``, seconds since the bench started."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Log:
    """``log = Log("prune")``; ``log("message")`` prints a progress line, ``log.elapsed()`` the seconds so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.name} {self.elapsed():6.1f}s] {message}", flush=True)


    def write(self, results: dict[str, Any], out: Path) -> None:
        """Record the wall time in ``results`` and write them to ``out`` as JSON."""
        results["wall_s"] = self.elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        self(f"wrote {out}; wall time {results['wall_s']:.0f} s")

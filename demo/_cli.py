"""The shared command line of the demo model builders: build once, reuse while build_info.json exists."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

INFO = "build_info.json"


def run_demo(description: str, run: Callable[[Path], None], argv: list[str] | None = None) -> int:
    """Parse ``--build``, call ``run(build)``; an SDK error is printed as ``demo: error: ...`` and exits 1."""
    from edge_sdk.errors import EdgeSDKError

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--build", type=Path, default=Path("build/demo"), help="where the demo models were built")
    args = parser.parse_args(argv)
    try:
        run(args.build)
    except EdgeSDKError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_build(description: str, build: Callable[[Path], dict[str, Any]], log: Callable[[str], None],
              argv: list[str] | None = None) -> int:
    """Parse ``--out``/``--force``; call ``build(out)`` unless a finished build is there; write its info last."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    info_path = args.out / INFO
    if info_path.exists() and not args.force:
        log(f"already built ({info_path} exists); use --force to rebuild")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    info_path.unlink(missing_ok=True)  # a build that stops half-way must not count as finished
    info = build(args.out)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"done in {info['build_seconds']} s -> {args.out}")
    return 0

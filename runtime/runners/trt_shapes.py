"""Which optimization profile runs a set of input shapes, and how a batch no profile holds is split.

An engine built with several profiles (text: sequence 1-32, 33-64, 65-128) runs a shape only
in a profile whose [min, max] range holds it, and only after the execution context switched to
that profile. A batch larger than every profile's largest batch (``predict_batch`` of 64 on a
profile of max 32), or a DLA engine's fixed batch, is run in chunks along axis 0; a last chunk
smaller than any profile admits is padded with copies of its last sample, whose outputs are
dropped. Pure functions of shapes: property-tested without TensorRT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

Shape = tuple[int, ...]
ProfileShapes = Mapping[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)
Shapes = Mapping[str, Shape]


def fits(profile: ProfileShapes, shapes: Shapes) -> bool:
    """Every input shape lies within the profile's [min, max] on every axis."""
    for name, shape in shapes.items():
        if name not in profile:
            continue  # an input with a static shape has no range to check
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            return False
    return True


def choose_profile(profiles: Sequence[ProfileShapes], shapes: Shapes) -> int | None:
    """The profile that holds ``shapes`` with the smallest max volume (its kernels were tuned closest),
    the lowest index on ties; None when none holds them."""
    best: tuple[int, int] | None = None
    for index, profile in enumerate(profiles):
        if fits(profile, shapes):
            volume = sum(math.prod(profile[n][2]) for n in shapes if n in profile)
            if best is None or volume < best[0]:
                best = (volume, index)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Chunk:
    """Samples ``start:stop`` run as a batch of ``batch`` (``batch - (stop - start)`` padded) in ``profile``."""

    start: int
    stop: int
    batch: int
    profile: int


def _with_batch(shapes: Shapes, batch: int) -> dict[str, Shape]:
    return {name: (batch, *shape[1:]) for name, shape in shapes.items()}


def _batches(profiles: Sequence[ProfileShapes], shapes: Shapes) -> list[int]:
    """Every batch size some profile admits for these per-sample shapes, ascending."""
    sizes: set[int] = set()
    for profile in profiles:
        ranges = [(profile[n][0][0], profile[n][2][0]) for n in shapes if n in profile]
        lo = max((a for a, _ in ranges), default=1)
        hi = min((b for _, b in ranges), default=0)
        sizes.update(b for b in range(lo, hi + 1) if fits(profile, _with_batch(shapes, b)))
    return sorted(sizes)


def plan_chunks(profiles: Sequence[ProfileShapes], shapes: Shapes, batched: bool) -> list[Chunk] | None:
    """How to run ``shapes``: one chunk when a profile holds them, else (``batched``: axis 0 is every
    input's and output's batch) chunks of the largest admitted batch, the last padded up to the
    smallest admitted batch that holds it. None when no plan exists."""
    whole = choose_profile(profiles, shapes)
    total = next(iter(shapes.values()))[0] if shapes else 0
    if whole is not None:
        return [Chunk(0, total, total, whole)]
    if not batched or total == 0:
        return None
    sizes = _batches(profiles, shapes)
    if not sizes:
        return None
    largest = sizes[-1]
    chunks = []
    for start in range(0, total, largest):
        stop = min(start + largest, total)
        batch = next(b for b in sizes if b >= stop - start)
        profile = choose_profile(profiles, _with_batch(shapes, batch))
        assert profile is not None  # batch is admitted by construction
        chunks.append(Chunk(start, stop, batch, profile))
    return chunks


def describe(profiles: Sequence[ProfileShapes]) -> str:
    """``profile 0: input_ids 1x1..16x32; profile 1: ...`` for error messages."""
    def span(lo: Shape, hi: Shape) -> str:
        return f"{'x'.join(map(str, lo))}..{'x'.join(map(str, hi))}"

    return "; ".join(f"profile {i}: " + ", ".join(f"{n} {span(t[0], t[2])}" for n, t in p.items())
                     for i, p in enumerate(profiles))

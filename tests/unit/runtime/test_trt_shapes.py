"""Profile choice, batch chunking and engine specs: properties over generated shapes and specs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from converters.engine import profiles_for
from edge_sdk.errors import PackageError
from runtime.engine_spec import EngineSpec, engine_candidates
from runtime.manifest import TensorSpec
from runtime.runners.trt_shapes import choose_profile, fits, plan_chunks

TEXT = [TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("attention_mask", "int64", ("batch", "seq"))]


@st.composite
def text_profiles(draw: st.DrawFn) -> tuple:
    buckets = sorted(draw(st.sets(st.integers(1, 256), min_size=1, max_size=4)))
    lo = draw(st.integers(1, 8))
    hi = draw(st.integers(lo, 64))
    return tuple(p.shapes for p in profiles_for(TEXT, (lo, lo, hi), buckets)), (lo, hi), buckets


@settings(max_examples=200, deadline=None)
@given(text_profiles(), st.integers(1, 200), st.integers(1, 300))
def test_the_chosen_profile_holds_the_shapes_and_is_the_tightest(made: tuple, batch: int, length: int) -> None:
    profiles, (lo, hi), buckets = made
    shapes = {"input_ids": (batch, length), "attention_mask": (batch, length)}
    chosen = choose_profile(profiles, shapes)
    holders = [i for i, p in enumerate(profiles) if fits(p, shapes)]
    if not holders:
        assert chosen is None
        return
    assert chosen in holders
    assert length <= buckets[chosen] and (chosen == 0 or length > buckets[chosen - 1])  # the bucket it falls in


@settings(max_examples=200, deadline=None)
@given(text_profiles(), st.integers(1, 200), st.integers(1, 300))
def test_chunks_cover_every_sample_once_in_profiles_that_hold_them(made: tuple, batch: int, length: int) -> None:
    profiles, (lo, hi), buckets = made
    shapes = {"input_ids": (batch, length), "attention_mask": (batch, length)}
    chunks = plan_chunks(profiles, shapes, batched=True)
    if length > buckets[-1]:
        assert chunks is None  # no split along the batch can shorten a text
        return
    assert chunks is not None
    assert [c.start for c in chunks] == [0, *[c.stop for c in chunks[:-1]]] and chunks[-1].stop == batch
    for c in chunks:
        assert lo <= c.batch <= hi and c.batch >= c.stop - c.start
        assert fits(profiles[c.profile], {n: (c.batch, length) for n in shapes})
    assert all(c.stop - c.start == hi for c in chunks[:-1])  # full chunks run at the largest batch
    assert plan_chunks(profiles, shapes, batched=False) in (None, chunks if len(chunks) == 1 and
                                                            chunks[0].batch == batch else None)


@st.composite
def specs(draw: st.DrawFn) -> EngineSpec:
    device = draw(st.sampled_from(["sm87-trt10.3.0", "sm72-trt8.5.2", "sm89-trt10.7.0", "smnone-trtnone"]))
    dla = draw(st.sampled_from([None, 0, 1]))
    graph, precision = draw(st.sampled_from(
        [("s8s8", "int8"), ("fp32", "fp16"), ("fp32", "fp32")] if dla is None else [("fp32", "int8"), ("fp32", "fp16")]))
    return EngineSpec(device, graph, precision, dla)


@given(st.lists(specs(), min_size=2, max_size=6, unique=True))
def test_distinct_specs_have_distinct_names_and_round_trip_through_entries(made: list[EngineSpec]) -> None:
    assert len({s.name for s in made}) == len(made)
    for spec in made:
        assert EngineSpec.from_entry(spec.to_dict()) == spec
        assert spec.key == spec.device + ("" if spec.dla_core is None else f"-dla{spec.dla_core}")


@given(st.frozensets(st.sampled_from(["u8s8", "u8s7", "s8s8"])), st.booleans(), st.sampled_from([None, 0, 1]),
       st.sampled_from(["auto", "int8", "fp16", "fp32"]))
def test_candidates_serve_exactly_the_precision_asked(graphs: frozenset, calibrated: bool, dla: int | None,
                                                      precision: str) -> None:
    found = engine_candidates("sm87-trt10.3.0", graphs, precision, calibrated, dla)
    assert all(s.dla_core == dla for s in found)
    if precision != "auto":
        assert all(s.precision == precision for s in found)
    order = ["int8", "fp16", "fp32"]
    assert [s.precision for s in found] == sorted((s.precision for s in found), key=order.index)
    if "s8s8" in graphs and dla is None and precision in ("auto", "int8"):
        assert found[0] == EngineSpec("sm87-trt10.3.0", "s8s8", "int8")
    if dla is not None:
        assert all(s.precision != "fp32" for s in found)


def test_a_spec_that_is_no_engine_is_refused() -> None:
    for args in (("sm87-trt10.3.0-dla0", "fp32", "fp16"), ("../x", "fp32", "fp16"), ("sm87-trt10.3.0", "u8s8", "int8")):
        try:
            EngineSpec(*args)
        except PackageError:
            continue
        raise AssertionError(f"{args} was accepted")

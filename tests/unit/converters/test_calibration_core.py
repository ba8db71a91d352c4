"""Calibration core: the streaming histogram, the range methods and the quantization schemes."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from converters.calibration.histogram import MIN_BOUND, HistogramCollector, TensorHistogram
from converters.calibration.methods import (
    CalibrationMethod,
    amax_entropy,
    amax_minmax,
    amax_mse,
    amax_percentile,
    choose_range,
    quantization_error,
    range_affine,
)
from converters.calibration.schemes import (
    MIN_SCALE,
    QuantParams,
    Scheme,
    affine_params,
    dequantize,
    per_channel_weight_params,
    quantize,
    symmetric_params,
)
from edge_sdk.errors import CalibrationError

METHODS = ("minmax", "percentile", "entropy", "mse")


def histogram_of(*batches: np.ndarray, num_bins: int = 2048) -> TensorHistogram:
    collector = HistogramCollector(num_bins)
    for batch in batches:
        collector.update("t", batch)
    return collector.histograms()["t"]


def abs_histogram(abs_counts: np.ndarray) -> TensorHistogram:
    """A histogram with the given |x| counts (all positive), one unit per bin."""
    n = abs_counts.size
    counts = np.concatenate([np.zeros(n, np.int64), abs_counts.astype(np.int64)])
    return TensorHistogram("t", counts, float(n), 0.0, float(n), int(abs_counts.sum()), 0, 0)


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def uniform(rng: np.random.Generator) -> TensorHistogram:
    return histogram_of(rng.uniform(-2.0, 2.0, 200_000))


@pytest.fixture(scope="module")
def gaussian_outliers(rng: np.random.Generator) -> TensorHistogram:
    return histogram_of(np.concatenate([rng.normal(size=200_000), [20.0, -18.0]]))


@pytest.fixture(scope="module")
def laplace(rng: np.random.Generator) -> TensorHistogram:
    return histogram_of(rng.laplace(size=200_000))


# ---- collector ----------------------------------------------------------------------------


def test_known_data_gives_exact_min_max_and_counts() -> None:
    h = histogram_of(np.array([-3.0, 1.0, 2.5, 0.0]), num_bins=8)
    assert (h.min, h.max, h.count, h.bound, h.num_bins) == (-3.0, 2.5, 4, 3.0, 8)
    assert h.counts.sum() == 4 and h.abs_counts().sum() == 4 and h.edges[[0, -1]].tolist() == [-3.0, 3.0]
    assert amax_minmax(h) == 3.0


def test_streaming_equals_one_shot_when_the_first_batch_holds_the_max(rng: np.random.Generator) -> None:
    data = rng.normal(size=30_000)
    data[0] = 7.0
    streamed = histogram_of(*np.array_split(data, 5))
    one_shot = histogram_of(data)
    assert streamed.bound == one_shot.bound == 7.0
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)


def test_growth_merges_bins_exactly_except_at_the_old_bound(rng: np.random.Generator) -> None:
    first = np.concatenate([rng.uniform(-1, 1, 5_000), [1.0]])
    second = np.concatenate([rng.uniform(-4, 4, 5_000), [4.0]])
    streamed, one_shot = histogram_of(first, second), histogram_of(np.concatenate([first, second]))
    assert streamed.bound == one_shot.bound == 4.0 and streamed.count == one_shot.count == 10_002
    # The one value at the old closed top edge (1.0) sits one bin lower; everything else is identical.
    moved = np.flatnonzero(streamed.counts != one_shot.counts)
    assert (moved[1] - moved[0], (streamed.counts - one_shot.counts)[moved].tolist()) == (1, [1, -1])
    assert one_shot.edges[moved[1]] == 1.0


def test_growth_by_many_doublings_matches_one_shot_within_a_bin(rng: np.random.Generator) -> None:
    batches = [rng.normal(scale=s, size=20_000) for s in (0.01, 1.0, 37.0)]
    streamed, one_shot = histogram_of(*batches), histogram_of(np.concatenate(batches))
    assert streamed.counts.sum() == one_shot.counts.sum() == 60_000
    assert one_shot.bound <= streamed.bound < 2 * one_shot.bound
    for p in (50.0, 90.0, 99.0, 99.99):
        assert abs(amax_percentile(streamed, p) - amax_percentile(one_shot, p)) <= streamed.bin_width


def test_nan_and_inf_are_counted_and_left_out() -> None:
    collector = HistogramCollector(16)
    collector.update("t", np.array([np.nan, np.nan]))
    collector.update("t", np.array([np.inf, -np.inf, 1.0, -2.0, np.nan], np.float32))
    h = collector.histograms()["t"]
    assert (h.nan_count, h.inf_count, h.count, int(h.counts.sum())) == (3, 2, 2, 2)
    assert (h.min, h.max, h.bound) == (-2.0, 1.0, 2.0)


def test_a_tensor_without_finite_values_is_reported_by_name() -> None:
    h = histogram_of(np.array([np.nan, np.inf]), np.zeros(0))
    assert h.count == 0 and math.isnan(h.min) and h.bound == MIN_BOUND
    with pytest.raises(CalibrationError, match=r"tensor 't' had no finite values \(1 NaN, 1 inf\)"):
        choose_range(h, CalibrationMethod.ENTROPY, Scheme.LINEAR)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheme", ["linear", "affine"])
def test_all_zero_tensor_gets_a_usable_range(method: str, scheme: str) -> None:
    h = histogram_of(np.zeros((4, 8), np.float32))
    assert h.bound > 0 and h.counts[h.num_bins] == 32
    params = choose_range(h, method, scheme).params()
    assert float(params.scale) >= MIN_SCALE and dequantize(quantize(np.zeros(3), params), params).tolist() == [0.0] * 3


def test_constant_tensor_ranges() -> None:
    h = histogram_of(np.full(1000, 5.0))
    assert amax_minmax(h) == 5.0 and range_affine(h, CalibrationMethod.MINMAX) == (0.0, 5.0)
    for amax in (amax_percentile(h), amax_entropy(h), amax_mse(h)):
        assert 5.0 - h.bin_width <= amax <= 5.0


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_tiny_and_huge_ranges_scale_with_the_data(rng: np.random.Generator, magnitude: float) -> None:
    data = rng.normal(size=20_000).astype(np.float32)
    base, scaled = histogram_of(data), histogram_of(data.astype(np.float64) * magnitude)
    np.testing.assert_allclose(amax_minmax(scaled) / magnitude, amax_minmax(base), rtol=1e-12)
    for method in (amax_percentile, amax_entropy, amax_mse):
        assert abs(method(scaled) / magnitude - method(base)) <= 2 * base.bin_width
    params = symmetric_params(amax_percentile(scaled))
    x = data[:100].astype(np.float64) * magnitude
    assert np.all(np.abs(dequantize(quantize(x, params), params) - x) <= float(params.scale) * 0.51 + np.abs(x) * 1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.uint8, np.bool_])
def test_other_input_dtypes_are_binned_as_floats(dtype: type) -> None:
    h = histogram_of(np.array([0, 1, 1, 0], dtype=dtype))
    assert (h.count, h.max, h.min) == (4, 1.0, 0.0)


def test_bad_inputs_raise_calibration_errors() -> None:
    with pytest.raises(CalibrationError, match="num_bins=7"):
        HistogramCollector(7)
    with pytest.raises(CalibrationError, match="dtype complex128; expected real numbers"):
        HistogramCollector().update("c", np.ones(3, complex))
    collector = HistogramCollector()
    collector.update("big", np.array([1.0]))
    with pytest.raises(CalibrationError, match="values up to 1.7e\\+308; the histogram bound overflows float64"):
        collector.update("big", np.array([1.7e308]))
    assert collector.histograms()["big"].count == 1  # the failed batch left no trace
    with pytest.raises(CalibrationError, match=r"'median' is unknown; expected one of 'entropy', 'percentile'"):
        CalibrationMethod.parse("median")
    with pytest.raises(CalibrationError, match=r"'bilinear' is unknown; expected one of 'linear', 'affine'"):
        Scheme.parse("bilinear")
    h = histogram_of(np.arange(10.0))
    with pytest.raises(CalibrationError, match="percentile 0 is not in"):
        amax_percentile(h, 0)
    with pytest.raises(CalibrationError, match="does not fit scheme 'linear'"):
        quantization_error(h, (0.0, 1.0), Scheme.LINEAR)
    with pytest.raises(CalibrationError, match="does not take AUTO"):
        range_affine(h, CalibrationMethod.AUTO)


# ---- range methods ------------------------------------------------------------------------


@pytest.mark.parametrize("p", [90.0, 99.99])
def test_percentile_of_uniform_is_p_times_max(uniform: TensorHistogram, p: float) -> None:
    assert abs(amax_percentile(uniform, p) - p / 100 * uniform.max_abs) <= uniform.bin_width


def test_entropy_clips_far_outliers_of_a_gaussian(gaussian_outliers: TensorHistogram) -> None:
    amax = amax_entropy(gaussian_outliers)
    assert 3.0 < amax < 0.3 * gaussian_outliers.max_abs


def test_entropy_keeps_the_whole_range_of_uniform_data(uniform: TensorHistogram) -> None:
    assert uniform.max_abs - amax_entropy(uniform) <= uniform.bin_width


def _entropy_loop(hist: np.ndarray, num_quant_bins: int, smoothing: float = 1e-4) -> int:
    """The textbook per-candidate loop (expanded P and Q), for comparison."""
    divergences = []
    for i in range(num_quant_bins, hist.size + 1):
        p = hist[:i].astype(float)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        edges = [-(-g * i // num_quant_bins) for g in range(num_quant_bins + 1)]
        for a, b in zip(edges[:-1], edges[1:]):
            nonzero = p[a:b] != 0
            q[a:b][nonzero] = hist[a:b].sum() / max(nonzero.sum(), 1)
        q = (1 - smoothing) * q / max(q.sum(), 1e-300) + smoothing / i
        p /= p.sum()
        divergences.append(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0])))
    return num_quant_bins + int(np.argmin(divergences))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_vectorised_entropy_matches_the_textbook_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.minimum(np.abs(rng.standard_t(3, 20_000)) * 12, 199).astype(int), minlength=200)
    counts[rng.integers(0, 200, 15)] = 0  # empty bins, including in the tail
    assert amax_entropy(abs_histogram(counts), num_quant_bins=16) == _entropy_loop(counts, 16)


def test_entropy_on_2048_bins_is_fast(gaussian_outliers: TensorHistogram) -> None:
    start = time.perf_counter()
    amax_entropy(gaussian_outliers)
    assert time.perf_counter() - start < 0.5


def test_mse_keeps_uniform_near_max_and_clips_laplace(uniform: TensorHistogram, laplace: TensorHistogram) -> None:
    assert amax_mse(uniform) >= 0.98 * uniform.max_abs
    assert amax_mse(laplace) < 0.9 * laplace.max_abs
    grid = np.linspace(0.3, 1.0, 30) * laplace.max_abs
    assert quantization_error(laplace, amax_mse(laplace), Scheme.LINEAR) <= min(
        quantization_error(laplace, float(a), Scheme.LINEAR) for a in grid
    )


@pytest.mark.parametrize("scheme", [Scheme.LINEAR, Scheme.AFFINE])
@pytest.mark.parametrize("fixture", ["uniform", "gaussian_outliers", "laplace"])
def test_auto_picks_the_least_error(fixture: str, scheme: Scheme, request: pytest.FixtureRequest) -> None:
    h = request.getfixturevalue(fixture)
    chosen = choose_range(h, "auto", scheme)
    errors = {m: choose_range(h, m, scheme).error for m in METHODS}
    assert chosen.error == min(errors.values()) and errors[chosen.method.value] == chosen.error
    assert all(chosen.error <= e for e in errors.values())


@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_affine_range_of_relu_output_starts_at_zero(rng: np.random.Generator, method: str) -> None:
    h = histogram_of(np.maximum(rng.normal(size=50_000), 0.0))
    r = choose_range(h, method, Scheme.AFFINE)
    assert r.lo == 0.0 and 0 < r.hi <= h.max and r.params().zero_point == 0


def test_affine_minmax_and_percentile(gaussian_outliers: TensorHistogram) -> None:
    h = gaussian_outliers
    assert range_affine(h, CalibrationMethod.MINMAX) == (-18.0, 20.0)
    lo, hi = range_affine(h, CalibrationMethod.PERCENTILE, percentile=99.0)
    assert abs(lo + 2.326) < 0.05 and abs(hi - 2.326) < 0.05  # the 1% and 99% quantiles of N(0, 1)
    lo, hi = range_affine(h, CalibrationMethod.MSE)
    assert -18.0 < lo < 0 < hi < 20.0


# ---- schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [symmetric_params(3.0), affine_params(-1.3, 4.1)])
def test_round_trip_error_is_half_a_step_inside_the_range(params: QuantParams) -> None:
    x = np.linspace(-1.3, 3.0, 10_001)
    error = np.abs(dequantize(quantize(x, params), params) - x)
    assert error.max() <= float(params.scale) / 2 * (1 + 1e-5)


def test_values_outside_the_range_saturate() -> None:
    x = np.array([-1e9, -5.0, 5.0, 1e9, np.inf, -np.inf])
    assert quantize(x, symmetric_params(1.0)).tolist() == [-128, -128, 127, 127, 127, -128]  # ONNX int8 limits
    assert quantize(x, affine_params(-1.0, 1.0)).tolist() == [0, 0, 255, 255, 255, 0]


def test_affine_zero_is_exact_and_the_zero_point_an_integer() -> None:
    params = affine_params(-0.37, 1.91)
    assert params.dtype == "uint8" and params.zero_point.dtype == np.uint8 and 0 <= int(params.zero_point) <= 255
    assert dequantize(quantize(np.zeros(1), params), params)[0] == 0.0
    with pytest.raises(CalibrationError, match=r"range \[0.5, 2.0\] is not finite with lo <= 0 <= hi"):
        affine_params(0.5, 2.0)
    with pytest.raises(CalibrationError, match="amax 0.0 is not finite and positive"):
        symmetric_params(0.0)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_weights(rng: np.random.Generator, axis: int) -> None:
    w = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)
    np.moveaxis(w, axis, 0)[1] = 0.0  # one all-zero channel
    params = per_channel_weight_params(w, axis)
    channels = w.shape[axis]
    assert params.scale.shape == params.zero_point.shape == (channels,) and params.axis == axis % w.ndim
    np.testing.assert_allclose(params.scale[[0, 2]], np.abs(np.moveaxis(w, axis, 0)[[0, 2]]).max(axis=(1, 2, 3)) / 127)
    assert params.scale[1] == np.float32(MIN_SCALE)
    restored = dequantize(quantize(w, params), params)
    assert np.all(np.moveaxis(restored, axis, 0)[1] == 0.0)
    step = params.scale.reshape([-1 if i == axis % w.ndim else 1 for i in range(w.ndim)])
    assert np.all(np.abs(restored - w) <= step / 2 * (1 + 1e-5))
    with pytest.raises(CalibrationError, match="axis 4 is out of range"):
        per_channel_weight_params(w, 4)


def _onnxruntime_qdq(x: np.ndarray, params: QuantParams) -> tuple[np.ndarray, np.ndarray]:
    """Run QuantizeLinear -> DequantizeLinear with ``params`` in onnxruntime."""
    zp_type = TensorProto.INT8 if params.dtype == "int8" else TensorProto.UINT8
    attrs: dict[str, Any] = {} if params.axis is None else {"axis": params.axis}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zp_type, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [onnx.numpy_helper.from_array(params.scale, "s"), onnx.numpy_helper.from_array(params.zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = session.run(["q", "y"], {"x": x})
    return q, y


@pytest.mark.parametrize(
    "params",
    [symmetric_params(1.27), symmetric_params(2.0**-3 * 127), affine_params(-0.83, 2.9), affine_params(-1.0, 254.0)],
    ids=["int8", "int8-ties", "uint8", "uint8-ties"],
)
def test_quantize_matches_onnxruntime_per_tensor(rng: np.random.Generator, params: QuantParams) -> None:
    scale = float(params.scale)
    ties = (np.arange(-300, 300) + 0.5) * scale  # exact halves: round half to even
    x = np.concatenate([rng.uniform(-400 * scale, 400 * scale, 4000), ties]).astype(np.float32).reshape(4, -1)
    q, y = _onnxruntime_qdq(x, params)
    np.testing.assert_array_equal(quantize(x, params), q)
    np.testing.assert_array_equal(dequantize(q, params), y)


def test_quantize_matches_onnxruntime_per_axis(rng: np.random.Generator) -> None:
    w = (rng.normal(size=(2, 6, 3, 3)) * np.array([1, 1e-3, 0, 10, 2, 0.5])[None, :, None, None]).astype(np.float32)
    params = per_channel_weight_params(w, axis=1)
    x = (w * 1.5).astype(np.float32)  # half of each channel beyond its range: saturation too
    q, y = _onnxruntime_qdq(x, params)
    np.testing.assert_array_equal(quantize(x, params), q)
    np.testing.assert_array_equal(dequantize(q, params), y)


def test_entropy_never_clips_a_mass_that_sits_far_from_zero() -> None:
    # Pooled activations live in a narrow band away from zero; plain KL picks the smallest
    # candidate there (everything clipped into one spike). The guard keeps >= 99% unclipped.
    collector = HistogramCollector()
    collector.update("pool", np.random.default_rng(0).uniform(5.0, 6.0, 20_000))
    h = collector.histograms()["pool"]
    amax = amax_entropy(h)
    assert np.mean(np.random.default_rng(0).uniform(5.0, 6.0, 20_000) > amax) <= 0.011
    assert amax >= 5.9


def test_large_batches_are_binned_on_a_subset_with_exact_extremes() -> None:
    from converters.calibration.histogram import MAX_BINNED_PER_BATCH

    values = np.random.default_rng(5).normal(0, 1, 3 * MAX_BINNED_PER_BATCH).astype(np.float32)
    values[123] = 9.5  # an extreme the strided subset skips
    collector = HistogramCollector()
    collector.update("big", values)
    h = collector.histograms()["big"]
    assert h.max == pytest.approx(9.5) and h.count == values.size
    assert amax_minmax(h) == pytest.approx(9.5)
    binned = int(h.counts.sum())
    assert MAX_BINNED_PER_BATCH // 2 < binned <= MAX_BINNED_PER_BATCH
    assert amax_percentile(h, 99.0) == pytest.approx(np.percentile(np.abs(values), 99.0), rel=0.02)

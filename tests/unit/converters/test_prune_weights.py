"""Unstructured and 2:4 weight pruning on tiny onnx.helper graphs, run with onnxruntime CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.pruning.common import input_norms, nonzero_params, params, weighted_nodes
from converters.pruning.sparse24 import check_2_4, prune_2_4, sparsity_record
from converters.pruning.weights import prune_weights
from edge_sdk.errors import PruningError


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture
def mlp() -> onnx.ModelProto:
    """x[B,64] -> MatMul W1[64,32] -> Relu -> Gemm(transB) W2[48,32] -> MatMul W3[48,6] (small)."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(64, 32)), "W2": rng.normal(size=(48, 32)) * 0.1,
             "b2": rng.normal(size=(48,)), "W3": rng.normal(size=(48, 6))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="fc2", transB=1),
             helper.make_node("MatMul", ["h2", "W3"], ["y"], name="head")]
    return _model(nodes, inits, [_info("x", ["B", 64])], [_info("y", ["B", 6])])


@pytest.fixture
def conv() -> onnx.ModelProto:
    """x[1,8,6,6] -> Conv W[16,8,3,3] -> y; and a Conv with 6 input channels fed by a second input."""
    rng = np.random.default_rng(1)
    inits = {"Wc": rng.normal(size=(16, 8, 3, 3)), "Wd": rng.normal(size=(32, 6, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["z", "Wd"], ["v"], name="conv6")]
    return _model(nodes, inits, [_info("x", [1, 8, 6, 6]), _info("z", [1, 6, 5, 5])],
                  [_info("y", [1, 16, 6, 6]), _info("v", [1, 32, 3, 3])])


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _batches(scale: np.ndarray | None = None, n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(4, 64)).astype(np.float32) for _ in range(n)]
    return [{"x": x * scale.astype(np.float32) if scale is not None else x} for x in xs]


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_magnitude_reaches_sparsity_per_layer_and_prunes_smallest(mlp, norm):
    result = prune_weights(mlp, 0.6, norm=norm, min_params=300)
    assert [r["node"] for r in result.layers] == ["fc1", "fc2"]
    for record, name in zip(result.layers, ["W1", "W2"]):
        before, after = _weight(mlp, name), _weight(result.model, name)
        zeros = after.size - np.count_nonzero(after)
        assert abs(zeros - 0.6 * after.size) <= 1
        assert record["after"] == np.count_nonzero(after) and record["before"] == after.size
        pruned = np.abs(before[after == 0])
        kept = np.abs(before[after != 0])
        assert pruned.max() <= kept.min()
        np.testing.assert_array_equal(after[after != 0], before[after != 0])
    assert nonzero_params(result.model) < nonzero_params(mlp)
    assert params(result.model) == params(mlp)


def test_global_scope_uses_normalized_scores(mlp):
    result = prune_weights(mlp, 0.5, scope="global", min_params=300)
    w1, w2 = _weight(result.model, "W1"), _weight(result.model, "W2")
    total = w1.size + w2.size
    zeros = total - np.count_nonzero(w1) - np.count_nonzero(w2)
    assert abs(zeros - 0.5 * total) <= 1
    # W2 is 10x smaller than W1: a raw global threshold would wipe most of it; normalized does not.
    for w in (w1, w2):
        assert 0.3 < 1 - np.count_nonzero(w) / w.size < 0.7
    raw = np.abs(np.concatenate([_weight(mlp, "W1").ravel(), _weight(mlp, "W2").ravel()]))
    raw_threshold = np.sort(raw)[total // 2]
    assert (np.abs(_weight(mlp, "W2")) < raw_threshold).mean() > 0.9


def test_activation_aware_differs_from_magnitude(mlp):
    scale = np.ones(64)
    scale[:8] = 50.0  # a few loud input channels
    batches = _batches(scale)
    norms = input_norms(mlp, batches, [n for n, _, _ in weighted_nodes(mlp)])
    assert norms["fc1"].shape == (64,) and norms["fc1"][:8].min() > 10 * norms["fc1"][8:].max()
    assert norms["fc2"].shape == (32,)
    magnitude = prune_weights(mlp, 0.5, min_params=300)
    activation = prune_weights(mlp, 0.5, method="activation", batches=batches, min_params=300)
    w_mag, w_act = _weight(magnitude.model, "W1"), _weight(activation.model, "W1")
    assert not np.array_equal(w_mag == 0, w_act == 0)
    # Rows read by loud channels survive activation-aware pruning.
    assert np.count_nonzero(w_act[:8]) > np.count_nonzero(w_mag[:8])
    assert np.count_nonzero(w_act[:8]) >= 0.95 * w_act[:8].size
    assert abs((w_act.size - np.count_nonzero(w_act)) - 0.5 * w_act.size) <= 1


def test_activation_needs_batches(mlp):
    with pytest.raises(PruningError, match="batches"):
        prune_weights(mlp, 0.5, method="activation")
    with pytest.raises(PruningError, match="batches"):
        prune_2_4(mlp, method="activation")


def test_small_layers_are_skipped_with_a_note(mlp):
    result = prune_weights(mlp, 0.5, min_params=4096)  # every layer is smaller
    assert result.layers == ()
    assert len([n for n in result.notes if "min_params=4096" in n]) == 3
    assert prune_weights(mlp, 0.5).layers[-1]["node"] == "fc2"  # head (288 weights) < default 1024
    result = prune_weights(mlp, 0.5, min_params=300)
    np.testing.assert_array_equal(_weight(result.model, "W3"), _weight(mlp, "W3"))
    assert any("head" in n and "skipped" in n for n in result.notes)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, True, "0.5", float("nan")])
def test_invalid_sparsity_is_refused(mlp, sparsity):
    with pytest.raises(PruningError, match="sparsity"):
        prune_weights(mlp, sparsity)


@pytest.mark.parametrize("kwargs", [{"method": "random"}, {"norm": "l3"}, {"scope": "model"}])
def test_unknown_options_are_refused(mlp, kwargs):
    with pytest.raises(PruningError, match=next(iter(kwargs.values()))):
        prune_weights(mlp, 0.5, **kwargs)


def test_input_model_unchanged_and_pruned_model_runs(mlp, conv):
    for model, feeds in ((mlp, {"x": np.ones((2, 64), np.float32)}),
                         (conv, {"x": np.ones((1, 8, 6, 6), np.float32), "z": np.ones((1, 6, 5, 5), np.float32)})):
        before = model.SerializeToString()
        for result in (prune_weights(model, 0.7, min_params=300), prune_2_4(model, min_params=300)):
            assert model.SerializeToString() == before
            outputs = _run(result.model, feeds)
            assert all(np.isfinite(o).all() for o in outputs)


def test_shared_weight_is_pruned_once():
    w = np.random.default_rng(3).normal(size=(32, 64))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="left"),
             helper.make_node("MatMul", ["x", "W"], ["b"], name="right"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = _model(nodes, {"W": w}, [_info("x", [2, 32])], [_info("y", [2, 64])])
    result = prune_weights(model, 0.25)
    assert len(result.layers) == 1 and result.layers[0]["nodes"] == ["left", "right"]
    assert abs((w.size - np.count_nonzero(_weight(result.model, "W"))) - 0.25 * w.size) <= 1


def _groups_along(weight: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(-1, 4)


def test_2_4_zeros_two_of_every_four_along_input_dim(mlp, conv):
    result = prune_2_4(mlp, min_params=300)
    w1, w2 = _weight(result.model, "W1"), _weight(result.model, "W2")
    assert (np.count_nonzero(_groups_along(w1, 0), axis=1) <= 2).all()  # MatMul [K, N]: along K
    assert (np.count_nonzero(_groups_along(w2, 1), axis=1) <= 2).all()  # Gemm transB [N, K]: along K
    # The kept pair is the larger one of each group.
    orig = _groups_along(np.abs(_weight(mlp, "W1")), 0)
    kept = _groups_along(w1, 0) != 0
    assert (np.where(kept, orig, np.inf).min(axis=1) >= np.where(kept, -np.inf, orig).max(axis=1)).all()
    assert check_2_4(result.model) == []
    assert sparsity_record(result) == {"pattern": "2:4", "layers": ["fc1", "fc2"]}

    conv_result = prune_2_4(conv, min_params=300)
    wc = _weight(conv_result.model, "Wc")
    assert (np.count_nonzero(_groups_along(wc, 1), axis=1) <= 2).all()  # Conv [O, I, kh, kw]: along I
    assert np.count_nonzero(wc) == wc.size // 2
    assert check_2_4(conv_result.model) == []


def test_2_4_skips_input_dims_not_divisible_by_4(conv):
    result = prune_2_4(conv, min_params=300)
    assert [r["node"] for r in result.layers] == ["conv"]
    assert any("conv6" in n and "divisible by 4" in n for n in result.notes)
    np.testing.assert_array_equal(_weight(result.model, "Wd"), _weight(conv, "Wd"))
    assert any("conv6" in p for p in check_2_4(result.model, ["conv6"]))


def test_2_4_validator_rejects_a_broken_weight(mlp):
    result = prune_2_4(mlp, min_params=300)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    init = next(i for i in broken.graph.initializer if i.name == "W2")
    w2 = numpy_helper.to_array(init).copy()
    w2[3, 4:8] = 1.0  # row 3 of Gemm [N, K], K indices 4..7: group 3 * (32 // 4) + 1 = 25
    init.CopyFrom(numpy_helper.from_array(w2, "W2"))
    problems = check_2_4(broken)
    assert len(problems) == 1 and problems[0].startswith("fc2:") and "group 25" in problems[0]
    assert check_2_4(broken, ["fc1"]) == []
    assert "nope" in check_2_4(broken, ["nope"])[0]
    del broken.metadata_props[:]  # no claim recorded: every prunable layer is checked
    assert [p.split(":")[0] for p in check_2_4(broken)] == ["fc2", "head"]
    with pytest.raises(PruningError, match="2:4"):
        sparsity_record(prune_weights(mlp, 0.5, min_params=300))


def test_2_4_keeps_outputs_close_when_pruned_weights_are_small():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(64, 32))
    small = np.moveaxis(rng.permuted(np.tile([1, 1, 0, 0], (32, 16, 1)), axis=2), 0, -1).reshape(64, 32) == 1
    w = np.where(small, w * 1e-4, w)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], {"W": w},
                   [_info("x", [8, 64])], [_info("y", [8, 32])])
    x = {"x": rng.normal(size=(8, 64)).astype(np.float32)}
    result = prune_2_4(model)
    np.testing.assert_array_equal(_weight(result.model, "W") == 0, small)
    np.testing.assert_allclose(_run(result.model, x)[0], _run(model, x)[0], atol=5e-3)


def test_macs_per_sample_counts_conv_and_dense_by_hand() -> None:
    from converters.pruning.common import macs_per_sample
    from tests import builders

    model = builders.chain_cnn_model(size=8)
    feeds = {"image": np.zeros((4, 3, 8, 8), np.float32)}
    # conv1: 16x8x8 outputs x (3x3x3) ; conv2: 8x8x8 x 16 ; head: 3 x 8
    assert macs_per_sample(model, feeds) == 16 * 64 * 27 + 8 * 64 * 16 + 3 * 8


@pytest.mark.parametrize(("ratio", "total", "dropped"), [
    (0.1, 96, 16), (0.3, 96, 32), (0.5, 1152, 576), (0.99, 64, 48), (0.25, 32, 8), (0.4, 40, 16), (0.25, 16, 4),
    (0.5, 3, 2), (0.2, 20, 4)])
def test_pruned_widths_stay_multiples_of_sixteen_on_wide_layers(ratio: float, total: int, dropped: int) -> None:
    from converters.pruning.common import units_to_drop

    assert units_to_drop(ratio, total) == dropped
    if total >= 64 and total % 16 == 0:
        assert (total - dropped) % 16 == 0
    elif total >= 32 and total % 8 == 0:  # narrower layers: multiples of 8
        assert (total - dropped) % 8 == 0

"""Per-unit pruning allocation: sensitivity on real graphs, the greedy path, the budgeted search."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.stages.prune import allocation_units, parse_prune, run_pruning
from converters.pruning.allocation import Point, Unit, greedy_path, search_path, sensitivity
from converters.pruning.cnn import ChannelPruner
from converters.pruning.transformer import prune_ffn
from edge_sdk.errors import PruningError
from tests import builders

DEAD = 8  # conv2 output channels that are exactly zero after its Relu


def two_groups() -> onnx.ModelProto:
    """Conv(3->16) -> Relu -> Conv(16->16) -> Relu -> Conv 1x1 (16->8) -> GlobalAveragePool -> Flatten.

    Two channel groups: conv1's (all alive) and conv2's, whose first ``DEAD`` channels are zero,
    so pruning up to half of conv2's group changes nothing while any cut of conv1's does."""
    rng = np.random.default_rng(3)
    w2, b2 = rng.normal(0, 0.5, (16, 16, 3, 3)), rng.normal(0, 0.1, 16)
    w2[:DEAD], b2[:DEAD] = 0.0, 0.0
    inits = {"w1": rng.normal(0, 0.5, (16, 3, 3, 3)), "b1": rng.normal(0.2, 0.1, 16), "w2": w2, "b2": b2,
             "w3": rng.normal(0, 0.5, (8, 16, 1, 1)), "b3": rng.normal(0, 0.1, 8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _agreement(reference: onnx.ModelProto, batches: list[dict[str, np.ndarray]]):
    """A real metric: top-1 agreement (points) of a model with ``reference`` on ``batches``."""
    def top1(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([np.argmax(session.run(None, b)[0], axis=1) for b in batches])

    expected = top1(reference)
    return lambda model: 100.0 * float(np.mean(top1(model) == expected))


def _error(model: onnx.ModelProto, pruned: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> float:
    """Squared error of ``pruned``'s outputs against ``model``'s on ``batches``."""
    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, b)[0] for b in batches])

    return float(np.sum((run(pruned) - run(model)) ** 2))


def _width(model: onnx.ModelProto, name: str) -> int:
    return next(int(i.dims[0]) for i in model.graph.initializer if i.name == name)


def test_per_group_ratios_prune_only_the_named_group() -> None:
    model, batches = two_groups(), _batches()
    pruner = ChannelPruner(model, batches)
    assert pruner.units == ["conv1", "conv2"]
    pruned = pruner.prune(0.0, {"conv2": 0.5}).model
    assert (_width(pruned, "w1"), _width(pruned, "w2")) == (16, 8)
    # the dead half went: the outputs are unchanged
    a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batches[0])[0]
    b = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batches[0])[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(PruningError, match=r"\['conv9'\].*not prunable channel groups"):
        pruner.prune(0.0, {"conv9": 0.5})
    with pytest.raises(PruningError, match="ratio=1.5"):
        pruner.prune(0.0, {"conv1": 1.5})


def test_second_refit_pass_on_pruned_inputs_lowers_the_output_error() -> None:
    model, batches = two_groups(), _batches()
    ratios = {"conv1": 0.25, "conv2": 0.75}

    plain = _error(model, ChannelPruner(model, batches, sequential=False).prune(0.0, ratios).model, batches)
    second = _error(model, ChannelPruner(model, batches).prune(0.0, ratios).model, batches)
    assert second < 0.9 * plain


def test_sensitivity_finds_the_free_group_and_the_path_takes_it_first() -> None:
    model, batches = two_groups(), _batches()
    units, prune = allocation_units(model, batches)
    assert units == [Unit("channels", "conv1"), Unit("channels", "conv2")]
    table = sensitivity(model, units, prune, batches)
    free, alive = table[Unit("channels", "conv2")], table[Unit("channels", "conv1")]
    assert [p.distortion for p in free if p.ratio <= 0.5] == pytest.approx([0.0] * 4, abs=1e-9)
    assert free[-1].distortion > 0.0 and min(p.distortion for p in alive) > 1e-4
    assert all(b.saved > a.saved for a, b in zip(alive, alive[1:]))  # each ratio removes more MACs
    path = greedy_path(table)
    assert path[0] == {Unit("channels", "conv2"): 0.5}  # one jump to the last free ratio
    assert all(set(a) <= set(b) and all(b[u] >= r for u, r in a.items()) for a, b in zip(path, path[1:]))
    assert path[-1] == {u: table[u][-1].ratio for u in units}


def test_greedy_path_orders_steps_by_distortion_per_mac() -> None:
    a, b = Unit("ffn", "a"), Unit("heads", "b")
    table = {a: [Point(0.25, 0.01, 100), Point(0.5, 0.05, 200)],  # 1e-4 then 4e-4 per MAC
             b: [Point(0.25, 0.02, 100), Point(0.5, 0.021, 200)]}  # 2e-4 then 1e-5 per MAC: jump to 0.5
    assert greedy_path(table) == [{a: 0.25}, {a: 0.25, b: 0.5}, {a: 0.5, b: 0.5}]
    assert greedy_path({}) == []


def test_search_never_exceeds_the_budget_on_its_validation_data() -> None:
    model, batches = two_groups(), _batches()
    units, prune = allocation_units(model, batches)
    path = greedy_path(sensitivity(model, units, prune, batches))
    metric = _agreement(model, _batches(6, seed=1))
    for budget in (0.0, 5.0, 100.0):
        steps: list[dict] = []
        result, allocation = search_path(path, prune, metric, 100.0, budget, steps)
        assert 100.0 - metric(result.model) <= budget
        within = [s["step"] for s in steps if s["drop"] <= budget]
        assert path.index(allocation) == max(within)
        assert all(s["drop"] > budget for s in steps if s["step"] > max(within))
    steps = []
    assert search_path(path, prune, metric, 100.0, 100.0, steps)[1] == path[-1]
    with pytest.raises(PruningError, match="no pruning stays within -1.0 points"):
        search_path(path, prune, metric, 100.0, -1.0, [])


def test_budget_run_reports_the_allocation_and_reapplies_it() -> None:
    model, batches = two_groups(), _batches()
    metric = _agreement(model, _batches(6, seed=1))
    pruned, report = run_pruning(parse_prune({"method": "structured", "budget": 0.0}), model, batches, metric)
    ratios = report["chosen"]["ratios"]
    assert ratios["channels:conv2"] >= 0.5 and report["accuracy_after"] == 100.0
    assert set(report["chosen"]["sensitivity"]) == {"channels:conv1", "channels:conv2"}
    again, _ = run_pruning(parse_prune({"method": "structured", "ratios": ratios}), model, batches, None)
    assert [list(i.dims) for i in again.graph.initializer] == [list(i.dims) for i in pruned.graph.initializer]
    with pytest.raises(PruningError, match="not prunable units of this model"):
        run_pruning(parse_prune({"method": "structured", "ratios": {"channels:nope": 0.5}}), model, batches, None)


@pytest.mark.parametrize("bad", [{"ratios": {}}, {"ratios": {"conv1": 0.5}}, {"ratios": {"layers:x": 0.5}},
                                 {"ratios": {"channels:conv1": 1.0}}, {"ratios": {"channels:a": 0.5}, "ratio": 0.2}])
def test_bad_ratios_are_refused_with_the_accepted_form(bad: dict) -> None:
    with pytest.raises(PruningError) as err:
        parse_prune({"method": "structured", **bad})
    assert "ratio" in str(err.value)


def test_ffn_ratios_prune_only_the_named_group() -> None:
    model = builders.transformer_model()
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(4, len(builders.VOCAB), (4, 6)).astype(np.int64),
                "attention_mask": np.ones((4, 6), np.int64)}]
    units, _ = allocation_units(model, batches)
    assert units == [Unit("ffn", "mm_f1")]  # its single-head attention has no head to remove
    pruned = prune_ffn(model, 0.0, batches, ratios={"mm_f1": 0.5})
    assert next(list(i.dims) for i in pruned.model.graph.initializer if i.name == "w1") == [16, 32]
    with pytest.raises(PruningError, match="expected 0 < ratio < 1"):
        prune_ffn(model, 0.0, batches)


def block_then_head() -> onnx.ModelProto:
    """stem Conv(3->8) -> Relu -> [depthwise -> Relu -> Conv 1x1] + skip -> Conv 1x1 (8->16) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm: one removable residual block, one channel group after it."""
    rng = np.random.default_rng(5)
    inits = {"w1": rng.normal(0, 0.5, (8, 3, 3, 3)), "b1": rng.normal(0.1, 0.1, 8), "wd": rng.normal(0, 0.5, (8, 1, 3, 3)),
             "wp": rng.normal(0, 0.5, (8, 8, 1, 1)), "w4": rng.normal(0, 0.5, (16, 8, 1, 1)), "b4": rng.normal(0, 0.1, 16),
             "fc": rng.normal(0, 0.5, (3, 16)), "fcb": np.zeros(3)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu"),
             helper.make_node("Conv", ["r1", "wd"], ["cd"], pads=[1, 1, 1, 1], group=8, name="depthwise"),
             helper.make_node("Relu", ["cd"], ["rd"], name="dw_relu"),
             helper.make_node("Conv", ["rd", "wp"], ["cp"], name="project"),
             helper.make_node("Add", ["cp", "r1"], ["res"], name="residual"),
             helper.make_node("Conv", ["res", "w4", "b4"], ["c4"], name="expand"),
             helper.make_node("Relu", ["c4"], ["r4"], name="expand_relu"),
             helper.make_node("GlobalAveragePool", ["r4"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="head")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_residual_blocks_are_units_and_the_layers_after_them_are_refit() -> None:
    model, batches = block_then_head(), _batches(6)
    units, prune = allocation_units(model, batches)
    assert units == [Unit("channels", "expand"), Unit("blocks", "residual")]
    table = sensitivity(model, units, prune, batches, grids={"blocks": (1.0,)})
    assert [p.ratio for p in table[Unit("blocks", "residual")]] == [1.0]
    result = prune({Unit("blocks", "residual"): 1.0})
    assert "residual" not in {n.name for n in result.model.graph.node}
    assert {"node": "residual", "op_type": "Add", "removed": True} in result.layers

    plain = ChannelPruner(model, batches, sequential=False).prune(0.0, bypass=["residual"]).model
    # the head was refit on the bypassed model's features
    assert _error(model, result.model, batches) < 0.9 * _error(model, plain, batches)
    again, _ = run_pruning(parse_prune({"method": "structured", "ratios": {"blocks:residual": 1}}), model, batches, None)
    assert "residual" not in {n.name for n in again.graph.node}
    with pytest.raises(PruningError, match="kept \\(0\\) or removed \\(1\\)"):
        parse_prune({"method": "structured", "ratios": {"blocks:residual": 0.5}})

"""Joint channel groups (residual Add chains, squeeze-excitation), Concat offsets, residual block removal.

Every graph is built here with onnx.helper and run on onnxruntime. The exactness tests zero the
same channels in every producer of a group, so removing them must leave the outputs unchanged;
with random values in the live channels, any misaligned slice shows up in the outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.pruning.cnn import find_groups, prune_channels
from converters.pruning.cnn_blocks import find_residual_blocks, prune_residual_blocks
from converters.pruning.common import macs_per_sample, params
from edge_sdk.errors import PruningError

Arrays = dict[str, np.ndarray]


def _model(nodes: list[onnx.NodeProto], inits: Arrays, outputs: dict[str, list[Any]], channels: int = 3) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs.items()],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(x: str, w: str, out: str, bias: str | None = None, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [out], name=out, **attrs)


def residual_chain(blocks: int = 3, width: int = 16, expand: int = 24, dead: tuple[int, ...] = (),
                   dead_expand: tuple[int, ...] = (), scale: tuple[float, ...] = (), seed: int = 0,
                   output_chain: bool = False) -> onnx.ModelProto:
    """stem Conv -> BN -> Relu -> a0, then ``blocks`` x MobileNetV2 blocks ``a_k = a_{k-1} + s_k * p(dw(e(a_{k-1})))``,
    then GlobalAveragePool -> Flatten -> Gemm. ``dead``: chain channels zero in every producer;
    ``dead_expand``: expand channels zero in every block; ``scale``: the branch scale of each block."""
    rng = np.random.default_rng(seed)
    stem, stem_b = rng.normal(0, 0.5, (width, 3, 3, 3)), rng.normal(0, 0.1, width)
    beta, mean = rng.normal(0, 0.2, width), rng.normal(0, 0.2, width)
    stem[list(dead)], stem_b[list(dead)], beta[list(dead)], mean[list(dead)] = 0.0, 0.0, 0.0, 0.0
    inits: Arrays = {"stem": stem, "stem_b": stem_b, "gamma": rng.uniform(0.5, 1.5, width), "beta": beta,
                     "mean": mean, "var": rng.uniform(0.5, 1.5, width),
                     "fc": rng.normal(0, 0.5, (5, width)), "fc_b": rng.normal(0, 0.1, 5)}
    nodes = [_conv("x", "stem", "s", "stem_b", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["s", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["a0"], name="relu0")]
    for k in range(1, blocks + 1):
        e, eb = rng.normal(0, 0.5, (expand, width, 1, 1)), rng.normal(0, 0.1, expand)
        d, db = rng.normal(0, 0.5, (expand, 1, 3, 3)), rng.normal(0, 0.1, expand)
        p, pb = rng.normal(0, 0.3, (width, expand, 1, 1)), rng.normal(0, 0.1, width)
        e[list(dead_expand)], eb[list(dead_expand)], db[list(dead_expand)] = 0.0, 0.0, 0.0
        p[list(dead)], pb[list(dead)] = 0.0, 0.0
        s = scale[k - 1] if scale else 1.0
        inits.update({f"e{k}": e, f"eb{k}": eb, f"d{k}": d, f"db{k}": db, f"p{k}": p * s, f"pb{k}": pb * s,
                      f"ls{k}": rng.uniform(0.5, 1.5, (1, width, 1, 1))})
        nodes += [_conv(f"a{k - 1}", f"e{k}", f"e{k}_out", f"eb{k}"),
                  helper.make_node("Relu", [f"e{k}_out"], [f"e{k}_act"], name=f"e{k}_relu"),
                  _conv(f"e{k}_act", f"d{k}", f"d{k}_out", f"db{k}", pads=[1, 1, 1, 1], group=expand),
                  helper.make_node("Clip", [f"d{k}_out", "zero", "six"], [f"d{k}_act"], name=f"d{k}_clip"),
                  _conv(f"d{k}_act", f"p{k}", f"p{k}_out", f"pb{k}"),
                  helper.make_node("Mul", [f"p{k}_out", f"ls{k}"], [f"f{k}"], name=f"layer_scale{k}"),
                  helper.make_node("Add", [f"a{k - 1}", f"f{k}"], [f"a{k}"], name=f"add{k}")]
    inits.update({"zero": np.array(0.0), "six": np.array(6.0)})
    nodes += [helper.make_node("GlobalAveragePool", [f"a{blocks}"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], transB=1, name="head")]
    return _model(nodes, inits, {"logits": ["batch", 5], **({f"a{blocks}": ["batch", width, 8, 8]} if output_chain else {})})


def _batches(n: int = 2, channels: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (4, channels, 8, 8)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


def _arrays(model: onnx.ModelProto) -> Arrays:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _assert_smaller_and_exact(model: onnx.ModelProto, pruned: onnx.ModelProto, channels: int = 3) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    feeds = _batches(1, channels, seed=11)[0]
    assert params(pruned) < params(model)
    assert macs_per_sample(pruned, feeds) < macs_per_sample(model, feeds)
    for got, want in zip(_run(pruned, feeds), _run(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- residual Add chains -------------------------------------------------------------------------------

DEAD = (0, 3, 4, 7, 9, 10, 13, 14)  # half of the 16 chain channels
DEAD_EXPAND = (1, 2, 5, 8, 11, 12, 15, 17, 18, 20, 21, 23)  # half of the 24 expand channels


def test_residual_chain_is_one_joint_group() -> None:
    groups, refused = find_groups(residual_chain(), joint=True)
    (chain,) = [g for g in groups if len(g.producers) > 1]
    assert set(chain.producers) == {"s", "p1_out", "p2_out", "p3_out"} and chain.channels == 16
    assert set(chain.couplings) == {"add1", "add2", "add3"}
    assert {c.node.name for c in chain.consumers} == {"e1_out", "e2_out", "e3_out", "head"}
    assert {(s.name, s.axis) for s in chain.slices} >= {
        ("stem", 0), ("stem_b", 0), ("gamma", 0), ("beta", 0), ("mean", 0), ("var", 0), ("p1", 0), ("pb1", 0),
        ("ls1", 1), ("p3", 0), ("e1", 1), ("e3", 1), ("fc", 1)}
    assert sorted(g.producer for g in groups if len(g.producers) == 1) == ["e1_out", "e2_out", "e3_out"]
    assert refused == []


def test_residual_chain_refused_without_joint() -> None:
    groups, refused = find_groups(residual_chain())
    assert sorted(g.producer for g in groups) == ["e1_out", "e2_out", "e3_out"]
    reasons = dict(refused)
    assert set(reasons) == {"s", "p1_out", "p2_out", "p3_out"}
    assert all(r.startswith("residual-coupled: Add") for r in reasons.values())


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("refit", [False, True])
def test_zero_channels_of_a_residual_chain_are_pruned_exactly(blocks: int, refit: bool) -> None:
    model = residual_chain(blocks, dead=DEAD, dead_expand=DEAD_EXPAND)
    result = prune_channels(model, 0.5, _batches(), refit=refit, joint=True)
    chain = next(layer for layer in result.layers if len(layer["producers"]) > 1)
    assert set(chain["kept"]).isdisjoint(DEAD) and chain["channels_after"] == 8
    assert chain["recon_error_before"] < 1e-6
    assert all(set(layer["kept"]).isdisjoint(DEAD_EXPAND) for layer in result.layers if layer is not chain)
    _assert_smaller_and_exact(model, result.model)


def test_joint_group_is_sliced_with_the_same_indices_everywhere() -> None:
    model = residual_chain()  # random weights: nothing is exactly zero
    result = prune_channels(model, 0.25, _batches(), refit=False, joint=True)
    chain = next(layer for layer in result.layers if len(layer["producers"]) > 1)
    keep = np.array(chain["kept"])
    assert len(keep) == 12 and chain["refit"] is False
    before, after = _arrays(model), _arrays(result.model)
    for name in ("stem", "stem_b", "gamma", "beta", "mean", "var", "pb1", "pb2", "pb3"):
        np.testing.assert_array_equal(after[name], before[name][keep], err_msg=name)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(after[f"ls{k}"], before[f"ls{k}"][:, keep])
        expand_keep = np.array(next(layer["kept"] for layer in result.layers if layer["producer"] == f"e{k}_out"))
        np.testing.assert_array_equal(after[f"e{k}"], before[f"e{k}"][expand_keep][:, keep])
        np.testing.assert_array_equal(after[f"p{k}"], before[f"p{k}"][keep][:, expand_keep])
    np.testing.assert_array_equal(after["fc"], before["fc"][:, keep])


def test_joint_refit_lowers_the_reconstruction_error() -> None:
    model = residual_chain()
    plain = prune_channels(model, 0.5, _batches(n=4), refit=False, joint=True)
    fitted = prune_channels(model, 0.5, _batches(n=4), refit=True, joint=True)
    chain = next(layer for layer in fitted.layers if len(layer["producers"]) > 1)
    assert chain["refit"] and chain["recon_error_after"] < 0.9 * chain["recon_error_before"]
    feeds = _batches(n=4)[0]
    ref = _run(model, feeds)[0]
    assert np.linalg.norm(_run(fitted.model, feeds)[0] - ref) < np.linalg.norm(_run(plain.model, feeds)[0] - ref)


def test_wide_joint_group_keeps_a_multiple_of_8() -> None:
    result = prune_channels(residual_chain(width=64), 0.3, _batches(), joint=True)
    chain = next(layer for layer in result.layers if len(layer["producers"]) > 1)
    assert (chain["channels_before"], chain["channels_after"]) == (64, 48)  # 64 - round(19.2) = 45 -> 48
    assert _arrays(result.model)["stem"].shape == (48, 3, 3, 3)


def test_chain_reaching_a_graph_output_is_refused_whole() -> None:
    model = residual_chain(output_chain=True)
    result = prune_channels(model, 0.5, _batches(), joint=True)
    reasons = [n for n in result.notes if "not prunable" in n]
    for producer in ("s", "p1_out", "p2_out", "p3_out"):
        assert any(n.startswith(producer) and "'a3' is a graph output" in n for n in reasons)
    before, after = _arrays(model), _arrays(result.model)
    for name in ("stem", "gamma", "pb1", "pb2", "pb3", "ls2", "fc"):  # no part of the group was touched
        assert after[name].shape == before[name].shape
    assert after["e1"].shape == (12, 16, 1, 1) and after["p1"].shape == (16, 12, 1, 1)  # expand groups: pruned
    onnx.checker.check_model(result.model, full_check=True)


def test_chain_reaching_a_graph_input_is_refused() -> None:
    rng = np.random.default_rng(0)
    inits = {"e": rng.normal(0, 0.5, (8, 16, 1, 1)), "p": rng.normal(0, 0.5, (16, 8, 1, 1)),
             "h": rng.normal(0, 0.5, (4, 16, 1, 1))}
    nodes = [_conv("x", "e", "e_out"), helper.make_node("Relu", ["e_out"], ["r"], name="relu"),
             _conv("r", "p", "p_out"), helper.make_node("Add", ["x", "p_out"], ["y"], name="add"),
             _conv("y", "h", "out")]
    groups, refused = find_groups(_model(nodes, inits, {"out": ["batch", 4, 8, 8]}, channels=16), joint=True)
    assert [g.producer for g in groups] == ["e_out"]
    assert dict(refused)["p_out"] == "tensor 'x' is a graph input"


def test_unhandled_op_in_a_chain_is_refused() -> None:
    model = residual_chain(blocks=2)
    add = next(n for n in model.graph.node if n.name == "add1")
    add.output[0] = "a1_pre"
    model.graph.node.insert(list(model.graph.node).index(add) + 1,
                            helper.make_node("Softmax", ["a1_pre"], ["a1"], axis=1, name="mix"))
    groups, refused = find_groups(model, joint=True)
    assert all(len(g.producers) == 1 for g in groups)
    assert "Softmax 'mix' is not handled" in dict(refused)["p1_out"]


# --- Concat -----------------------------------------------------------------------------------------------

def concat_model(dead_a: tuple[int, ...] = (), dead_b: tuple[int, ...] = ()) -> onnx.ModelProto:
    """x -> Conv A (8) -> Relu; x -> Conv B (8) -> Relu; Concat(A, x, B) (19) -> BN -> Relu -> Conv 1x1 (19 -> 4)."""
    rng = np.random.default_rng(3)
    wa, ba, wb, bb = rng.normal(0, 0.5, (8, 3, 3, 3)), rng.normal(0, 0.1, 8), rng.normal(0, 0.5, (8, 3, 3, 3)), \
        rng.normal(0, 0.1, 8)
    wa[list(dead_a)], ba[list(dead_a)], wb[list(dead_b)], bb[list(dead_b)] = 0.0, 0.0, 0.0, 0.0
    beta, mean = rng.normal(0, 0.2, 19), rng.normal(0, 0.2, 19)
    for dead, offset in ((dead_a, 0), (dead_b, 11)):  # a zero channel stays zero through the BN
        beta[[offset + i for i in dead]], mean[[offset + i for i in dead]] = 0.0, 0.0
    inits = {"wa": wa, "ba": ba, "wb": wb, "bb": bb, "gamma": rng.uniform(0.5, 1.5, 19), "beta": beta, "mean": mean,
             "var": rng.uniform(0.5, 1.5, 19), "wc": rng.normal(0, 0.5, (4, 19, 1, 1)), "bc": rng.normal(0, 0.1, 4)}
    nodes = [_conv("x", "wa", "a", "ba", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             _conv("x", "wb", "b", "bb", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Concat", ["ra", "x", "rb"], ["cat"], axis=1, name="cat"),
             helper.make_node("BatchNormalization", ["cat", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             _conv("r", "wc", "y", "bc")]
    return _model(nodes, inits, {"y": ["batch", 4, 8, 8]})


def test_concat_inputs_are_pruned_at_their_offsets() -> None:
    groups, refused = find_groups(concat_model())
    by = {g.producer: g for g in groups}
    assert set(by) == {"a", "b"} and refused == [("y", "tensor 'y' is a graph output")]
    assert [(c.node.name, c.offset) for c in by["b"].consumers] == [("y", 11)]
    assert {(s.name, s.offset, s.width) for s in by["b"].slices if s.name == "gamma"} == {("gamma", 11, 19)}


@pytest.mark.parametrize("refit", [False, True])
def test_zero_channels_before_a_concat_are_pruned_exactly(refit: bool) -> None:
    dead_a, dead_b = (1, 2, 5, 6), (0, 3, 4, 7)
    model = concat_model(dead_a, dead_b)
    result = prune_channels(model, 0.5, _batches(), refit=refit)
    kept = {layer["producer"]: layer["kept"] for layer in result.layers}
    assert kept == {"a": (0, 3, 4, 7), "b": (1, 2, 5, 6)}
    columns = [0, 3, 4, 7, 8, 9, 10, 12, 13, 16, 17]  # A kept, all of x, B kept at offset 11
    before, after = _arrays(model), _arrays(result.model)
    assert after["gamma"].shape == (11,) and after["wc"].shape == (4, 11, 1, 1)
    np.testing.assert_array_equal(after["gamma"], before["gamma"][columns])
    if not refit:
        np.testing.assert_array_equal(after["wc"], before["wc"][:, columns])
    _assert_smaller_and_exact(model, result.model)


def test_concat_output_joined_with_another_activation_is_refused() -> None:
    model = concat_model()
    relu = next(n for n in model.graph.node if n.name == "relu")
    relu.output[0] = "r0"
    model.graph.node.insert(list(model.graph.node).index(relu) + 1,
                            helper.make_node("Add", ["r0", "n"], ["r"], name="mix"))
    groups, refused = find_groups(model, joint=True)
    assert groups == []
    assert "Add 'mix' joins it with another activation after a Concat" in dict(refused)["a"]


# --- squeeze-excitation -----------------------------------------------------------------------------------

def se_model(dead: tuple[int, ...] = (), swish: bool = False) -> onnx.ModelProto:
    """Conv (16) -> Relu -> h; h * sigmoid(Conv_e(relu(Conv_r(GAP(h))))) -> Conv 1x1 (16 -> 8) -> GAP."""
    rng = np.random.default_rng(5)
    w, b = rng.normal(0, 0.5, (16, 3, 3, 3)), rng.normal(0, 0.1, 16)
    w[list(dead)], b[list(dead)] = 0.0, 0.0
    inits = {"w": w, "b": b, "wr": rng.normal(0, 0.5, (4, 16, 1, 1)), "br": rng.normal(0, 0.1, 4),
             "we": rng.normal(0, 0.5, (16, 4, 1, 1)), "be": rng.normal(0, 0.1, 16),
             "wp": rng.normal(0, 0.5, (8, 16, 1, 1))}
    act = [helper.make_node("Sigmoid", ["c"], ["sig"], name="swish_gate"),
           helper.make_node("Mul", ["c", "sig"], ["h"], name="swish")] if swish else \
        [helper.make_node("Relu", ["c"], ["h"], name="relu")]
    nodes = [_conv("x", "w", "c", "b", pads=[1, 1, 1, 1]), *act,
             helper.make_node("GlobalAveragePool", ["h"], ["squeeze"], name="se_pool"),
             _conv("squeeze", "wr", "reduce", "br"), helper.make_node("Relu", ["reduce"], ["rr"], name="se_relu"),
             _conv("rr", "we", "expand", "be"), helper.make_node("Sigmoid", ["expand"], ["gate"], name="se_gate"),
             helper.make_node("Mul", ["h", "gate"], ["m"], name="excite"),
             _conv("m", "wp", "p"), helper.make_node("GlobalAveragePool", ["p"], ["y"], name="pool")]
    return _model(nodes, inits, {"y": ["batch", 8, 1, 1]})


@pytest.mark.parametrize("swish", [False, True])
def test_se_gate_is_coupled_to_its_input(swish: bool) -> None:
    groups, refused = find_groups(se_model(swish=swish), joint=True)
    (group,) = groups
    assert group.producers == ("c", "expand") and group.couplings[-1] == "excite"
    assert {c.node.name for c in group.consumers} == {"reduce", "p"}
    assert {(s.name, s.axis) for s in group.slices} == {("w", 0), ("b", 0), ("wr", 1), ("we", 0), ("be", 0), ("wp", 1)}
    reasons = dict(refused)
    assert reasons["reduce"] == "squeeze-excitation bottleneck: its width is kept"
    assert reasons["p"] == "tensor 'y' is a graph output"


def test_se_block_refused_without_joint() -> None:
    groups, refused = find_groups(se_model())
    assert groups == [] and "non-constant Mul (squeeze-excitation?): Mul 'excite'" in dict(refused)["c"]


@pytest.mark.parametrize("refit", [False, True])
def test_zero_channels_of_an_se_block_are_pruned_exactly(refit: bool) -> None:
    dead = (2, 3, 5, 8, 9, 11, 12, 14)
    model = se_model(dead)
    result = prune_channels(model, 0.5, _batches(), refit=refit, joint=True)
    (layer,) = result.layers
    assert set(layer["kept"]).isdisjoint(dead)
    after = _arrays(result.model)
    assert after["we"].shape == (8, 4, 1, 1) and after["be"].shape == (8,)
    assert after["wr"].shape == (4, 8, 1, 1) and after["br"].shape == (4,)  # the squeeze width is kept
    _assert_smaller_and_exact(model, result.model)


# --- residual block removal --------------------------------------------------------------------------------

def test_residual_blocks_are_found() -> None:
    blocks, notes = find_residual_blocks(residual_chain())
    assert [(b.add, b.skip, b.branch) for b in blocks] == [("add1", "a0", "f1"), ("add2", "a1", "f2"),
                                                           ("add3", "a2", "f3")]
    assert blocks[0].nodes == ("e1_out", "e1_relu", "d1_out", "d1_clip", "p1_out", "layer_scale1")
    assert blocks[0].params == 24 * 16 + 24 + 24 * 9 + 24 + 16 * 24 + 16 + 16 and notes == []


def test_block_whose_branch_is_zero_is_removed_without_change() -> None:
    model = residual_chain(scale=(1.0, 0.0, 1.0))
    result = prune_residual_blocks(model, 1, _batches())
    assert [layer["node"] for layer in result.layers if layer["removed"]] == ["add2"]
    assert result.layers[1]["influence"] == 0.0 and result.method == "blocks"
    names = {n.name for n in result.model.graph.node}
    assert "add2" not in names and "e2_out" not in names and "e2" not in _arrays(result.model)
    _assert_smaller_and_exact(model, result.model)


@pytest.mark.parametrize("measure", ["norm", "output"])
def test_block_removal_picks_the_least_influential(measure: str) -> None:
    model = residual_chain(scale=(1.0, 0.8, 0.05))
    result = prune_residual_blocks(model, 1, _batches(), measure=measure)  # type: ignore[arg-type]
    influence = [layer["influence"] for layer in result.layers]
    assert influence[2] < min(influence[:2])
    assert [layer["node"] for layer in result.layers if layer["removed"]] == ["add3"]
    two = prune_residual_blocks(model, 2, _batches(), measure=measure)  # type: ignore[arg-type]
    assert params(two.model) < params(result.model) < params(model)
    assert _run(two.model, _batches()[0])[0].shape == (4, 5)


def test_block_with_a_tensor_read_outside_is_not_removable() -> None:
    model = residual_chain(blocks=2)
    head = next(n for n in model.graph.node if n.name == "head")
    model.graph.node.insert(list(model.graph.node).index(head) + 1,
                            helper.make_node("Add", ["logits_pre", "side"], ["logits"], name="side_add"))
    head.output[0] = "logits_pre"
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node(
        "ReduceMean", ["e1_act"], ["side"], axes=[1, 2, 3], keepdims=0, name="side"))
    blocks, notes = find_residual_blocks(model)
    assert [b.add for b in blocks] == ["add2"]
    assert any(n.startswith("add1") and "'e1_act' is also read outside the block" in n for n in notes)


@pytest.mark.parametrize("count", [0, 4, True, 1.5])
def test_block_count_out_of_range_is_refused(count: object) -> None:
    with pytest.raises(PruningError, match="count"):
        prune_residual_blocks(residual_chain(), count, _batches())  # type: ignore[arg-type]

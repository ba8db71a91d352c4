"""Structured channel pruning: dependency groups, physical removal, exactness on zero channels, refit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.pruning.cnn import find_groups, prune_channels
from converters.pruning.common import params
from edge_sdk.errors import PruningError
from tests import builders


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out: str, out_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def chain(zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    """(a) Conv(3->16) -> Relu -> Conv 1x1 (16->8) -> GlobalAveragePool; ``zero``: dead stem channels."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(0, 0.5, (16, 3, 3, 3)), rng.normal(0, 0.1, 16)
    w1[list(zero)], b1[list(zero)] = 0.0, 0.0
    inits = {"w1": w1, "b1": b1, "w2": rng.normal(0, 0.5, (8, 16, 1, 1)), "b2": rng.normal(0, 0.1, 8)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="pool")]
    return _model(nodes, inits, "y", ["batch", 8, 1, 1])


def bn_block(zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    """(b) Conv -> BatchNormalization -> Relu -> depthwise Conv -> Relu -> Conv 1x1."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3))
    beta, mean = rng.uniform(0.5, 1.0, 8), rng.normal(0, 0.1, 8)  # every live channel passes the Relu
    w1[list(zero)], beta[list(zero)], mean[list(zero)] = 0.0, 0.0, 0.0
    inits = {"w1": w1, "gamma": rng.uniform(0.5, 1.5, 8), "beta": beta, "mean": mean,
             "var": rng.uniform(0.5, 1.5, 8), "wd": np.abs(rng.normal(0, 0.5, (8, 1, 3, 3))), "bd": np.zeros(8),
             "w3": rng.normal(0, 0.5, (4, 8, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="project")]
    return _model(nodes, inits, "y", ["batch", 4, 8, 8])


def _batches(name: str = "x", size: int = 8, n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: rng.normal(0, 1, (2, 3, size, size)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def test_groups_found_and_refused() -> None:
    groups, refused = find_groups(chain())
    assert [(g.producer, g.channels, [c.node.name for c in g.consumers]) for g in groups] == [("conv1", 16, ["conv2"])]
    assert refused == [("conv2", "tensor 'y' is a graph output")]

    groups, refused = find_groups(bn_block())
    assert {s.name for s in groups[0].slices} == {"w1", "gamma", "beta", "mean", "var", "wd", "bd", "w3"}
    assert [c.node.name for c in groups[0].consumers] == ["project"]

    groups, refused = find_groups(builders.cnn_model())
    assert groups == []
    reasons = dict(refused)
    assert "residual-coupled" in reasons["stem"] and "residual-coupled" in reasons["project"]


def test_chain_shrinks_and_stays_valid() -> None:
    model = chain()
    result = prune_channels(model, 0.5, _batches())
    shapes = _shapes(result.model)
    assert shapes["w1"] == (8, 3, 3, 3) and shapes["b1"] == (8,) and shapes["w2"] == (8, 8, 1, 1)
    onnx.checker.check_model(result.model, full_check=True)
    assert params(result.model) < params(model)
    out = _run(result.model, _batches()[0])
    assert out.shape == (2, 8, 1, 1)
    (layer,) = result.layers
    assert (layer["producer"], layer["consumers"], layer["channels_before"], layer["channels_after"]) == \
        ("conv1", ("conv2",), 16, 8)
    assert layer["params_after"] < layer["params_before"]
    assert layer["recon_error_after"] <= layer["recon_error_before"]


def test_bn_depthwise_block_shrinks() -> None:
    result = prune_channels(bn_block(), 0.5, _batches())
    shapes = _shapes(result.model)
    assert shapes["w1"] == (4, 3, 3, 3) and shapes["wd"] == (4, 1, 3, 3) and shapes["w3"] == (4, 4, 1, 1)
    assert all(shapes[n] == (4,) for n in ("gamma", "beta", "mean", "var", "bd"))
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4
    onnx.checker.check_model(result.model, full_check=True)
    assert _run(result.model, _batches()[0]).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("build, dead", [(chain, (1, 4, 5, 9, 10, 12, 13, 15)), (bn_block, (0, 3, 6, 7))])
@pytest.mark.parametrize("refit", [False, True])
def test_zero_channels_are_pruned_exactly(build, dead: tuple[int, ...], refit: bool) -> None:
    model = build(zero=dead)
    result = prune_channels(model, 0.5, _batches(), refit=refit)
    kept = result.layers[0]["kept"]
    assert set(kept).isdisjoint(dead) and len(kept) == len(dead)
    feeds = {"x": np.random.default_rng(7).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), atol=1e-5)
    assert result.layers[0]["recon_error_before"] < 1e-6


def test_refit_reduces_reconstruction_error() -> None:
    model = chain()
    plain = prune_channels(model, 0.5, _batches(n=4), refit=False)
    fitted = prune_channels(model, 0.5, _batches(n=4), refit=True)
    assert fitted.layers[0]["refit"] and not plain.layers[0]["refit"]
    assert fitted.layers[0]["recon_error_after"] < 0.9 * plain.layers[0]["recon_error_after"]
    assert fitted.layers[0]["recon_error_before"] == pytest.approx(plain.layers[0]["recon_error_before"])
    # the refit helps the pruned model's actual output too, on the calibration data
    feeds = _batches(n=4)[0]
    ref = _run(model, feeds)
    assert np.linalg.norm(_run(fitted.model, feeds) - ref) < np.linalg.norm(_run(plain.model, feeds) - ref)


def test_kxk_consumer_is_refitted_by_im2col() -> None:
    model = chain()
    w2 = np.random.default_rng(3).normal(0, 0.5, (8, 16, 3, 3)).astype(np.float32)
    next(i for i in model.graph.initializer if i.name == "w2").CopyFrom(numpy_helper.from_array(w2, "w2"))
    helper_node = next(n for n in model.graph.node if n.name == "conv2")
    helper_node.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    result = prune_channels(model, 0.5, _batches(n=4))
    (layer,) = result.layers
    assert layer["refit"] and layer["recon_error_after"] < layer["recon_error_before"]
    assert _shapes(result.model)["w2"] == (8, 8, 3, 3)
    onnx.checker.check_model(result.model, full_check=True)


def test_residual_model_is_left_intact_with_notes() -> None:
    model = builders.cnn_model()
    result = prune_channels(model, 0.5, _batches("image", size=16))
    assert result.layers == ()
    assert params(result.model) == params(model)
    assert any("stem" in n and "residual-coupled" in n for n in result.notes)


def test_ratio_zero_keeps_everything_and_one_channel_survives() -> None:
    assert prune_channels(chain(), 0.0, _batches()).layers[0]["channels_after"] == 16
    assert prune_channels(chain(), 0.99, _batches()).layers[0]["channels_after"] == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_invalid_ratio_refused(ratio: object) -> None:
    with pytest.raises(PruningError, match="ratio"):
        prune_channels(chain(), ratio, _batches())  # type: ignore[arg-type]


def test_no_batches_refused() -> None:
    with pytest.raises(PruningError, match="batches"):
        prune_channels(chain(), 0.5, [])


def _with_middle(node: onnx.NodeProto, *inits: onnx.TensorProto) -> onnx.ModelProto:
    """``chain()`` with ``node`` (reading r1, writing m) between the Relu and the 1x1 Conv."""
    model = chain()
    next(n for n in model.graph.node if n.name == "conv2").input[0] = "m"
    model.graph.node.insert(2, node)
    model.graph.initializer.extend(inits)
    return model


def test_per_channel_mul_is_sliced() -> None:
    scale = numpy_helper.from_array(np.linspace(0.5, 2.0, 16, dtype=np.float32).reshape(1, 16, 1, 1), "s")
    model = _with_middle(helper.make_node("Mul", ["r1", "s"], ["m"], name="scale"), scale)
    result = prune_channels(model, 0.25, _batches())
    assert _shapes(result.model)["s"] == (1, 12, 1, 1)
    onnx.checker.check_model(result.model, full_check=True)
    assert _run(result.model, _batches()[0]).shape == (2, 8, 1, 1)


@pytest.mark.parametrize("node, reason", [
    (helper.make_node("Concat", ["r1", "r1"], ["m"], axis=1, name="cat"), "Concat 'cat' joins the channels with themselves"),
    (helper.make_node("Mul", ["r1", "x"], ["m"], name="gate"), "non-constant Mul"),
])
def test_unknown_couplings_are_refused(node: onnx.NodeProto, reason: str) -> None:
    model = _with_middle(node)
    groups, refused = find_groups(model)
    assert groups == [] and reason in dict(refused)["conv1"]


def test_square_of_the_channels_is_channel_wise() -> None:
    model = _with_middle(helper.make_node("Mul", ["r1", "r1"], ["m"], name="square"))
    (group,), _ = find_groups(model)
    assert group.producers == ("conv1",) and [c.node.name for c in group.consumers] == ["conv2"]
    result = prune_channels(model, 0.5, _batches())
    assert _shapes(result.model)["w2"] == (8, 8, 1, 1)
    assert _run(result.model, _batches()[0]).shape == (2, 8, 1, 1)


def pooled_head(zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    """(c) Conv (3->16) -> Relu -> MaxPool 2x2 -> Conv 1x1 (16->16) -> Relu -> AveragePool over the whole
    4x4 map -> Reshape [-1, 16] -> Mul by a [16] scale -> Gemm (EfficientNet's head); ``zero``: dead channels
    of both Convs."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(0, 0.5, (16, 3, 3, 3))
    w2, b2 = np.abs(rng.normal(0, 0.5, (16, 16, 1, 1))), rng.uniform(0.5, 1.0, 16)  # live channels pass the Relu
    w1[list(zero)], w2[list(zero)], b2[list(zero)] = 0.0, 0.0, 0.0
    inits = {"w1": w1, "w2": w2, "b2": b2, "shape": np.array([-1, 16]),
             "scale": rng.uniform(0.5, 2.0, 16), "fc": rng.normal(0, 0.5, (5, 16)), "fcb": rng.normal(0, 0.1, 5)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("MaxPool", ["r1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2], name="maxpool"),
         helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], name="conv2"),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("AveragePool", ["r2"], ["p"], kernel_shape=[4, 4], strides=[4, 4], name="avgpool"),
         helper.make_node("Reshape", ["p", "shape"], ["flat"], name="reshape"),
         helper.make_node("Mul", ["flat", "scale"], ["scaled"], name="scale"),
         helper.make_node("Gemm", ["scaled", "fc", "fcb"], ["y"], transB=1, name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=[numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
                     for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("refit", [False, True])
def test_local_pooling_and_reshape_head_are_pruned_exactly(refit: bool) -> None:
    dead = (0, 2, 5, 6, 9, 11, 12, 15)
    model = pooled_head(dead)
    groups, refused = find_groups(model)
    assert [g.producer for g in groups] == ["conv1", "conv2"] and refused == []
    assert [(s.name, s.axis) for s in groups[1].shapes] == [("shape", 1)]
    result = prune_channels(model, 0.5, _batches(), refit=refit)
    assert all(set(layer["kept"]).isdisjoint(dead) for layer in result.layers)
    arrays = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert arrays["shape"].tolist() == [-1, 8] and arrays["scale"].shape == (8,) and arrays["fc"].shape == (5, 8)
    assert arrays["w2"].shape == (8, 8, 1, 1)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(7).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), atol=1e-5)


def test_residual_model_is_pruned_jointly() -> None:
    """builders.cnn_model: ``project`` both reads and writes the residual channels, so stem, depthwise,
    project (input and output channels) and the head lose the same indices; dead channels go exactly."""
    model = builders.cnn_model()
    dead = [1, 4, 6]
    arrays = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    arrays["w1"][dead], arrays["b1"][dead], arrays["w3"][dead] = 0.0, 0.0, 0.0
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    (group,), refused = find_groups(model, joint=True)
    assert group.producers == ("stem", "project") and group.couplings == ("residual",) and refused == []
    assert {c.node.name for c in group.consumers} == {"project", "head"}
    result = prune_channels(model, 0.4, _batches("image", size=16), joint=True)
    assert result.layers[0]["kept"] == (0, 2, 3, 5, 7)
    shapes = _shapes(result.model)
    assert shapes["w1"] == (5, 3, 3, 3) and shapes["w2"] == (5, 1, 3, 3) and shapes["w3"] == (5, 5, 1, 1)
    assert shapes["fc"] == (3, 5)
    feeds = _batches("image", size=16)[1]
    np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), atol=1e-5)


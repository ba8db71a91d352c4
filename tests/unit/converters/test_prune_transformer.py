"""Structured FFN-neuron pruning on tiny transformer graphs built with onnx.helper."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.pruning.common import params
from converters.pruning.transformer import find_ffn_groups, prune_ffn
from edge_sdk.errors import PruningError
from tests import builders


def _batches(n: int = 3, batch: int = 4, seq: int = 7, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, len(builders.VOCAB), (batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        mask[:, seq - 2:] = 0  # padded tail
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names or []:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names or None, feeds)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _ffn_model(activation: str = "relu", bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, 8] -> MatMul W1[8,16] (+b1) -> activation -> MatMul W2[16,8] (+b2) -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "B2"),
             numpy_helper.from_array(np.array(math.sqrt(2.0), np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["u"], name="up")]
    pre = "u"
    if bias:
        nodes.append(helper.make_node("Add", ["u", "B1"], ["ub"], name="up_bias"))
        pre = "ub"
    if activation == "relu":
        nodes.append(helper.make_node("Relu", [pre], ["h"], name="act"))
    elif activation == "torch_gelu":  # x * 0.5 first, then * (1 + erf(x / sqrt2))
        nodes += [helper.make_node("Div", [pre, "sqrt2"], ["d"], name="g_div"),
                  helper.make_node("Erf", ["d"], ["e"], name="g_erf"),
                  helper.make_node("Add", ["e", "one"], ["e1"], name="g_add"),
                  helper.make_node("Mul", [pre, "half"], ["xh"], name="g_half"),
                  helper.make_node("Mul", ["xh", "e1"], ["h"], name="g_mul")]
    elif activation == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [pre], ["h"], name="act"))
    elif activation == "gated":  # SwiGLU-like: the activation is multiplied by another projection
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "W3"))
        nodes += [helper.make_node("Relu", [pre], ["r"], name="act"),
                  helper.make_node("MatMul", ["x", "W3"], ["gate"], name="gate"),
                  helper.make_node("Mul", ["r", "gate"], ["h"], name="gate_mul")]
    nodes.append(helper.make_node("MatMul", ["h", "W2"], ["v"], name="down"))
    nodes.append(helper.make_node("Add", ["v", "B2"], ["y"], name="down_bias") if bias
                 else helper.make_node("Identity", ["v"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _x_batches(n: int = 4, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (2, 16, 8)).astype(np.float32)} for _ in range(n)]


def test_finds_the_erf_gelu_ffn_of_the_encoder() -> None:
    for post_ln in (False, True):
        groups, notes = find_ffn_groups(builders.transformer_model(post_ln=post_ln))
        assert [(g.up, g.down, g.w1, g.w2, g.hidden, g.activation) for g in groups] == [
            ("mm_f1", "mm_f2", "w1", "w2", "g", "gelu_erf")]
        assert notes == []


def test_finds_torch_order_gelu_and_relu_with_biases() -> None:
    (gelu,), _ = find_ffn_groups(_ffn_model("torch_gelu"))
    assert (gelu.activation, gelu.b1, gelu.b2) == ("gelu_erf", "B1", "B2")
    (relu,), _ = find_ffn_groups(_ffn_model("relu", bias=False))
    assert (relu.activation, relu.b1, relu.b2) == ("relu", None, None)


def test_half_ratio_shrinks_initializers_and_keeps_a_valid_model() -> None:
    model = builders.transformer_model()
    batches = _batches()
    result = prune_ffn(model, 0.5, batches)
    pruned = result.model
    assert _init(pruned, "w1").shape == (16, 32) and _init(pruned, "w2").shape == (32, 16)
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    (logits,) = _run(pruned, batches[0])
    assert logits.shape == (4, 3) and np.all(np.isfinite(logits))
    assert params(pruned) == params(model) - 2 * 16 * 32
    (layer,) = result.layers
    assert (layer["up"], layer["down"], layer["neurons_before"], layer["neurons_after"]) == ("mm_f1", "mm_f2", 64, 32)
    assert (layer["params_before"], layer["params_after"]) == (2 * 16 * 64, 2 * 16 * 32)
    assert _init(model, "w1").shape == (16, 64)  # the input model is untouched


def test_pruning_neurons_that_do_not_contribute_is_exact() -> None:
    model = builders.transformer_model(post_ln=True)
    dead = np.arange(1, 64, 2)
    w2 = next(i for i in model.graph.initializer if i.name == "w2")
    value = numpy_helper.to_array(w2).copy()
    value[dead] = 0.0
    w2.CopyFrom(numpy_helper.from_array(value, "w2"))
    batches = _batches()
    result = prune_ffn(model, 0.5, batches)
    np.testing.assert_array_equal(_init(result.model, "w2"), value[np.arange(0, 64, 2)])
    for feeds in _batches(seed=7):
        np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], atol=1e-5)
    assert result.layers[0]["recon_after"] == result.layers[0]["recon_before"] == 0.0


@pytest.mark.parametrize("build, feeds, out", [
    (builders.transformer_model, _batches(), "f2"),
    (lambda: _ffn_model("torch_gelu"), _x_batches(), "y"),
])
def test_refit_reduces_ffn_reconstruction_error(build, feeds, out) -> None:  # type: ignore[no-untyped-def]
    model = build()
    plain = prune_ffn(model, 0.75, feeds, refit=False)
    fitted = prune_ffn(model, 0.75, feeds)
    (layer,) = fitted.layers
    assert layer["refit"] and layer["recon_after"] < 0.75 * layer["recon_before"]
    assert plain.layers[0]["recon_after"] == plain.layers[0]["recon_before"] == layer["recon_before"]

    def error(pruned: onnx.ModelProto) -> float:
        num = den = 0.0
        for f in feeds:
            ref, got = _run(model, f, [out])[0], _run(pruned, f, [out])[0]
            mask = f.get("attention_mask", np.ones(ref.shape[:-1], np.int64)) != 0
            num += float(np.sum((got - ref)[mask] ** 2))
            den += float(np.sum(ref[mask] ** 2))
        return num / den

    assert error(fitted.model) < error(plain.model)


def test_refit_moves_the_output_bias() -> None:
    model = _ffn_model("relu")
    result = prune_ffn(model, 0.5, _x_batches())
    pruned = result.model
    assert _init(pruned, "B1").shape == (8,) and _init(pruned, "W1").shape == (8, 8)
    assert not np.allclose(_init(pruned, "B2"), _init(model, "B2"))
    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.2, 1.5, float("nan"), True, "0.5", None])
def test_invalid_ratio_is_refused(ratio: object) -> None:
    with pytest.raises(PruningError, match="ratio"):
        prune_ffn(builders.transformer_model(), ratio, _batches())  # type: ignore[arg-type]


def test_no_batches_is_refused() -> None:
    with pytest.raises(PruningError, match="calibration batches"):
        prune_ffn(builders.transformer_model(), 0.5, [])


def test_bad_feeds_raise_a_pruning_error() -> None:
    with pytest.raises(PruningError, match="batch 0"):
        prune_ffn(builders.transformer_model(), 0.5, [{"tokens": np.zeros((1, 3), np.int64)}])


@pytest.mark.parametrize("activation, reason", [("sigmoid", "not supported"), ("gated", "non-scalar tensor")])
def test_unsupported_pattern_is_reported_not_pruned(activation: str, reason: str) -> None:
    model = _ffn_model(activation)
    result = prune_ffn(model, 0.5, _x_batches())
    assert result.layers == ()
    assert any(reason in n and "up -> down" in n for n in result.notes), result.notes
    assert params(result.model) == params(model)


def test_hidden_tensor_used_elsewhere_is_skipped() -> None:
    model = _ffn_model("relu")
    model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    groups, notes = find_ffn_groups(model)
    assert groups == [] and any("'h' is a graph output" in n for n in notes)


def test_shared_weight_is_skipped() -> None:
    model = _ffn_model("relu")
    model.graph.node.append(helper.make_node("MatMul", ["x", "W1"], ["u2"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("u2", TensorProto.FLOAT, None))
    groups, notes = find_ffn_groups(model)
    assert groups == [] and any("shared" in n for n in notes)


def test_prune_layers_bypasses_the_least_influential_block() -> None:
    from converters.pruning.transformer import find_residual_blocks, prune_layers

    model = builders.transformer_model()
    assert [(n.name, x, f) for n, x, f in find_residual_blocks(model)] == [("res1", "x0", "o"), ("res2", "x1", "f2")]
    w2 = next(i for i in model.graph.initializer if i.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2) * 1e-3, "w2"))  # the FFN barely moves x
    batches = _batches()
    result = prune_layers(model, 1, batches)
    assert [layer["node"] for layer in result.layers if layer["removed"]] == ["res2"]
    names = {i.name for i in result.model.graph.initializer}
    assert "w1" not in names and "w2" not in names and "wq" in names
    assert params(result.model) == params(model) - 2 * 16 * 64 - 3  # w1, w2 and the three GELU scalars
    assert "ln2" not in {n.name for n in result.model.graph.node}
    onnx.checker.check_model(result.model, full_check=True)
    for feeds in batches:
        np.testing.assert_allclose(_run(result.model, feeds)[0], _run(model, feeds)[0], atol=0.05)


def test_prune_layers_refuses_a_bad_count() -> None:
    from converters.pruning.transformer import prune_layers

    for count in (0, 3, True, 1.0):
        with pytest.raises(PruningError, match="count"):
            prune_layers(builders.transformer_model(), count, _batches())  # type: ignore[arg-type]

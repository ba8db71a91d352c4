"""Attention-head pruning on a tiny torch-exported BertModel (and a hand-built non-attention graph)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.pruning.heads import find_attention_blocks, prune_heads
from edge_sdk.errors import PruningError

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 2, 100


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                                     intermediate_size=64, vocab_size=VOCAB, attn_implementation="eager")
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in bert.parameters():  # non-zero biases, and no initializers deduplicated by the exporter
            p.normal_(0.0, 0.2)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    path = Path(tmp_path_factory.mktemp("bert")) / "tiny_bert.onnx"
    ids = torch.randint(0, VOCAB, (2, 5))
    axes = {"b": 0, "s": 1}
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracing notices
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, torch.ones(2, 5, dtype=torch.long)), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={n: {v: k for k, v in axes.items()} for n in
                                        ("input_ids", "attention_mask", "last_hidden_state")},
                          dynamo=False, opset_version=17)
    return onnx.load(str(path))


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0  # padded tail
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _batches() -> list[dict[str, np.ndarray]]:
    return [_feeds(4, 9, seed) for seed in range(3)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _weights(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    """Shapes of every MatMul initializer weight, in graph order."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_finds_attention_blocks(bert: onnx.ModelProto) -> None:
    blocks, notes = find_attention_blocks(bert)
    assert len(blocks) == LAYERS, notes
    assert {(b.num_heads, b.head_dim) for b in blocks} == {(HEADS, HIDDEN // HEADS)}
    assert notes == []


def test_half_the_heads_halves_qkvo(bert: onnx.ModelProto) -> None:
    result = prune_heads(bert, 0.5, _batches())
    assert result.method == "heads"
    assert len(result.layers) == LAYERS
    for layer in result.layers:
        assert (layer["heads_before"], layer["heads_after"]) == (HEADS, HEADS // 2)
        assert len(layer["kept_heads"]) == HEADS // 2
        assert layer["params_after"] < layer["params_before"]
    shapes = _weights(result.model)
    # per layer: q, k, v, o, ffn up, ffn down
    for layer in range(LAYERS):
        q, k, v, o, up, down = shapes[6 * layer: 6 * layer + 6]
        assert q == k == v == (HIDDEN, HIDDEN // 2)
        assert o == (HIDDEN // 2, HIDDEN)
        assert (up, down) == ((HIDDEN, 64), (64, HIDDEN))
    onnx.checker.check_model(result.model, full_check=True)
    for batch, seq in ((1, 3), (3, 17)):  # dynamic batch and sequence
        out = _run(result.model, _feeds(batch, seq, 9))
        assert out.shape == (batch, seq, HIDDEN)
        assert np.all(np.isfinite(out))


def test_per_block_ratios_prune_only_the_named_block(bert: onnx.ModelProto) -> None:
    blocks, _ = find_attention_blocks(bert)
    result = prune_heads(bert, 0.0, _batches(), ratios={blocks[1].out: 0.5})
    assert [(layer["o"], layer["heads_after"]) for layer in result.layers] == [(blocks[1].out, HEADS // 2)]
    shapes = _weights(result.model)
    assert shapes[0] == (HIDDEN, HIDDEN) and shapes[6] == (HIDDEN, HIDDEN // 2)  # q of block 0, of block 1
    assert _run(result.model, _feeds(2, 5, 3)).shape == (2, 5, HIDDEN)
    with pytest.raises(PruningError, match="not prunable attention blocks"):
        prune_heads(bert, 0.0, _batches(), ratios={"nope": 0.5})


def test_dead_heads_pruned_exactly(bert: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(bert)
    blocks, _ = find_attention_blocks(model)
    dim = HIDDEN // HEADS
    inits = {i.name: i for i in model.graph.initializer}
    for block in blocks:
        wo = numpy_helper.to_array(inits[block.wo]).copy()
        wo[0:dim] = 0.0  # head 0 and head 2 contribute nothing
        wo[2 * dim:3 * dim] = 0.0
        inits[block.wo].CopyFrom(numpy_helper.from_array(wo, block.wo))
    result = prune_heads(model, 0.5, _batches())
    assert [layer["kept_heads"] for layer in result.layers] == [[1, 3]] * LAYERS
    for batch, seq in ((2, 6), (3, 11)):
        feeds = _feeds(batch, seq, 5)
        np.testing.assert_allclose(_run(result.model, feeds), _run(model, feeds), atol=1e-4)


def test_keeps_at_least_one_head_and_leaves_input_alone(bert: onnx.ModelProto) -> None:
    before = bert.SerializeToString()
    result = prune_heads(bert, 0.99, _batches()[:1])
    assert all(layer["heads_after"] == 1 for layer in result.layers)
    assert any("kept 1" in note for note in result.notes)
    assert bert.SerializeToString() == before
    assert _run(result.model, _feeds(2, 4, 1)).shape == (2, 4, HIDDEN)


def test_num_heads_argument(bert: onnx.ModelProto) -> None:
    assert len(prune_heads(bert, 0.25, _batches()[:1], num_heads=HEADS).layers) == LAYERS
    result = prune_heads(bert, 0.25, _batches()[:1], num_heads=8)  # disagrees with the reshape constant 8 = D
    assert result.layers == ()
    assert any("disagree" in note for note in result.notes)
    assert result.model.SerializeToString() == bert.SerializeToString()


def _ffn_only() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_no_attention_notes_and_unchanged() -> None:
    model = _ffn_only()
    result = prune_heads(model, 0.5, [{"x": np.ones((1, 3, 8), np.float32)}])
    assert result.layers == ()
    assert any("no supported attention block" in note for note in result.notes)
    assert result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("ratio", [0, 0.0, 1.0, 1.5, -0.1, True, "0.5"])
def test_bad_ratio(ratio: Any) -> None:
    with pytest.raises(PruningError):
        prune_heads(_ffn_only(), ratio, [{"x": np.ones((1, 3, 8), np.float32)}])


def test_bad_num_heads_and_no_batches() -> None:
    with pytest.raises(PruningError):
        prune_heads(_ffn_only(), 0.5, [{"x": np.ones((1, 3, 8), np.float32)}], num_heads=0)
    with pytest.raises(PruningError):
        prune_heads(_ffn_only(), 0.5, [])


def test_rewrites_explicit_head_constants(bert: onnx.ModelProto) -> None:
    """Shapes spelled [B, S, 4, 8] and [B, S, 32] (not -1) get new constants H' and H'*D."""
    model = onnx.ModelProto()
    model.CopyFrom(bert)
    blocks, _ = find_attention_blocks(model)
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}

    def set_piece(reshape: str, value: int) -> None:
        concat = producers[nodes[reshape].input[1]]
        const = producers[concat.input[2]]
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([value], np.int64)))

    for block in blocks:
        for proj in (block.q, block.k, block.v):
            set_piece(proj.reshape, HEADS)
        set_piece(block.context_reshape, HIDDEN)
    reference = _run(model, _feeds(2, 6, 3))
    assert find_attention_blocks(model)[0][0].num_heads == HEADS
    result = prune_heads(model, 0.5, _batches())
    onnx.checker.check_model(result.model, full_check=True)
    out = _run(result.model, _feeds(2, 6, 3))
    assert out.shape == reference.shape == (2, 6, HIDDEN)
    new_shapes = [n for n in result.model.graph.node if n.op_type == "Concat" and "_heads" in n.output[0]]
    assert len(new_shapes) == 4 * LAYERS  # q, k, v and context shapes rebuilt with new constants
    assert model.SerializeToString() != result.model.SerializeToString()


def test_convert_accepts_head_pruning_only_with_a_ratio() -> None:
    from converters.stages.prune import parse_prune

    assert parse_prune({"method": "heads", "ratio": 0.25}).ratio == 0.25
    with pytest.raises(PruningError, match="head pruning needs 'ratio'"):
        parse_prune({"method": "heads"})


def test_output_projection_refit_reduces_the_error(bert: onnx.ModelProto) -> None:
    refit = prune_heads(bert, 0.5, _batches())
    plain = prune_heads(bert, 0.5, _batches(), refit=False)
    for layer in refit.layers:
        assert layer["refit"] and layer["recon_after"] < layer["recon_before"]
    assert all(not layer["refit"] for layer in plain.layers)
    feeds = _feeds(3, 9, 42)  # held-out tokens
    reference = _run(bert, feeds)
    assert np.abs(_run(refit.model, feeds) - reference).mean() < np.abs(_run(plain.model, feeds) - reference).mean()


def test_structured_ratio_with_heads_prunes_both_kinds(bert: onnx.ModelProto) -> None:
    from converters.stages.prune import parse_prune, run_pruning

    pruned, report = run_pruning(parse_prune({"method": "structured", "ratio": 0.5, "heads": 0.5}), bert,
                                 _batches(), None)
    kinds = sorted({layer["op_type"] for layer in report["layers"]})
    assert kinds == ["Attention", "FFN"] and report["params_after"] < report["params_before"]
    assert _run(pruned, _feeds(2, 7, 3)).shape == (2, 7, HIDDEN)
    for bad in ({"method": "heads", "ratio": 0.5, "heads": 0.5}, {"method": "structured", "budget": 1.0, "heads": 0.5},
                {"method": "structured", "ratio": 0.5, "heads": 1.5}):
        with pytest.raises(PruningError, match="prune heads is"):
            parse_prune(bad)

"""Tiny real ONNX models and tokenizers, built in tests with onnx.helper and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from runtime.package import Package

def auto_cpu_backend(package: Package, precision: str = "auto") -> str:
    """The CPU backend the ``auto`` policy serves ``package`` with on this machine: OpenVINO where it is
    installed and measured the faster one here (``runtime.backends.openvino_gives_way``), else onnxruntime."""
    from runtime.backends import openvino_gives_way
    from runtime.runners.openvino import openvino_version

    faster = openvino_version() is not None and openvino_gives_way(package, precision) is None
    return "openvino-cpu" if faster else "onnxruntime-cpu"


COLOR_LABELS = ["red", "green", "blue"]
TEXT_LABELS = ["bearing", "leak", "overheating"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "bearing", "noise", "grinding", "leak", "oil", "drip",
         "hot", "temperature", "overheat", "the", "pump", "is"]
# Token -> class evidence for the tiny text model (rows follow VOCAB).
_TOKEN_CLASS = {"bearing": 0, "noise": 0, "grinding": 0, "leak": 1, "oil": 1, "drip": 1,
                "hot": 2, "temperature": 2, "overheat": 2}


def image_model(size: int = 8, dynamic_hw: bool = False, classes: int = 3) -> onnx.ModelProto:
    """[N,3,H,W] float32 -> channel means -> Gemm -> logits [N,classes]: class = brightest RGB channel."""
    hw: list[int | str] = ["height", "width"] if dynamic_hw else [size, size]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, *hw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    w = numpy_helper.from_array(np.eye(classes, 3, dtype=np.float32) * 4.0, "W")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "B")
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "colors", [x], [y], initializer=[w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def text_model(with_token_types: bool = True) -> onnx.ModelProto:
    """Masked mean of per-token class evidence: [N,S] int64 ids (+ mask, token types) -> logits [N,3]."""
    table = np.zeros((len(VOCAB), 3), np.float32)
    for token, cls in _TOKEN_CLASS.items():
        table[VOCAB.index(token), cls] = 6.0
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names]
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    inits = [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.zeros((2, 3), np.float32), "T")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["mean"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    if with_token_types:
        nodes += [helper.make_node("Gather", ["T", "token_type_ids"], ["temb"]),
                  helper.make_node("ReduceSum", ["temb", "axis1"], ["tsum"], keepdims=0),
                  helper.make_node("Add", ["mean", "tsum"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["mean"], ["logits"]))
    graph = helper.make_graph(nodes, "words", inputs, [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tokenizer_json(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer over VOCAB ([CLS] text [SEP]), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))],
    )
    tok.save(str(path))
    return path


def save(model: onnx.ModelProto, path: Path) -> Path:
    """``model`` written to ``path``; the path."""
    onnx.save(model, path)
    return path


def write_image_folder(root: Path, per_class: int = 3, size: int = 32) -> Path:
    """An ImageFolder of solid-colour PNGs whose label is their dominant colour."""
    import cv2

    bgr = {"red": (30, 40, 220), "green": (40, 200, 30), "blue": (210, 50, 40)}
    for label, color in bgr.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.full((size, size + 8, 3), color, np.uint8)
            img[i : i + 4, :] = 128
            cv2.imwrite(str(root / label / f"{i}.png"), img)
    return root


def preprocess_dict(size: int = 8) -> dict:
    return {"resize": [size, size], "interpolation": "area", "color": "rgb", "mean": [127.0, 127.0, 127.0],
            "std": [128.0, 128.0, 128.0], "layout": "nchw", "dtype": "float32"}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)


def _classifier(nodes: list[onnx.NodeProto], name: str, size: int, classes: int,
                inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    """An opset-17 graph from ``image`` [batch, 3, size, size] to ``logits`` [batch, classes]."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def cnn_model(size: int = 16, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A small residual CNN (conv, depthwise conv, residual add, pooling, dense) with random weights."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (8, 3, 3, 3)), _init(rng, "b1", (8,), 0.1), _init(rng, "w2", (8, 1, 3, 3)),
             _init(rng, "w3", (8, 8, 1, 1)), _init(rng, "fc", (classes, 8)), _init(rng, "fcb", (classes,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="depthwise"),
        helper.make_node("Relu", ["c2"], ["r2"], name="dw_relu"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="project"),
        helper.make_node("Add", ["c3", "r1"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="head"),
    ]
    return _classifier(nodes, "cnn", size, classes, inits)


def transformer_model(vocab: int = len(VOCAB), dim: int = 16, classes: int = 3, seed: int = 0,
                      post_ln: bool = False) -> onnx.ModelProto:
    """One encoder block (single-head attention, Erf-GELU MLP), masked mean pooling and a head.

    Pre-LN by default; ``post_ln`` makes the residuals read the LayerNorm outputs, as in BERT,
    so that a LayerNorm output feeds both the projections and a residual Add.
    """
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "emb", (vocab, dim), 1.0), *(_init(rng, w, (dim, dim)) for w in ("wq", "wk", "wv", "wo")),
             _init(rng, "w1", (dim, 4 * dim)), _init(rng, "w2", (4 * dim, dim)), _init(rng, "head", (dim, classes)),
             numpy_helper.from_array(np.ones(dim, np.float32), "ln_g"),
             numpy_helper.from_array(np.zeros(dim, np.float32), "ln_b"),
             numpy_helper.from_array(np.array(np.sqrt(0.5), np.float32), "inv_sqrt2"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    mm = lambda a, b, out: helper.make_node("MatMul", [a, b], [out], name=f"mm_{out}")  # noqa: E731
    nodes = [
        helper.make_node("Constant", [], ["inv_sqrt_d"], name="inv_sqrt_d",
                         value=numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32))),
        helper.make_node("Gather", ["emb", "input_ids"], ["x0"], name="embed"),
        helper.make_node("LayerNormalization", ["x0", "ln_g", "ln_b"], ["h0"], axis=-1, name="ln1"),
        mm("h0", "wq", "q"), mm("h0", "wk", "k"), mm("h0", "wv", "v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        mm("q", "kt", "scores"),
        helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1, name="softmax"),
        mm("attn", "v", "ctx"), mm("ctx", "wo", "o"),
        helper.make_node("Add", ["h0" if post_ln else "x0", "o"], ["x1"], name="res1"),
        helper.make_node("LayerNormalization", ["x1", "ln_g", "ln_b"], ["h1"], axis=-1, name="ln2"),
        mm("h1", "w1", "f1"),
        helper.make_node("Mul", ["f1", "inv_sqrt2"], ["f1s"], name="gelu_scale"),
        helper.make_node("Erf", ["f1s"], ["erf"], name="gelu_erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="gelu_add"),
        helper.make_node("Mul", ["f1", "erf1"], ["g0"], name="gelu_mul"),
        helper.make_node("Mul", ["g0", "half"], ["g"], name="gelu_half"),
        mm("g", "w2", "f2"),
        helper.make_node("Add", ["h1" if post_ln else "x1", "f2"], ["x2"], name="res2"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
        helper.make_node("Unsqueeze", ["maskf", "ax2"], ["mask3"], name="mask_unsq"),
        helper.make_node("Mul", ["x2", "mask3"], ["xm"], name="mask_mul"),
        helper.make_node("ReduceSum", ["xm", "ax1"], ["xs"], keepdims=0, name="pool_sum"),
        helper.make_node("ReduceSum", ["maskf", "ax1"], ["cnt"], keepdims=1, name="pool_cnt"),
        helper.make_node("Div", ["xs", "cnt"], ["pooled"], name="pool_div"),
        mm("pooled", "head", "logits"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "encoder", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def chain_cnn_model(size: int = 8, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Conv(3->16) -> Relu -> Conv 1x1 (16->8) -> Relu -> pooling -> dense: prunable without residuals."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (16, 3, 3, 3)), _init(rng, "b1", (16,), 0.1), _init(rng, "w2", (8, 16, 1, 1)),
             _init(rng, "b2", (8,), 0.1), _init(rng, "fc", (classes, 8)), _init(rng, "fcb", (classes,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="head"),
    ]
    return _classifier(nodes, "chain", size, classes, inits)


def anomaly_model(size: int = 8) -> onnx.ModelProto:
    """[N,3,H,W] float32 -> mean |x| -> score [N,1]: far from mid-grey (after normalisation) is anomalous."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])
    shape = numpy_helper.from_array(np.array([-1, 1], np.int64), "shape")
    nodes = [
        helper.make_node("Abs", ["image"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Reshape", ["mean", "shape"], ["score"]),
    ]
    graph = helper.make_graph(nodes, "anomaly", [x], [y], initializer=[shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_anomaly_folder(root: Path, per_class: int = 6, size: int = 32) -> Path:
    """ok/: mid-grey parts with mild noise; defect/: the same with a bright or dark blotch."""
    import cv2

    rng = np.random.default_rng(7)
    for label in ("ok", "defect"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(127, 6, (size, size, 3)), 0, 255).astype(np.uint8)
            if label == "defect":
                c = 8 + (i * 5) % 16
                img[c - 6 : c + 6, c - 6 : c + 6] = 255 if i % 2 else 0
            cv2.imwrite(str(root / label / f"{i}.png"), img)
    return root


def backbone_model(size: int = 64, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A small random-weight CNN classifier with residual stages at strides 16 and 32 (the default
    PatchCore feature maps): stem s2 -> s4 -> s8 -> s16 (+ residual block) -> s32 (+ residual block) -> head."""
    rng = np.random.default_rng(seed)
    widths = {"c1": (8, 3), "c2": (8, 8), "c3": (16, 8), "c4": (16, 16), "r4a": (16, 16), "r4b": (16, 16),
              "c5": (24, 16), "r5a": (24, 24), "r5b": (24, 24)}
    inits = [_init(rng, f"w_{k}", (o, i, 3, 3), (2.0 / (9 * i)) ** 0.5) for k, (o, i) in widths.items()]
    inits += [_init(rng, "fc", (classes, 24)), _init(rng, "fcb", (classes,), 0.1)]
    nodes = []
    x = "image"
    for k, stride in (("c1", 2), ("c2", 2), ("c3", 2), ("c4", 2)):
        nodes += [helper.make_node("Conv", [x, f"w_{k}"], [f"{k}_out"], pads=[1, 1, 1, 1], strides=[stride] * 2,
                                   name=k),
                  helper.make_node("Relu", [f"{k}_out"], [f"{k}_act"], name=f"{k}_relu")]
        x = f"{k}_act"
    for stage, prev, down in (("r4", x, None), ("r5", "stage4", "c5")):
        if down:
            nodes += [helper.make_node("Conv", [prev, f"w_{down}"], [f"{down}_out"], pads=[1, 1, 1, 1],
                                       strides=[2, 2], name=down),
                      helper.make_node("Relu", [f"{down}_out"], [f"{down}_act"], name=f"{down}_relu")]
            prev = f"{down}_act"
        nodes += [helper.make_node("Conv", [prev, f"w_{stage}a"], [f"{stage}a"], pads=[1, 1, 1, 1], name=f"{stage}a"),
                  helper.make_node("Relu", [f"{stage}a"], [f"{stage}a_act"], name=f"{stage}a_relu"),
                  helper.make_node("Conv", [f"{stage}a_act", f"w_{stage}b"], [f"{stage}b"], pads=[1, 1, 1, 1],
                                   name=f"{stage}b"),
                  helper.make_node("Add", [prev, f"{stage}b"], [f"stage{stage[1]}"], name=f"{stage}_add")]
    nodes += [helper.make_node("GlobalAveragePool", ["stage5"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="head")]
    return _classifier(nodes, "backbone", size, classes, inits)


def write_parts(root: Path, good: int = 24, per_class: int = 8, size: int = 64, seed: int = 3) -> Path:
    """``good/``: textured grey parts (smooth noise under uneven light); ``val/ok`` more of them and
    ``val/defect`` the same kind of part with a drawn scratch or spot it was never fitted on."""
    import cv2

    rng = np.random.default_rng(seed)

    def part() -> np.ndarray:
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2.0)
        ramp = np.linspace(-12, 12, size, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
        grey = 120 + 14 * noise / (noise.std() + 1e-6) + ramp
        return np.repeat(grey[:, :, None], 3, axis=2)

    for folder, count, defect in (("good", good, False), ("val/ok", per_class, False), ("val/defect", per_class, True)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = part()
            if defect:
                a, b = rng.integers(size // 8, size - size // 8, 2), rng.integers(size // 8, size - size // 8, 2)
                if i % 2:
                    cv2.line(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), (235, 235, 235), 2)
                else:
                    cv2.circle(img, (int(a[0]), int(a[1])), size // 10, (25, 25, 25), -1)
            cv2.imwrite(str(root / folder / f"{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


# --- knowledge base: a bag-of-words embedding model and past incidents ---------------------------

DIM = 8
# Which direction of the embedding space a token mostly points to (rows follow VOCAB).
_TOPIC = {"bearing": 0, "noise": 0, "grinding": 0, "leak": 1, "oil": 1, "drip": 1, "hot": 2, "temperature": 2,
          "overheat": 2, "the": 3, "pump": 3, "is": 3, "[CLS]": 4, "[SEP]": 4, "[UNK]": 5}
INCIDENTS_CSV = """id,text,fault,fix,asset,date
INC-1,grinding noise at the bearing,bearing,replace the drive-end bearing,pump P-101,2024-03-02
INC-2,oil leak under the pump,leak,replace the shaft seal,pump P-101,2024-04-11
INC-3,the pump is hot,overheating,clean the cooler fins,pump P-204,2024-05-20
INC-4,oil drip at the flange,leak,tighten the flange bolts,valve V-3,2024-06-01
INC-5,temperature alarm overheat,overheating,restore coolant flow,motor M-7,2024-07-15
INC-6,noise from the pump,bearing,grease the bearing,pump P-204,2024-08-09
"""
TEXTS = [line.split(",")[1] for line in INCIDENTS_CSV.splitlines()[1:]]


def embedding_model(dim: int = DIM, seed: int = 0, with_mask: bool = True) -> onnx.ModelProto:
    """Token vectors [N,S,dim] (padding zeroed by the mask): a bag-of-words encoder over VOCAB."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, 0.15, (len(VOCAB), dim)).astype(np.float32)
    for token, axis in _TOPIC.items():
        table[VOCAB.index(token), axis % dim] += {3: 0.5, 4: 0.3, 5: 0.3}.get(axis, 1.0)
    names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in names]
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", dim])
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb" if with_mask else "hidden"])]
    if with_mask:
        nodes += [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
                  helper.make_node("Mul", ["emb", "mask3"], ["hidden"])]
    graph = helper.make_graph(nodes, "bag_of_words", inputs, [out],
                              initializer=[numpy_helper.from_array(table, "E"),
                                           numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build_kb(root: Path, csv_text: str = INCIDENTS_CSV, *, archive: bool = True, name: str = "kb.edgepkg",
             **kwargs: object) -> Package:
    """Write the model, tokenizer and incidents under ``root`` and build a knowledge-base package."""
    from converters.knowledge import build_knowledge_base

    root.mkdir(parents=True, exist_ok=True)
    onnx.save(embedding_model(), root / "embed.onnx")
    (root / "incidents.csv").write_text(csv_text, encoding="utf-8")
    return build_knowledge_base(root / "embed.onnx", root / "incidents.csv", root / name,
                                tokenizer=tokenizer_json(root / "tokenizer.json"), max_length=16,
                                archive=archive, **kwargs)  # type: ignore[arg-type]

"""The export zoo: the same tiny networks exported the ways users export them, canonicalized on load.

Flavours: torch's TorchScript exporter (``dynamo=False``) at opsets 13 and 17, the dynamo exporter
at opset 18, and the TorchScript export run through onnxscript's optimizer (what a user's
"simplify" step gives). After :func:`converters.canonical.canonicalize` every pass must find the
same units and layers on every flavour, and conversion must give the same int8 outputs.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from converters.canonical import canonicalize  # noqa: E402
from converters.equalization import find_pairs  # noqa: E402
from converters.pruning.cnn import find_groups  # noqa: E402
from converters.pruning.cnn_blocks import find_residual_blocks  # noqa: E402
from converters.pruning.heads import find_attention_blocks  # noqa: E402
from converters.pruning.transformer import find_ffn_groups  # noqa: E402
from converters.ir import name_nodes  # noqa: E402
from converters.qdq import plan_placement  # noqa: E402
from converters.smoothing import smoothable  # noqa: E402


class SamePadConv(nn.Module):
    """TensorFlow "same" padding computed from the input size, as EfficientNet ports do."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, groups=groups, bias=False)
        self.k, self.s = k, stride

    def forward(self, x: Any) -> Any:
        h, w = x.shape[-2:]
        ph = max((-(-h // self.s) - 1) * self.s + self.k - h, 0)
        pw = max((-(-w // self.s) - 1) * self.s + self.k - w, 0)
        return self.conv(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


class Block(nn.Module):
    """Inverted residual (MBConv): expand 1x1, depthwise 3x3 (strided: no residual), optional
    squeeze-excite, project 1x1, residual add when the shape allows."""

    def __init__(self, c: int, out: int, stride: int = 1, se: bool = False, expand: int = 3) -> None:
        super().__init__()
        e = c * expand
        self.residual = stride == 1 and c == out
        self.expand, self.bn0 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn1 = SamePadConv(e, e, 3, stride=stride, groups=e), nn.BatchNorm2d(e)
        self.se = (nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1)) if se else None
        if self.se:
            self.se_reduce, self.se_expand = self.se
        self.project, self.bn2 = nn.Conv2d(e, out, 1, bias=False), nn.BatchNorm2d(out)

    def forward(self, x: Any) -> Any:
        y = F.relu6(self.bn0(self.expand(x)))
        y = F.relu6(self.bn1(self.dw(y)))
        if self.se:
            y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = self.bn2(self.project(y))
        return x + y if self.residual else y


class ZooCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 8, se=True), Block(8, 12, stride=2), Block(12, 12))
        self.head_conv, self.bn_head = nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, image: Any) -> Any:
        x = self.blocks(F.relu6(self.bn(self.stem(image))))
        x = F.relu6(self.bn_head(self.head_conv(x)))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Layer(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.d = heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x: Any, bias: Any) -> Any:
        b, s, _ = x.shape

        def split(t: Any) -> Any:
            return t.view(b, s, self.h, self.d // self.h).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (self.d // self.h) ** 0.5
        att = (torch.softmax(scores + bias, -1) @ split(self.v(x))).transpose(1, 2).reshape(b, s, self.d)
        x = self.ln1(x + self.o(att))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class ZooTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.cls = nn.Linear(16, 3)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        x = self.emb(input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        m = attention_mask.unsqueeze(-1).float()
        return self.cls((x * m).sum(1) / m.sum(1))


def _cnn() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    torch.manual_seed(0)
    net = ZooCNN().eval()
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics to fold
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return net, (torch.rand(2, 3, 16, 16),), {"image": {0: "batch"}}


def _transformer() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    return ZooTransformer().eval(), (ids, mask), {"input_ids": {0: "batch", 1: "sequence"},
                                                   "attention_mask": {0: "batch", 1: "sequence"}}


def _export(net: Any, args: tuple[Any, ...], axes: dict[str, Any], flavour: str) -> onnx.ModelProto:
    names = list(axes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flavour.startswith("dynamo"):
            dims = {n: {a: torch.export.Dim(f"{n}_{label}") if label != "batch" else torch.export.Dim("batch")
                        for a, label in spec.items()} for n, spec in axes.items()}
            if "sequence" in str(axes):
                seq = torch.export.Dim("sequence")
                dims = {n: {0: torch.export.Dim("batch"), 1: seq} for n in axes}
            program = torch.onnx.export(net, args, input_names=names, output_names=["logits"], opset_version=18,
                                        dynamo=True, dynamic_shapes=dims, verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        opset = 13 if flavour.startswith("ts13") else 17
        torch.onnx.export(net, args, buffer, input_names=names, output_names=["logits"], opset_version=opset,
                          dynamo=False, dynamic_axes={**axes, "logits": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    if flavour.endswith("+onnxscript"):
        import onnxscript.optimizer

        model = onnxscript.optimizer.optimize(model)
    return model


FLAVOURS = ("ts13", "ts17", "ts17+onnxscript", "dynamo18")
NETWORKS: dict[str, Callable[[], tuple[Any, tuple[Any, ...], dict[str, Any]]]] = {"cnn": _cnn,
                                                                                  "transformer": _transformer}


@pytest.fixture(scope="module")
def zoo() -> dict[tuple[str, str], tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any], dict[str, np.ndarray]]]:
    """(network, flavour) -> (raw export, canonical graph, canonicalization report, feeds)."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter and the simplifier flavour need onnxscript")
    built = {}
    for net_name, make in NETWORKS.items():
        net, args, axes = make()
        feeds = {n: a.numpy() for n, a in zip(axes, args)}
        for flavour in FLAVOURS:
            raw = _export(net, args, axes, flavour)
            canonical, report = canonicalize(raw, [feeds])
            built[net_name, flavour] = (raw, name_nodes(canonical), report, feeds)
        with torch.no_grad():
            built[net_name, "torch"] = (None, None, {}, net(*args).numpy())  # type: ignore[assignment]
    return built


def _facts_cnn(model: onnx.ModelProto) -> dict[str, Any]:
    groups, _ = find_groups(model)
    blocks, _ = find_residual_blocks(model)
    placement = plan_placement(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    return {"channel groups": sorted(g.channels for g in groups),
            "residual blocks": len(blocks), "equalization pairs": len(find_pairs(model)[0]),
            "int8 layers": sorted(Counter(kinds[n] for n in placement.nodes).items()), "family": placement.family}


def _facts_transformer(model: onnx.ModelProto) -> dict[str, Any]:
    ffn, _ = find_ffn_groups(model)
    heads, _ = find_attention_blocks(model, num_heads=2)
    placement = plan_placement(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    return {"ffn groups": len(ffn), "attention blocks": len(heads),
            "smoothable inputs": len(smoothable(model, placement.nodes)),
            "int8 layers": sorted(Counter(kinds[n] for n in placement.nodes).items()), "family": placement.family}


@pytest.mark.parametrize("network", list(NETWORKS))
def test_every_flavour_canonicalizes_to_the_same_function(zoo: dict, network: str) -> None:
    import onnxruntime as ort

    want = zoo[network, "torch"][3]
    for flavour in FLAVOURS:
        _, canonical, report, feeds = zoo[network, flavour]
        assert "kept" not in report, (flavour, report)
        assert not {"Constant", "Identity", "Dropout", "BatchNormalization", "Pad"} & {n.op_type for n in canonical.graph.node}, flavour
        got = ort.InferenceSession(canonical.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=flavour)
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in canonical.graph.input]
        assert all(isinstance(d[0], str) for d in dims), (flavour, dims)  # the dynamic batch axis survives


@pytest.mark.parametrize("network", list(NETWORKS))
def test_every_pass_finds_the_same_units_on_every_flavour(zoo: dict, network: str) -> None:
    facts = _facts_cnn if network == "cnn" else _facts_transformer
    found = {flavour: facts(zoo[network, flavour][1]) for flavour in FLAVOURS}
    reference = found["dynamo18"]
    for flavour, seen in found.items():
        assert seen == reference, f"{flavour}: {seen} != dynamo18: {reference}"
    if network == "cnn":
        assert reference["channel groups"] == [16, 24, 24, 36] and reference["residual blocks"] == 3
    else:
        assert reference["ffn groups"] == 2 and reference["attention blocks"] == 2


def test_the_raw_torchscript_export_hides_units_that_canonicalization_finds(zoo: dict) -> None:
    """What the issue measured: without canonicalization the pattern passes miss what Constant nodes and
    shape arithmetic hide (the guard that canonicalization is what makes the flavours agree)."""
    raw = zoo["cnn", "ts17"][0]
    assert {"Constant", "Pad"} <= {n.op_type for n in raw.graph.node}
    raw_groups = len(find_groups(name_nodes(raw))[0])
    assert raw_groups < len(_facts_cnn(zoo["cnn", "ts17"][1])["channel groups"])


def test_conversion_gives_the_same_int8_outputs_on_every_flavour(zoo: dict, tmp_path: Path) -> None:
    from converters import convert
    from runtime.package import Package
    from tests import builders

    images = builders.write_image_folder(tmp_path / "images", per_class=4, size=32)
    goldens = {}
    for flavour in ("ts13", "ts17+onnxscript", "dynamo18"):
        stem = flavour.replace("+", "-")
        path = tmp_path / f"{stem}.onnx"
        onnx.save(zoo["cnn", flavour][0], path)
        report = convert(path, tmp_path / f"{stem}.edgepkg", task="image-classification",
                         labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(16), calibration=images,
                         validation=images, quantize="int8", budget=None)
        package = Package.open(report.package)
        assert "kept" not in package.manifest.reports["canonicalization"]
        inputs, outputs = package.golden("s8s8")
        goldens[flavour] = (inputs["image"], outputs["logits"], report.validation.accuracy if report.validation else None)
    (x0, y0, a0) = goldens["dynamo18"]
    for flavour, (x, y, accuracy) in goldens.items():
        np.testing.assert_array_equal(x, x0)
        assert np.abs(y - y0).max() <= 2e-2 * max(1.0, float(np.abs(y0).max())), flavour
        assert accuracy == a0, flavour


def test_transformer_layers_and_int8_conversion_agree_on_every_flavour(zoo: dict, tmp_path: Path) -> None:
    """Text classification from each flavour: the same residual layers found, the same smoothing and
    int8 layers, int8 outputs within noise of each other (opset 13 spells LayerNorm out in primitives)."""
    from converters import convert
    from converters.pruning.transformer import find_residual_blocks as transformer_layers
    from runtime.package import Package
    from tests import builders

    tokenizer = builders.tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "calib.txt").write_text("bearing noise\noil leak at the pump\nthe pump is hot\ngrinding noise\n"
                                        "oil drip\nthe temperature is hot\n")
    outputs, int8_reports = {}, {}
    for flavour in FLAVOURS:
        canonical = zoo["transformer", flavour][1]
        layers = [(a.op_type, len(a.input)) for a, _, _ in transformer_layers(canonical)]
        assert layers == [(a.op_type, len(a.input)) for a, _, _ in transformer_layers(zoo["transformer", "dynamo18"][1])]
        assert len(layers) == 5  # attention and FFN residuals of both layers, and layer 1's mask add
        stem = flavour.replace("+", "-")
        onnx.save(zoo["transformer", flavour][0], tmp_path / f"{stem}.onnx")
        report = convert(tmp_path / f"{stem}.onnx", tmp_path / f"{stem}.edgepkg", task="text-classification",
                         labels=builders.TEXT_LABELS, tokenizer=tokenizer, calibration=tmp_path / "calib.txt",
                         quantize="int8", budget=None)
        package = Package.open(report.package)
        inputs, golden = package.golden("s8s8")
        outputs[flavour] = (inputs["input_ids"], golden["logits"])
        int8_reports[flavour] = report.int8 or {}
    ids0, y0 = outputs["dynamo18"]
    for flavour, (ids, y) in outputs.items():
        np.testing.assert_array_equal(ids, ids0)
        assert np.abs(y - y0).max() <= 5e-2 * max(1.0, float(np.abs(y0).max())), flavour
        smoothed = (int8_reports[flavour].get("smoothing") or {}).get("layers", [])
        assert len(smoothed) == len((int8_reports["dynamo18"].get("smoothing") or {}).get("layers", [])) > 0, flavour

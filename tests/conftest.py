"""Shared fixtures: tiny real models, a tokenizer, data folders and converted packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest

from tests import builders

_HARDWARE = {
    "gpu": (lambda: any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu")),
            "needs an NVIDIA GPU; this machine has none"),
    "tensorrt": (lambda: importlib.util.find_spec("tensorrt") is not None,
                 "needs the tensorrt package (pip install 'edge-sdk[tensorrt]' on a GPU machine)"),
    "jetson": (lambda: Path("/etc/nv_tegra_release").exists(), "needs a Jetson (no /etc/nv_tegra_release)"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Hardware-only tests skip, with the reason, where the hardware is missing."""
    present = {name: check() for name, (check, _) in _HARDWARE.items()}
    for item in items:
        for name, (_, reason) in _HARDWARE.items():
            if item.get_closest_marker(name) is not None and not present[name]:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def image_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "colors.onnx"
    onnx.save(builders.image_model(), path)
    return path


@pytest.fixture
def text_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "words.onnx"
    onnx.save(builders.text_model(), path)
    return path


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return builders.tokenizer_json(tmp_path / "tokenizer.json")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return builders.write_image_folder(tmp_path / "images")


@pytest.fixture
def text_validation(tmp_path: Path) -> Path:
    path = tmp_path / "val.tsv"
    path.write_text("bearing\tgrinding noise at the bearing\nleak\toil drip under the pump\n"
                    "overheating\tthe pump is hot\nleak\tleak\n")
    return path


@pytest.fixture
def image_package(tmp_path: Path, image_onnx: Path, image_folder: Path) -> Path:
    from converters import convert

    out = tmp_path / "colors.edgepkg"
    convert(image_onnx, out, task="image-classification", labels=builders.COLOR_LABELS,
            preprocess=builders.preprocess_dict(), validation=image_folder)
    return out


@pytest.fixture
def text_package(tmp_path: Path, text_onnx: Path, tokenizer_file: Path, text_validation: Path) -> Path:
    from converters import convert

    out = tmp_path / "words.edgepkg"
    convert(text_onnx, out, task="text-classification", labels=builders.TEXT_LABELS, tokenizer=tokenizer_file,
            max_length=16, validation=text_validation)
    return out

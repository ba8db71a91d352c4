"""Shared fixtures: tiny real models, a tokenizer, data folders and converted packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterator

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


STANDIN = Path(__file__).parent / "standin"
_STANDIN_MODULES = ("tensorrt", "cuda", "pycuda", "_standin_gpu")


def _drop_standin_modules() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in _STANDIN_MODULES]:
        del sys.modules[name]


@pytest.fixture
def trt_standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The tensorrt / cuda-python / pycuda API stand-ins (tests/standin, never GPU verification) first on
    sys.path, a fresh engine cache, and the device facts probed again; yields the stand-in's GPU state."""
    from runtime import backends

    for name in [n for n in sys.modules if n.split(".")[0] in _STANDIN_MODULES]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "engine-cache"))
    import _standin_gpu

    _standin_gpu.reset()
    backends.device_info.cache_clear()
    yield _standin_gpu
    backends.device_info.cache_clear()
    _drop_standin_modules()


@pytest.fixture
def int8_package(tmp_path: Path, image_folder: Path) -> Any:
    """A small CNN converted with int8 (all three graphs and scales.json), opened."""
    from converters import convert
    from runtime.package import Package

    onnx.save(builders.cnn_model(size=8), tmp_path / "cnn.onnx")
    convert(tmp_path / "cnn.onnx", tmp_path / "cnn.edgepkg", task="image-classification",
            labels=builders.COLOR_LABELS, preprocess=builders.preprocess_dict(), calibration=image_folder,
            quantize="int8", budget=None)
    return Package.open(tmp_path / "cnn.edgepkg")


@pytest.fixture
def image_onnx(tmp_path: Path) -> Path:
    return builders.save(builders.image_model(), tmp_path / "colors.onnx")


@pytest.fixture
def text_onnx(tmp_path: Path) -> Path:
    return builders.save(builders.text_model(), tmp_path / "words.onnx")


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
            preprocess=builders.preprocess_dict(), validation=image_folder, report=False)
    return out


@pytest.fixture
def reported_image_package(tmp_path: Path, image_onnx: Path, image_folder: Path) -> Path:
    """``image_package`` as convert writes it by default: with its HTML report (reports/report.html)."""
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
            max_length=16, validation=text_validation, report=False)
    return out

"""Readers for the user's calibration and validation data.

Images come as an ImageFolder (one sub-folder per label) or a plain folder of
images; texts as a file with one text per line, or a TSV ``label<TAB>text``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edge_sdk.errors import ConversionError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class Sample:
    """One input (an image path or a text) with its label when known."""

    item: str
    label: str | None = None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_samples(folder: str | os.PathLike[str], labels: Sequence[str] | None = None) -> list[Sample]:
    """Images of an ImageFolder (labelled by sub-folder) or of a plain folder (unlabelled), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ConversionError(f"image folder {str(root)!r} does not exist", hint="pass a directory of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        if labels is not None:
            unknown = [d.name for d in subdirs if d.name not in labels]
            if unknown:
                raise ConversionError(
                    f"folder {str(root)!r} has sub-folders {unknown} that are not labels {list(labels)}",
                    hint="name each sub-folder after one of the labels",
                )
        samples = [Sample(str(p), d.name) for d in subdirs for p in _images_in(d)]
    else:
        samples = [Sample(str(p)) for p in _images_in(root)]
    if not samples:
        raise ConversionError(f"folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples


def text_lines(path: str | os.PathLike[str]) -> list[Sample]:
    """Non-empty lines of a UTF-8 text file, one text each."""
    lines = [line.strip() for line in _read_text(path).splitlines()]
    samples = [Sample(line) for line in lines if line]
    if not samples:
        raise ConversionError(f"text file {str(path)!r} holds no texts", hint="write one text per line")
    return samples


def tsv_samples(path: str | os.PathLike[str], labels: Sequence[str]) -> list[Sample]:
    """Rows of a ``label<TAB>text`` file; every label must be one of ``labels``."""
    samples = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise ConversionError(f"{path} line {number} is {line[:60]!r}; expected 'label<TAB>text'")
        if label not in labels:
            raise ConversionError(f"{path} line {number} has label {label!r}; expected one of {list(labels)}")
        samples.append(Sample(text.strip(), label))
    if not samples:
        raise ConversionError(f"validation file {str(path)!r} holds no rows", hint="write 'label<TAB>text' lines")
    return samples


def _read_text(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"text file {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None

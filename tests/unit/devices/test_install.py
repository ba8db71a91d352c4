"""The Jetson install story as `edge-sdk devices` tells it, one case per fact that changes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from devices import DeviceInfo
from devices.install import PythonEnv, install_advice, python_env

JP6 = DeviceInfo(arch="aarch64", jetson_module="NVIDIA Jetson Orin Nano Developer Kit", l4t_release="36.4.3",
                 jetpack="6.2", gpu_name="Orin", gpu_compute_capability="8.7", cuda_version="12.6.68",
                 modules_probed=True)
JP5 = dataclasses.replace(JP6, jetson_module="NVIDIA Jetson Xavier NX", l4t_release="35.4.1", jetpack="5.1.2",
                          gpu_name="Xavier", gpu_compute_capability="7.2", cuda_version="11.4.315")
VENV = PythonEnv((3, 10), in_venv=True, system_site_packages=False, system_tensorrt=("3.10",))


def _lines(info: DeviceInfo, env: PythonEnv) -> dict[str, str]:
    return {a.topic: a.line() for a in install_advice(info, env)}


def test_a_venv_without_system_site_packages_on_jetpack_6_is_told_to_recreate_it() -> None:
    lines = _lines(JP6, VENV)
    assert lines["tensorrt"].startswith("todo: tensorrt: JetPack's TensorRT is in the system Python 3.10")
    assert "-m venv --system-site-packages" in lines["tensorrt"]
    assert lines["python"] == "ok: python: Python 3.10"


def test_jetpack_6_with_tensorrt_visible_and_the_wrong_cuda_python() -> None:
    ready = dataclasses.replace(JP6, tensorrt_version="10.3.0", cuda_python_version="13.0.1")
    env = dataclasses.replace(VENV, system_site_packages=True)
    lines = _lines(ready, env)
    assert lines["tensorrt"] == "ok: tensorrt: TensorRT 10.3.0 imports"
    assert lines["cuda-python"] == ("todo: cuda-python: cuda-python 13.0.1 needs a CUDA 13 driver; this device has "
                                    "CUDA 12.6.68: pip install 'cuda-python>=12,<13'")
    fixed = _lines(dataclasses.replace(ready, cuda_python_version="12.6.2", opencv_version="4.8.0",
                                       opencv_gstreamer=True, opencv_location="/usr/lib/python3.10/dist-packages/cv2"),
                   env)
    assert all(line.startswith("ok: ") for line in fixed.values()), fixed


def test_a_jetson_whose_opencv_cannot_open_gstreamer_is_told_to_keep_jetpacks() -> None:
    wheel = dataclasses.replace(JP6, opencv_version="4.12.0", opencv_gstreamer=False,
                                opencv_location="/home/line/edge-sdk/lib/python3.10/site-packages/cv2")
    line = _lines(wheel, VENV)["opencv"]
    assert line.startswith("todo: opencv: OpenCV 4.12.0 from /home/line/edge-sdk/") and "cannot open GStreamer" in line
    assert "pip uninstall -y opencv-python-headless" in line and "--system-site-packages" in line
    x86 = DeviceInfo(arch="x86_64", opencv_version="4.12.0", opencv_gstreamer=False, opencv_location="/x/cv2",
                     modules_probed=True)
    assert _lines(x86, VENV)["opencv"].startswith("ok: opencv: OpenCV 4.12.0 from /x/cv2: cameras, video files")


def test_this_machine_says_whether_its_opencv_opens_gstreamer_pipelines() -> None:
    import cv2

    import devices

    info = devices.detect()
    built_with = "GStreamer:                   YES" in cv2.getBuildInformation() or \
        any(line.strip().startswith("GStreamer:") and "YES" in line for line in cv2.getBuildInformation().splitlines())
    assert info.opencv_version == cv2.__version__ and info.opencv_gstreamer is built_with
    assert any(line.startswith(f"opencv: {cv2.__version__} (GStreamer: {'yes' if built_with else 'no'}")
               for line in info.summary_lines())


def test_no_cuda_binding_names_the_pin_for_this_cuda() -> None:
    assert "pip install 'cuda-python>=12,<13'" in _lines(JP6, VENV)["cuda-python"]
    assert _lines(dataclasses.replace(JP6, pycuda_version="2024.1"), VENV)["pycuda"] == "ok: pycuda: pycuda 2024.1"


def test_jetpack_5_python_3_8_is_told_what_to_do_instead() -> None:
    line = _lines(JP5, PythonEnv((3, 8), False, False, ("3.8",)))["python"]
    assert line.startswith("todo: python: JetPack 5.1.2 ships Python 3.8")
    assert "upgrade to JetPack 6" in line and "onnxruntime CPU backend" in line


def test_an_x86_gpu_gets_the_pip_extra_and_a_cpu_machine_needs_nothing() -> None:
    x86 = DeviceInfo(arch="x86_64", gpu_name="NVIDIA RTX 4000 Ada", gpu_compute_capability="8.9",
                     cuda_version="12.4", modules_probed=True)
    assert "pip install 'edge-sdk[tensorrt]'" in _lines(x86, PythonEnv((3, 11), True, False, ()))["tensorrt"]
    assert _lines(DeviceInfo(arch="x86_64"), VENV) == {
        "gpu": "ok: gpu: no NVIDIA GPU: the onnxruntime CPU backend serves every package"}


def test_python_env_finds_jetpacks_bindings_under_a_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/python3.10/dist-packages/tensorrt").mkdir(parents=True)
    (tmp_path / "usr/lib/python3.8/dist-packages/numpy").mkdir(parents=True)
    assert python_env(tmp_path).system_tensorrt == ("3.10",)
    assert python_env(tmp_path / "empty").system_tensorrt == ()

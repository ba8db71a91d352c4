"""What this machine needs installed for the GPU path, and the command that installs it.

On a Jetson the TensorRT Python bindings come with JetPack for its system Python
(``python3-libnvinfer``, in ``/usr/lib/python3.X/dist-packages``): PyPI's ``tensorrt`` does not
install on Tegra, so a virtual environment must be made with ``--system-site-packages`` to see
them. cuda-python's major version must be the driver's CUDA major (``pip install cuda-python``
gives 13.x, which needs a CUDA 13 driver; JetPack 6 is CUDA 12). JetPack 5 ships Python 3.8, older
than edge-sdk supports. Pure functions of :class:`~devices.probe.DeviceInfo` and
:class:`PythonEnv`, so each case is tested on facts, not on the machine running the tests.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .probe import DeviceInfo

__all__ = ["Advice", "PythonEnv", "python_env", "install_advice"]

MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class PythonEnv:
    version: tuple[int, int]
    in_venv: bool
    system_site_packages: bool
    system_tensorrt: tuple[str, ...]  # Python versions whose system dist-packages hold tensorrt ("3.10")


@dataclass(frozen=True)
class Advice:
    topic: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'todo'}: {self.topic}: {self.message}"


def python_env(root: str | os.PathLike[str] = "/") -> PythonEnv:
    """The running interpreter, and the TensorRT bindings JetPack put in the system Python under ``root``."""
    in_venv = sys.prefix != sys.base_prefix
    system = False
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if in_venv and cfg.is_file():
        for line in cfg.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "include-system-site-packages":
                system = value.strip().lower() == "true"
    found = sorted(Path(p).parent.parent.name.removeprefix("python") for p in
                   glob.glob(os.path.join(glob.escape(str(root)), "usr/lib/python3*/dist-packages/tensorrt")))
    return PythonEnv(sys.version_info[:2], in_venv, system, tuple(found))


def _major(version: str | None) -> int | None:
    head = (version or "").split(".")[0]
    return int(head) if head.isdigit() else None


def install_advice(info: DeviceInfo, env: PythonEnv) -> list[Advice]:
    """One line per thing the GPU path (and the cameras' OpenCV) needs here: what is fine, what to run to fix
    the rest."""
    opencv = _opencv(info)
    if info.gpu_name is None and not info.is_jetson:
        return [Advice("gpu", True, "no NVIDIA GPU: the onnxruntime CPU backend serves every package"),
                *([opencv] if opencv else [])]
    advice: list[Advice | None] = [_python(info, env), _tensorrt(info, env), _cuda_binding(info), opencv]
    return [a for a in advice if a is not None]


JETSON_OPENCV = ("use JetPack's OpenCV, which has GStreamer: `pip uninstall -y opencv-python-headless opencv-python` "
                 "in this environment, `sudo apt install nvidia-opencv` (or python3-opencv) and a venv made with "
                 "--system-site-packages")


def _opencv(info: DeviceInfo) -> Advice | None:
    """Whether this OpenCV opens what the device's cameras need (on a Jetson: GStreamer pipelines)."""
    if not info.modules_probed:
        return None
    if info.opencv_version is None:
        return Advice("opencv", False, "OpenCV does not import: " + (JETSON_OPENCV if info.is_jetson else
                      "pip install 'edge-sdk[opencv]'"))
    where = f"OpenCV {info.opencv_version} from {info.opencv_location}"
    if info.opencv_gstreamer:
        return Advice("opencv", True, f"{where} opens GStreamer pipelines (CSI cameras: nvarguscamerasrc)")
    if info.is_jetson:
        return Advice("opencv", False, f"{where} cannot open GStreamer pipelines, so CSI cameras will not open "
                      f"(a pip wheel replaced JetPack's OpenCV?): {JETSON_OPENCV}")
    return Advice("opencv", True, f"{where}: cameras, video files and RTSP/HTTP streams (FFmpeg); "
                  "no GStreamer pipelines")


def _python(info: DeviceInfo, env: PythonEnv) -> Advice:
    py = ".".join(map(str, env.version))
    if env.version >= MIN_PYTHON:
        return Advice("python", True, f"Python {py}")
    if info.is_jetson and (info.l4t_release or "").startswith("35."):
        return Advice("python", False, f"JetPack {info.jetpack or '5'} ships Python {py} and TensorRT bindings for it; "
                      "edge-sdk needs Python >= 3.10: on Orin, upgrade to JetPack 6; on Xavier (JetPack 5 is its "
                      "last), serve with the onnxruntime CPU backend, or build TensorRT's Python bindings for "
                      "Python 3.10 from the TensorRT sources (NVIDIA/TensorRT python/)")
    return Advice("python", False, f"Python {py}; edge-sdk needs Python >= 3.10")


def _tensorrt(info: DeviceInfo, env: PythonEnv) -> Advice:
    here = ".".join(map(str, env.version))
    if info.tensorrt_version:
        return Advice("tensorrt", True, f"TensorRT {info.tensorrt_version} imports")
    if not info.is_jetson:
        return Advice("tensorrt", False, "pip install 'edge-sdk[tensorrt]' (NVIDIA's tensorrt wheels for CUDA 12)")
    if here in env.system_tensorrt and env.in_venv and not env.system_site_packages:
        return Advice("tensorrt", False, f"JetPack's TensorRT is in the system Python {here} but this virtual "
                      f"environment does not see it: recreate it with `python{here} -m venv --system-site-packages "
                      f"{sys.prefix}` (PyPI's tensorrt does not install on Jetson)")
    if env.system_tensorrt:
        return Advice("tensorrt", False, f"JetPack's TensorRT is for Python {', '.join(env.system_tensorrt)}, not "
                      f"{here}: run edge-sdk with that Python (a venv made with --system-site-packages)")
    return Advice("tensorrt", False, "install JetPack's TensorRT Python bindings: sudo apt install python3-libnvinfer "
                  "(part of nvidia-jetpack), then use a venv made with --system-site-packages")


def _cuda_binding(info: DeviceInfo) -> Advice:
    cuda = _major(info.cuda_version)
    pin = f"'cuda-python>={cuda},<{cuda + 1}'" if cuda else "the cuda-python whose major version is the driver's CUDA"
    have = _major(info.cuda_python_version)
    if have is not None and cuda is not None and have > cuda:
        return Advice("cuda-python", False, f"cuda-python {info.cuda_python_version} needs a CUDA {have} driver; "
                      f"this device has CUDA {info.cuda_version}: pip install {pin}")
    if have is not None:
        return Advice("cuda-python", True, f"cuda-python {info.cuda_python_version}")
    if info.pycuda_version:
        return Advice("pycuda", True, f"pycuda {info.pycuda_version}")
    return Advice("cuda-python", False, f"no CUDA binding for the TensorRT runner: pip install {pin} "
                  "(or pycuda, which builds against JetPack's CUDA)")

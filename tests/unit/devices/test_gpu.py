"""Compute capability from the CUDA driver API, read through ctypes.

The driver here is an API stand-in: a shared library compiled in the test that exports the five
driver-API symbols the probe calls, with cuda.h's signatures. It checks the ctypes marshalling
(pointers, attribute numbers, the name buffer), not a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from devices.gpu import CudaGpu, parse_nvidia_smi, query_driver

_DRIVER = r"""
#include <string.h>
typedef int CUresult; typedef int CUdevice;
CUresult cuInit(unsigned int flags) { return flags == 0 ? INIT_RESULT : 1; }
CUresult cuDeviceGetCount(int *count) { *count = 2; return 0; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = 10 + ordinal; return 0; }
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    if (attribute == 75) { *value = device == 10 ? 8 : 12; return 0; }   /* COMPUTE_CAPABILITY_MAJOR */
    if (attribute == 76) { *value = device == 10 ? 7 : 0; return 0; }    /* COMPUTE_CAPABILITY_MINOR */
    return 1;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    strncpy(name, device == 10 ? "Orin (nvgpu)" : "NVIDIA RTX PRO 6000", len); return 0;
}
"""


def _compile(tmp_path: Path, init_result: int) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the driver-API stand-in")
    source = tmp_path / "driver.c"
    source.write_text(_DRIVER)
    library = tmp_path / f"libcuda-{init_result}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f"-DINIT_RESULT={init_result}", "-o", str(library), str(source)],
                   check=True)
    return str(library)


def test_every_device_with_its_compute_capability(tmp_path: Path) -> None:
    gpus, reason = query_driver(_compile(tmp_path, 0))
    assert reason is None
    assert gpus == [CudaGpu("Orin (nvgpu)", "8.7", "libcuda"), CudaGpu("NVIDIA RTX PRO 6000", "12.0", "libcuda")]


def test_a_driver_that_fails_to_initialise_says_so(tmp_path: Path) -> None:
    gpus, reason = query_driver(_compile(tmp_path, 100))  # CUDA_ERROR_NO_DEVICE
    assert gpus == [] and reason is not None and "cuInit failed with CUresult 100" in reason


def test_no_driver_library_is_a_reason_not_an_error(tmp_path: Path) -> None:
    gpus, reason = query_driver(str(tmp_path / "libcuda.so.1"))
    assert gpus == [] and reason is not None and reason.startswith("no CUDA driver library")


def test_nvidia_smi_csv_is_parsed_and_junk_skipped() -> None:
    text = "NVIDIA H200, 9.0\nNVIDIA GeForce RTX 4090, 8.9\n[N/A], [N/A]\n\nOrin, 8.7.1\n"
    assert parse_nvidia_smi(text) == [CudaGpu("NVIDIA H200", "9.0", "nvidia-smi"),
                                      CudaGpu("NVIDIA GeForce RTX 4090", "8.9", "nvidia-smi")]

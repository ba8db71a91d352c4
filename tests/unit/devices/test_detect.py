"""devices.detect() against fake roots built from real files, and once against this machine."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import devices
from devices import DeviceInfo, detect, jetpack_for_l4t
from devices.jetson import jetson_family, parse_l4t_release
from edge_sdk.errors import DeviceError, EdgeSDKError

from .conftest import RootFactory

NO_MODEL = "proc/device-tree/model, sys/firmware/devicetree/base/model: not found"
NO_L4T = "etc/nv_tegra_release: not found"
NO_CUDA = "usr/local/cuda/version.json, usr/local/cuda/version.txt: not found"
NO_GPU = "proc/driver/nvidia/gpus: no NVIDIA GPU listed"


# --- the four reference machines -----------------------------------------------------------


def test_orin_nano_on_jetpack_6(orin_nano_root: Path) -> None:
    info = detect(orin_nano_root)

    assert info.is_jetson
    assert info.jetson_module == "NVIDIA Jetson Orin Nano Developer Kit"  # NUL stripped
    assert info.board_model == info.jetson_module
    assert info.jetson_family == "orin-nano"
    assert (info.l4t_release, info.jetpack) == ("36.3.0", "6.0")
    assert info.arch == "aarch64"
    assert (info.cpu_model, info.cpu_count) == ("ARM Cortex-A78AE", 6)
    assert info.cpu_flags == frozenset({"asimd", "asimddp"})
    assert info.int8_dot_product
    assert (info.memory_total_mb, info.memory_available_mb) == (7441, 5755)
    assert info.cuda_version == "12.2.20230823"
    assert (info.gpu_name, info.gpu_compute_capability) == ("Orin", "8.7")
    assert info.dla_cores == 0
    assert [note.split(":")[0] for note in info.inferred] == [
        "gpu_name, gpu_compute_capability",
        "dla_cores",
    ]
    assert info.probe_errors == ()


def test_xavier_nx_on_jetpack_5(xavier_nx_root: Path) -> None:
    info = detect(xavier_nx_root)

    assert info.jetson_module == "NVIDIA Jetson Xavier NX Developer Kit"
    assert info.jetson_family == "xavier-nx"
    assert (info.l4t_release, info.jetpack) == ("35.4.1", "5.1.2")
    assert (info.cpu_model, info.cpu_count) == ("NVIDIA Carmel", 6)
    # Carmel reports no asimddp in cpuinfo: no int8 dot product on Xavier's CPU.
    assert info.cpu_flags == frozenset({"asimd"})
    assert not info.int8_dot_product
    assert info.memory_total_mb == 7591
    assert info.cuda_version == "11.4.20220822"
    assert (info.gpu_name, info.gpu_compute_capability) == ("Xavier", "7.2")
    assert info.dla_cores == 2  # counted from the two nvdla nodes, not the table
    assert not any(note.startswith("dla_cores") for note in info.inferred)
    assert info.probe_errors == ()


def test_x86_cpu_only_box(x86_root: Path) -> None:
    info = detect(x86_root)

    assert not info.is_jetson
    assert (info.board_model, info.jetson_module, info.jetson_family) == (None, None, None)
    assert (info.l4t_release, info.jetpack) == (None, None)
    assert info.arch == "x86_64"
    assert info.cpu_model == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert info.cpu_count == 4
    assert info.cpu_flags == frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert info.int8_dot_product
    assert (info.memory_total_mb, info.memory_available_mb) == (32011, 29406)
    assert (info.gpu_name, info.gpu_compute_capability, info.dla_cores) == (None, None, 0)
    assert info.cuda_version is None
    assert info.inferred == ()
    assert info.probe_errors == (NO_MODEL, NO_L4T, NO_GPU, NO_CUDA)


def test_raspberry_pi_is_not_a_jetson(raspberry_pi_root: Path) -> None:
    info = detect(raspberry_pi_root)

    assert info.board_model == "Raspberry Pi 4 Model B Rev 1.4"  # from sys/firmware/devicetree
    assert not info.is_jetson
    assert (info.jetson_module, info.jetson_family, info.jetpack) == (None, None, None)
    assert info.arch == "aarch64"
    assert (info.cpu_model, info.cpu_count) == ("ARM Cortex-A72", 4)
    assert info.cpu_flags == frozenset({"asimd"})
    assert not info.int8_dot_product
    assert (info.gpu_name, info.dla_cores) == (None, 0)
    assert info.probe_errors == (NO_L4T, NO_GPU, NO_CUDA)


# --- variations on single files ------------------------------------------------------------


def test_jetson_nano_on_jetpack_4_reads_cuda_version_txt(
    make_root: RootFactory, orin_nano_files: dict[str, str | bytes]
) -> None:
    del orin_nano_files["usr/local/cuda/version.json"]
    orin_nano_files.update(
        {
            "proc/device-tree/model": b"NVIDIA Jetson Nano Developer Kit\x00",
            "etc/nv_tegra_release": "# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, "
            "EABI: aarch64, DATE: Fri Jun  9 04:25:08 UTC 2023\n",
            "usr/local/cuda/version.txt": "CUDA Version 10.2.300\n",
        }
    )
    info = detect(make_root(orin_nano_files))

    assert (info.jetson_family, info.l4t_release, info.jetpack) == ("nano", "32.7.4", "4.6.4")
    assert info.cuda_version == "10.2.300"
    assert (info.gpu_name, info.gpu_compute_capability) == ("NVIDIA Tegra X1", "5.3")
    assert info.dla_cores == 0


@pytest.mark.parametrize(
    ("model", "dla_cores"),
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", 2),
        ("NVIDIA Jetson AGX Xavier Developer Kit", 2),
        # 16 GB Orin NX has 2 DLAs, 8 GB has 1: the model string cannot tell, so no guess.
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", None),
    ],
)
def test_dla_cores_from_module_table_without_sysfs(
    make_root: RootFactory,
    orin_nano_files: dict[str, str | bytes],
    model: str,
    dla_cores: int | None,
) -> None:
    orin_nano_files["proc/device-tree/model"] = model.encode() + b"\x00"
    info = detect(make_root(orin_nano_files))

    assert info.dla_cores == dla_cores
    assert any(n.startswith("dla_cores") for n in info.inferred) == (dla_cores is not None)
    unknown = "dla_cores: no sys/devices/platform and no table entry for orin-nx"
    assert info.probe_errors == (() if dla_cores is not None else (unknown,))


def test_dla_nodes_in_sysfs_win_over_the_table(
    make_root: RootFactory, orin_nano_files: dict[str, str | bytes]
) -> None:
    # JetPack 6 nests host1x under bus@0; a DLA on an "Orin Nano" root is counted, not denied.
    orin_nano_files["sys/devices/platform/bus@0/13e00000.host1x/15880000.nvdla0/uevent"] = ""
    info = detect(make_root(orin_nano_files))

    assert info.dla_cores == 1
    assert not any(note.startswith("dla_cores") for note in info.inferred)


def test_discrete_gpu_name_comes_from_the_nvidia_driver(
    make_root: RootFactory, x86_root: Path
) -> None:
    files = {
        "proc/driver/nvidia/gpus/0000:01:00.0/information": (
            "Model: \t\t NVIDIA RTX A2000 12GB\nIRQ:   \t\t 142\nBus Type: \t PCIe\n"
        ),
        "usr/local/cuda/version.json": '{"cuda": {"name": "CUDA SDK", "version": "12.4.1"}}',
    }
    info = detect(make_root(files), machine="x86_64")

    assert info.gpu_name == "NVIDIA RTX A2000 12GB"
    assert info.gpu_compute_capability is None  # not in any file; no table for discrete GPUs
    assert info.cuda_version == "12.4.1"
    assert info.inferred == ()


def test_machine_override_wins(x86_root: Path) -> None:
    assert detect(x86_root, machine="aarch64").arch == "aarch64"


def test_empty_root_records_every_missing_file(make_root: RootFactory) -> None:
    info = detect(make_root({}))

    assert (info.arch, info.cpu_model, info.cpu_count, info.cpu_flags) == (
        "unknown", None, 0, frozenset()
    )
    assert (info.memory_total_mb, info.memory_available_mb) == (None, None)
    assert info.probe_errors == (
        NO_MODEL,
        NO_L4T,
        "proc/cpuinfo: not found",
        "arch: cpuinfo shows neither x86 flags nor Arm Features",
        "proc/meminfo: not found",
        NO_GPU,
        NO_CUDA,
    )


def test_unreadable_or_odd_files_are_reported_not_raised(
    make_root: RootFactory, orin_nano_files: dict[str, str | bytes]
) -> None:
    orin_nano_files["etc/nv_tegra_release"] = "garbage\n"
    orin_nano_files["proc/meminfo"] = "MemTotal:       7620440 kB\n"
    orin_nano_files["usr/local/cuda/version.json"] = "{not json"
    info = detect(make_root(orin_nano_files))

    assert (info.l4t_release, info.jetpack, info.memory_available_mb) == (None, None, None)
    assert info.memory_total_mb == 7441
    assert info.cuda_version is None
    assert info.probe_errors == (
        "etc/nv_tegra_release: unrecognised first line 'garbage'",
        "proc/meminfo: no MemAvailable line",
        "usr/local/cuda/version.json: no cuda.version entry",
    )


def test_probe_failures_are_logged(x86_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="devices.probe"):
        info = detect(x86_root)

    logged = [r.getMessage() for r in caplog.records if r.name == "devices.probe"]
    assert logged == [f"device probe failed: {error}" for error in info.probe_errors]


# --- the root argument ---------------------------------------------------------------------


def test_missing_root_raises_device_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    with pytest.raises(DeviceError) as caught:
        detect(missing)

    assert str(missing) in caught.value.message
    assert "does not exist" in caught.value.message
    assert caught.value.hint and "'/'" in caught.value.hint
    assert isinstance(caught.value, EdgeSDKError)


def test_file_as_root_raises_device_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "cpuinfo"
    not_a_dir.write_text("processor : 0\n")
    with pytest.raises(DeviceError, match="is not a directory"):
        detect(not_a_dir)


# --- tables and parsers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_line", "l4t", "jetpack"),
    [
        ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64", "36.3.0", "6.0"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", "36.4.0", "6.1"),
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", "36.4.3", "6.2"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2"),
        ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64", "35.5.0", "5.1.3"),
        ("# R35 (release), REVISION: 6.0, GCID: 36191598, BOARD: t186ref, EABI: aarch64", "35.6.0", "5.1.4"),
        ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64", "32.7.4", "4.6.4"),
        # A release the table does not list maps to no JetPack rather than to a guess.
        ("# R36 (release), REVISION: 9.9, GCID: 1, BOARD: generic, EABI: aarch64", "36.9.9", None),
        ("# R36 (release), REVISION: 2.0, GCID: 1, BOARD: generic, EABI: aarch64", "36.2.0", None),
    ],
)
def test_l4t_release_and_jetpack(first_line: str, l4t: str, jetpack: str | None) -> None:
    assert parse_l4t_release(first_line + "\n# KERNEL_VARIANT: oot\n") == l4t
    assert jetpack_for_l4t(l4t) == jetpack


def test_jetpack_lookup_pads_short_releases() -> None:
    assert jetpack_for_l4t("36.3") == "6.0"
    assert parse_l4t_release("not the release line") is None


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", "orin-agx"),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "orin-nx"),
        ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "orin-nano"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "xavier-nx"),
        ("Jetson-AGX", "xavier-agx"),
        ("NVIDIA Jetson Nano Developer Kit", "nano"),
        ("NVIDIA Jetson TX2 NX Developer Kit", "tx2"),
        ("NVIDIA Jetson AGX Thor Developer Kit", "thor"),
        ("NVIDIA Jetson Unknown Board", None),
    ],
)
def test_jetson_family(model: str, family: str | None) -> None:
    assert jetson_family(model) == family


# --- the DeviceInfo value ------------------------------------------------------------------


def test_device_info_is_frozen(orin_nano_root: Path) -> None:
    info = detect(orin_nano_root)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.arch = "x86_64"  # type: ignore[misc]


def test_to_dict_is_json_serialisable(orin_nano_root: Path) -> None:
    info = detect(orin_nano_root)
    data = json.loads(json.dumps(info.to_dict()))

    assert data["cpu_flags"] == ["asimd", "asimddp"]
    assert data["jetson_module"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert data["is_jetson"] is True and data["int8_dot_product"] is True
    assert data["onnxruntime_providers"] == [] and data["probe_errors"] == []
    assert {f.name for f in dataclasses.fields(DeviceInfo)} <= set(data)


def test_summary_lines_are_key_value(orin_nano_root: Path, x86_root: Path) -> None:
    jetson = detect(orin_nano_root).summary_lines()
    server = detect(x86_root).summary_lines()

    for line in jetson + server:
        key, sep, value = line.partition(": ")
        assert sep and key and value, line
    assert "device: NVIDIA Jetson Orin Nano Developer Kit (orin-nano)" in jetson
    assert "l4t: 36.3.0 (JetPack 6.0)" in jetson
    assert "tensorrt: not probed" in jetson
    assert "device: not a Jetson" in server
    assert f"probe error: {NO_L4T}" in server


def test_public_api_is_exactly_all() -> None:
    import pkgutil

    public = {name for name in vars(devices) if not name.startswith("_")}
    # Submodules appear as attributes once imported; the function devices.fingerprint shadows
    # the submodule of the same name, so it stays public.
    submodules = {m.name for m in pkgutil.iter_modules(devices.__path__)} - {"fingerprint"}
    assert set(devices.__all__) == public - submodules - {"annotations"}
    assert sorted(devices.__all__) == ["DeviceInfo", "Fingerprint", "detect", "fingerprint", "jetpack_for_l4t"]
    assert callable(devices.detect)
    assert callable(devices.fingerprint) and isinstance(devices.Fingerprint, type)


# --- Python module probes ------------------------------------------------------------------

FAKE_MODULES = ("tensorrt", "pycuda", "cuda")


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory of stand-in optional modules, first on sys.path, removed afterwards."""
    site = tmp_path / "site"
    for name, body in {
        "tensorrt": '__version__ = "10.3.0"\n',
        "pycuda": "VERSION = (2024, 1, 2)\nVERSION_TEXT = '2024.1.2'\n",
        "cuda": "raise OSError('libcuda.so.1: cannot open shared object file')\n",
    }.items():
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(body)
    saved = {name: sys.modules.pop(name) for name in FAKE_MODULES if name in sys.modules}
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [n for n in sys.modules if n.split(".")[0] in FAKE_MODULES]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_fake_root_does_not_probe_modules_by_default(orin_nano_root: Path) -> None:
    info = detect(orin_nano_root)

    assert not info.modules_probed
    assert (info.tensorrt_version, info.onnxruntime_version, info.onnxruntime_providers) == (
        None, None, ()
    )


def test_module_probes_read_versions_and_report_failures(
    orin_nano_root: Path, fake_site: Path
) -> None:
    info = detect(orin_nano_root, probe_modules=True)

    assert info.modules_probed
    assert info.tensorrt_version == "10.3.0"
    assert info.pycuda_version == "2024.1.2"
    assert info.cuda_python_version is None
    assert info.probe_errors == (
        "cuda-python: import failed: OSError: libcuda.so.1: cannot open shared object file",
    )
    assert info.onnxruntime_version == __import__("onnxruntime").__version__
    assert "CPUExecutionProvider" in info.onnxruntime_providers
    assert info.openvino_version == _installed("openvino")  # read from its metadata
    assert f"openvino: {info.openvino_version or 'not available'}" in info.summary_lines()


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed")
def test_missing_module_is_reported_as_not_installed(x86_root: Path) -> None:
    info = detect(x86_root, probe_modules=True)

    assert info.tensorrt_version is None
    assert "tensorrt: not installed" in info.probe_errors
    assert "tensorrt: not available" in info.summary_lines()


# --- import weight and the live machine ----------------------------------------------------


def test_importing_devices_stays_light() -> None:
    code = textwrap.dedent(
        """
        import sys
        import devices
        heavy = ("onnx", "onnxruntime", "torch", "tensorrt", "pycuda", "cuda",
                 "numpy", "converters", "runtime")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        ours = sorted(m for m in sys.modules if m.split(".")[0] == "edge_sdk")
        print(loaded, ours)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[] ['edge_sdk', 'edge_sdk.errors']"


def test_detect_on_this_machine() -> None:
    info = detect()

    assert info.root == "/"
    assert info.arch == platform.machine()
    assert info.modules_probed
    assert info.cpu_count >= 1
    assert info.memory_total_mb is None or info.memory_total_mb > 0
    assert "CPUExecutionProvider" in info.onnxruntime_providers
    for label, version in [
        ("tensorrt", info.tensorrt_version),
        ("pycuda", info.pycuda_version),
        ("cuda-python", info.cuda_python_version),
    ]:
        assert version is not None or any(e.startswith(f"{label}: ") for e in info.probe_errors)
    json.dumps(info.to_dict())
    if os.path.exists("/etc/nv_tegra_release"):
        assert info.l4t_release is not None


def test_root_path_with_glob_characters(tmp_path: Path) -> None:
    root = tmp_path / "odd[1]*root"
    node = root / "sys/devices/platform/host1x/15880000.nvdla0"
    node.mkdir(parents=True)
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")

    assert detect(root).dla_cores == 1

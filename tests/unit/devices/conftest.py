"""Fake device roots: real files under tmp_path, laid out as on the machines they mimic.

The file contents are trimmed captures of real machines (cpuinfo keeps every field of a
processor block, but only as many blocks as the machine has processors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

RootFactory = Callable[[Mapping[str, str | bytes]], Path]

ORIN_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
    "dcpop asimddp uscat ilrcpc flagm paca pacg"
)
CARMEL_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp"
PI4_FEATURES = "fp asimd evtstrm crc32 cpuid"
ICELAKE_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor "
    "ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe "
    "popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault "
    "epb cat_l3 invpcid_single ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow vnmi "
    "flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid cqm "
    "rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb intel_pt avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total "
    "cqm_mbm_local split_lock_detect wbnoinvd dtherm ida arat pln pts avx512vbmi umip pku ospke "
    "avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq la57 "
    "rdpid fsrm md_clear pconfig flush_l1d arch_capabilities"
)


def arm_cpuinfo(count: int, features: str, implementer: str, part: str, extra: str = "") -> str:
    blocks = [
        f"processor\t: {index}\n"
        "model name\t: ARMv8 Processor rev 1 (v8l)\n"
        "BogoMIPS\t: 62.50\n"
        f"Features\t: {features}\n"
        f"CPU implementer\t: {implementer}\n"
        "CPU architecture: 8\n"
        "CPU variant\t: 0x0\n"
        f"CPU part\t: {part}\n"
        "CPU revision\t: 1\n"
        f"{extra}"
        for index in range(count)
    ]
    return "\n".join(blocks) + "\n"


def x86_cpuinfo(count: int, model: str, flags: str) -> str:
    blocks = [
        f"processor\t: {index}\n"
        "vendor_id\t: GenuineIntel\n"
        "cpu family\t: 6\n"
        "model\t\t: 106\n"
        f"model name\t: {model}\n"
        "stepping\t: 6\n"
        "cpu MHz\t\t: 2000.000\n"
        "cache size\t: 49152 KB\n"
        f"flags\t\t: {flags}\n"
        "bogomips\t: 4000.00\n"
        "address sizes\t: 46 bits physical, 57 bits virtual\n"
        "power management:\n"
        for index in range(count)
    ]
    return "\n".join(blocks) + "\n"


def meminfo(total_kb: int, available_kb: int | None) -> str:
    lines = [f"MemTotal:       {total_kb} kB", f"MemFree:        {total_kb // 2} kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb} kB")
    lines += ["Buffers:           40960 kB", "Cached:          1048576 kB", "SwapTotal:       0 kB"]
    return "\n".join(lines) + "\n"


CUDA_12_2_JSON = """{
   "cuda" : {
      "name" : "CUDA SDK",
      "version" : "12.2.20230823"
   },
   "cuda_cudart" : {
      "name" : "CUDA Runtime (cudart)",
      "version" : "12.2.140"
   }
}
"""

ORIN_NANO_FILES: dict[str, str | bytes] = {
    "proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00",
    "etc/nv_tegra_release": (
        "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
        "DATE: Fri Jul 19 23:24:25 UTC 2024\n"
        "# KERNEL_VARIANT: oot\n"
        "TARGET_USERSPACE_LIB_DIR=nvidia\n"
        "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
    ),
    "proc/cpuinfo": arm_cpuinfo(6, ORIN_FEATURES, "0x41", "0xd42"),
    "proc/meminfo": meminfo(7620440, 5893120),
    "usr/local/cuda/version.json": CUDA_12_2_JSON,
}

XAVIER_NX_FILES: dict[str, str | bytes] = {
    "proc/device-tree/model": b"NVIDIA Jetson Xavier NX Developer Kit\x00",
    "etc/nv_tegra_release": (
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
        "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
    ),
    "proc/cpuinfo": arm_cpuinfo(6, CARMEL_FEATURES, "0x4e", "0x004", "MTS version\t: 55637613\n"),
    "proc/meminfo": meminfo(7773224, 6012344),
    "usr/local/cuda/version.json": CUDA_12_2_JSON.replace("12.2.20230823", "11.4.20220822"),
    # DLA engines appear as host1x children on Xavier; empty directories stand in for them.
    "sys/devices/platform/host1x/15880000.nvdla0/uevent": "OF_NAME=nvdla0\n",
    "sys/devices/platform/host1x/158c0000.nvdla1/uevent": "OF_NAME=nvdla1\n",
    "sys/devices/platform/host1x/15340000.vic/uevent": "OF_NAME=vic\n",
}

X86_FILES: dict[str, str | bytes] = {
    "proc/cpuinfo": x86_cpuinfo(4, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", ICELAKE_FLAGS),
    "proc/meminfo": meminfo(32780228, 30112004),
}

RASPBERRY_PI_FILES: dict[str, str | bytes] = {
    # Only the sysfs spelling of the device tree, to exercise the fallback path.
    "sys/firmware/devicetree/base/model": b"Raspberry Pi 4 Model B Rev 1.4\x00",
    "proc/cpuinfo": arm_cpuinfo(4, PI4_FEATURES, "0x41", "0xd08")
    + "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
    "proc/meminfo": meminfo(3884328, 3401232),
}


@pytest.fixture
def make_root(tmp_path: Path) -> RootFactory:
    """Build a fake root from {relative path: content}; each call gets a fresh directory."""
    counter = iter(range(1_000_000))

    def build(files: Mapping[str, str | bytes]) -> Path:
        root = tmp_path / f"root{next(counter)}"
        root.mkdir()
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return root

    return build


@pytest.fixture
def orin_nano_root(make_root: RootFactory) -> Path:
    """Jetson Orin Nano devkit on JetPack 6.0 (L4T 36.3.0, CUDA 12.2)."""
    return make_root(ORIN_NANO_FILES)


@pytest.fixture
def xavier_nx_root(make_root: RootFactory) -> Path:
    """Jetson Xavier NX devkit on JetPack 5.1.2 (L4T 35.4.1), DLA nodes in sysfs."""
    return make_root(XAVIER_NX_FILES)


@pytest.fixture
def x86_root(make_root: RootFactory) -> Path:
    """CPU-only Ice Lake Xeon server: no device tree, no L4T, no CUDA."""
    return make_root(X86_FILES)


@pytest.fixture
def raspberry_pi_root(make_root: RootFactory) -> Path:
    """Raspberry Pi 4 (64-bit OS): an Arm board with a device tree that is not a Jetson."""
    return make_root(RASPBERRY_PI_FILES)


@pytest.fixture
def orin_nano_files() -> dict[str, str | bytes]:
    """A fresh copy of the Orin Nano files, for tests that vary one of them."""
    return dict(ORIN_NANO_FILES)

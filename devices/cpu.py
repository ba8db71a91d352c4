"""Parse ``/proc/cpuinfo``: architecture, model, processor count and int8 ISA features.

Pure functions of the file's text, so tests feed them real cpuinfo captures. Only the
features that decide how fast int8 runs on the CPU are kept; the rest of the (long) flag
list is noise for our purposes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARM_INT8_FEATURES",
    "cpuid_features",
    "reconcile_with_cpuid",
    "X86_INT8_FEATURES",
    "DOT_PRODUCT_FEATURES",
    "CpuInfo",
    "parse_cpuinfo",
]

X86_INT8_FEATURES = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
"""x86 cpuinfo ``flags`` that matter for int8 kernels (VNNI = int8 dot product, AMX = tiles)."""

ARM_INT8_FEATURES = frozenset({"asimd", "asimddp", "i8mm", "sve"})
"""Arm cpuinfo ``Features`` that matter for int8 kernels (asimddp = SDOT/UDOT, i8mm = SMMLA)."""

DOT_PRODUCT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "asimddp"})
"""Any one of these means the CPU has an int8 dot-product instruction."""

_ARM_PARTS: dict[tuple[str, str], str] = {
    ("0x41", "0xd03"): "ARM Cortex-A53",
    ("0x41", "0xd07"): "ARM Cortex-A57",  # Jetson Nano, TX1, TX2
    ("0x41", "0xd08"): "ARM Cortex-A72",  # Raspberry Pi 4
    ("0x41", "0xd0b"): "ARM Cortex-A76",  # Raspberry Pi 5
    ("0x41", "0xd0c"): "ARM Neoverse-N1",
    ("0x41", "0xd42"): "ARM Cortex-A78AE",  # Jetson Orin
    ("0x41", "0xd4f"): "ARM Neoverse-V2",
    ("0x4e", "0x004"): "NVIDIA Carmel",  # Jetson Xavier
}
"""(CPU implementer, CPU part) -> core name; arm64 cpuinfo has no useful "model name"."""

_ARM_ARCH = {"8": "aarch64", "7": "armv7l"}
"""cpuinfo ``CPU architecture`` -> the name ``platform.machine()`` would report."""


@dataclass(frozen=True)
class CpuInfo:
    """What one cpuinfo text says. ``arch`` is None when the text does not tell."""

    arch: str | None
    model: str | None
    count: int
    flags: frozenset[str]


def _first_block(text: str) -> dict[str, str]:
    """Key/value pairs of the first processor block (all processors report the same ISA)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields.get("processor") is not None:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _count_processors(text: str) -> int:
    count = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "processor" and value.strip().isdigit():
            count += 1
    return count


def _arm_model(fields: dict[str, str]) -> str | None:
    implementer = fields.get("CPU implementer", "").lower()
    part = fields.get("CPU part", "").lower()
    known = _ARM_PARTS.get((implementer, part))
    if known:
        return known
    if fields.get("model name"):
        return fields["model name"]
    if implementer and part:
        return f"Arm CPU (implementer {implementer}, part {part})"
    return None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse a ``/proc/cpuinfo`` text; x86 lists ``flags``, Arm lists ``Features``."""
    fields = _first_block(text)
    count = _count_processors(text)
    if "flags" in fields:
        present = frozenset(fields["flags"].split())
        return CpuInfo(
            arch="x86_64",
            model=fields.get("model name") or None,
            count=count,
            flags=present & X86_INT8_FEATURES,
        )
    if "Features" in fields:
        present = frozenset(fields["Features"].split())
        return CpuInfo(
            arch=_ARM_ARCH.get(fields.get("CPU architecture", "")),
            model=_arm_model(fields),
            count=count,
            flags=present & ARM_INT8_FEATURES,
        )
    return CpuInfo(arch=None, model=fields.get("model name") or None, count=count, flags=frozenset())


#: numpy's run-time CPUID feature names -> the cpuinfo flags they confirm (x86).
_CPUID_NAMES = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni"}


def cpuid_features() -> dict[str, bool] | None:
    """What this process's CPU reports through CPUID, as numpy's dispatcher read it (None if unknown).

    onnxruntime picks its int8 kernels from CPUID, not from ``/proc/cpuinfo``; the two disagree under
    user-mode emulation (qemu-user shows the host's cpuinfo) and in some containers."""
    import importlib

    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy 2, numpy 1
        try:
            features = getattr(importlib.import_module(module), "__cpu_features__", None)
        except ImportError:
            continue
        if isinstance(features, dict):
            return {str(k): bool(v) for k, v in features.items()}
    return None


def reconcile_with_cpuid(flags: frozenset[str], cpuid: dict[str, bool] | None) -> tuple[frozenset[str], str | None]:
    """x86 int8 flags that the CPU's own CPUID confirms. When cpuinfo claims a feature CPUID denies
    (AVX2, AVX-512F or AVX-512 VNNI), cpuinfo is describing another CPU: keep only what CPUID says
    (which cannot confirm AVX-VNNI, so that is dropped too), and say why."""
    if cpuid is None:
        return flags, None
    denied = sorted(flag for name, flag in _CPUID_NAMES.items() if flag in flags and not cpuid.get(name, True))
    if not denied:
        return flags, None
    confirmed = frozenset(flag for name, flag in _CPUID_NAMES.items() if cpuid.get(name))
    return confirmed, f"/proc/cpuinfo lists {', '.join(denied)} but CPUID denies it (emulated CPU?): using CPUID's view"

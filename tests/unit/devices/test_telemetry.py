"""devices.telemetry: tegrastats lines of each JetPack generation, sysfs fake roots, and the
sampler against a real (fake) ``tegrastats`` process."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devices.telemetry import Telemetry, TelemetrySampler, parse_tegrastats, read_sysfs
from edge_sdk.errors import DeviceError

from .conftest import X86_FILES, RootFactory

# JetPack 4 (L4T 32.x): no mW units, upper-case sensors, a fixed PMIC@ value.
NANO_JP4_IDLE = (
    "RAM 1923/3964MB (lfb 2x2MB) SWAP 191/1982MB (cached 6MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [5%@1224,4%@1224,3%@1224,6%@1224] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@37C CPU@40C "
    "PMIC@50C GPU@40C AO@45C thermal@40C POM_5V_IN 1750/1628 POM_5V_GPU 0/0 POM_5V_CPU 366/406"
)
NANO_JP4_BUSY = (
    "RAM 3012/3964MB (lfb 45x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [38%@1479,41%@1479,off,off] EMC_FREQ 24%@1600 GR3D_FREQ 99%@921 APE 25 PLL@44.5C CPU@47C "
    "PMIC@100C GPU@45.5C AO@52C thermal@46.25C POM_5V_IN 6120/5410 POM_5V_GPU 2816/2500 POM_5V_CPU 1203/1102"
)
AGX_XAVIER_JP4 = (
    "RAM 1776/15823MB (lfb 3045x4MB) SWAP 0/7911MB (cached 0MB) "
    "CPU [3%@1190,2%@1190,1%@1190,0%@1190,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@1377 APE 150 "
    "MTS fg 0% bg 0% AO@35C GPU@34.5C Tdiode@37.25C PMIC@100C AUX@34C CPU@35.5C thermal@34.9C Tboard@34C "
    "GPU 0/0 CPU 311/311 SOC 933/933 CV 0/0 VDDRQ 155/155 SYS5V 1048/1048"
)
# JetPack 5 (L4T 35.x): mW units, GR3D_FREQ with bracketed clocks, switched-off sensors at -256C.
XAVIER_NX_JP5 = (
    "07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) "
    "CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 GR3D_FREQ 12%@[114] "
    "VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C "
    "VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW"
)
ORIN_NANO_JP5 = (
    "RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1190,8%@1190,5%@1190,3%@1190,off,off] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] VIC_FREQ 729 APE 200 CV0@-256C CPU@43.531C Tboard@32C SOC2@40.406C "
    "Tdiode@34.5C SOC0@41.218C CV1@-256C GPU@-256C tj@43.531C SOC1@40.218C CV2@-256C "
    "VDD_IN 4316mW/4316mW VDD_CPU_GPU_CV 482mW/482mW VDD_SOC 1324mW/1324mW"
)
AGX_ORIN_JP5 = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C SOC2@40.093C "
    "Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C VDD_GPU_SOC 2340mW/2340mW "
    "VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
# JetPack 6 (L4T 36.x): lower-case sensors; GR3D_FREQ with or without clocks.
ORIN_NANO_JP6 = (
    "RAM 2448/7772MB (lfb 1x4MB) SWAP 0/3886MB CPU [12%@1190,8%@1190,4%@1190,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0% GR3D_FREQ 0% cpu@43.5C soc2@41.8C gpu@42.1C tj@43.6C "
    "VDD_IN 4316mW/4316mW VDD_CPU_GPU_CV 482mW/482mW VDD_SOC 1324mW/1324mW"
)
ORIN_NANO_JP6_BUSY = (
    "10-08-2026 04:35:02 RAM 6712/7620MB (lfb 12x4MB) SWAP 369/3810MB (cached 8MB) "
    "CPU [38%@1497,2%@729,1%@729,0%@729,1%@729,0%@729] EMC_FREQ 61%@2133 GR3D_FREQ 99%@[624] NVDEC off "
    "NVJPG off VIC off OFA off APE 200 cpu@55.062C soc2@52.5C soc0@53.937C gpu@57.25C tj@57.25C soc1@53.406C "
    "VDD_IN 9871mW/8535mW VDD_CPU_GPU_CV 3902mW/1944mW VDD_SOC 2904mW/3659mW"
)
AGX_ORIN_JP6 = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
    "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,6%@1036,"
    "10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 47%@[1300,1300] NVENC 79%@166 NVDEC off NVJPG off NVJPG1 off "
    "VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.562C soc2@48.437C soc0@49.093C "
    "tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW"
)
# L4T 38 (Thor): GR3D_FREQ without a percentage.
THOR_L4T38 = (
    "05-17-2026 10:00:32 RAM 4208/125773MB (lfb 31x4MB) SWAP 0/2048MB (cached 0MB) "
    "CPU [1%@972,0%@972,0%@972,0%@972,1%@972,0%@972,1%@972,1%@972,0%@972,0%@972,3%@972,0%@972,0%@972,1%@972] "
    "EMC_FREQ 0%@665 GR3D_FREQ @[0,0,0] NVENC0_FREQ @0 NVENC1_FREQ @0 VIC off OFA_FREQ @0 PVA0_FREQ off "
    "APE 300 cpu@34.468C tj@34.5C soc012@33.781C soc345@34.5C VDD_GPU 0mW/0mW VDD_CPU_SOC_MSS 4165mW/4165mW "
    "VIN_SYS_5V0 4126mW/4126mW"
)


@pytest.mark.parametrize(
    ("line", "ram", "cores", "gpu", "temperatures", "power"),
    [
        (NANO_JP4_IDLE, (1923, 3964), (5, 4, 3, 6), 0,
         {"pll": 37, "cpu": 40, "gpu": 40, "ao": 45, "thermal": 40},
         {"POM_5V_IN": 1750, "POM_5V_GPU": 0, "POM_5V_CPU": 366}),
        (NANO_JP4_BUSY, (3012, 3964), (38, 41, None, None), 99,
         {"pll": 44.5, "cpu": 47, "gpu": 45.5, "ao": 52, "thermal": 46.25},
         {"POM_5V_IN": 6120, "POM_5V_GPU": 2816, "POM_5V_CPU": 1203}),
        (AGX_XAVIER_JP4, (1776, 15823), (3, 2, 1, 0, None, None, None, None), 0,
         {"ao": 35, "gpu": 34.5, "tdiode": 37.25, "aux": 34, "cpu": 35.5, "thermal": 34.9, "tboard": 34},
         {"GPU": 0, "CPU": 311, "SOC": 933, "CV": 0, "VDDRQ": 155, "SYS5V": 1048}),
        (XAVIER_NX_JP5, (3168, 6851), (23, 17, 16, 13, 23, 10), 12,
         {"aux": 45, "cpu": 46.5, "thermal": 45.6, "ao": 45, "gpu": 45.5},
         {"VDD_IN": 2763, "VDD_CPU_GPU_CV": 650, "VDD_SOC": 650}),
        (ORIN_NANO_JP5, (2448, 7620), (12, 8, 5, 3, None, None), 0,
         {"cpu": 43.531, "tboard": 32, "soc2": 40.406, "tdiode": 34.5, "soc0": 41.218, "tj": 43.531, "soc1": 40.218},
         {"VDD_IN": 4316, "VDD_CPU_GPU_CV": 482, "VDD_SOC": 1324}),
        (AGX_ORIN_JP5, (4321, 62801), (0,) * 12, 0,
         {"cpu": 44.562, "tboard": 32, "soc2": 40.093, "tdiode": 33, "soc0": 41.093, "tj": 44.343, "soc1": 41.25},
         {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "VDDQ_VDD2_1V8AO": 301}),
        (ORIN_NANO_JP6, (2448, 7772), (12, 8, 4, 0, 0, 0), 0,
         {"cpu": 43.5, "soc2": 41.8, "gpu": 42.1, "tj": 43.6},
         {"VDD_IN": 4316, "VDD_CPU_GPU_CV": 482, "VDD_SOC": 1324}),
        (ORIN_NANO_JP6_BUSY, (6712, 7620), (38, 2, 1, 0, 1, 0), 99,
         {"cpu": 55.062, "soc2": 52.5, "soc0": 53.937, "gpu": 57.25, "tj": 57.25, "soc1": 53.406},
         {"VDD_IN": 9871, "VDD_CPU_GPU_CV": 3902, "VDD_SOC": 2904}),
        (AGX_ORIN_JP6, (18207, 62841), (14, 5, 8, 14, 46, 47, 2, 10, 4, 5, 6, 10), 47,
         {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093, "tj": 52.562, "soc1": 49.656},
         {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707}),
        (THOR_L4T38, (4208, 125773), (1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 3, 0, 0, 1), None,
         {"cpu": 34.468, "tj": 34.5, "soc012": 33.781, "soc345": 34.5},
         {"VDD_GPU": 0, "VDD_CPU_SOC_MSS": 4165, "VIN_SYS_5V0": 4126}),
    ],
    ids=["nano-jp4-idle", "nano-jp4-busy", "agx-xavier-jp4", "xavier-nx-jp5", "orin-nano-jp5", "agx-orin-jp5",
         "orin-nano-jp6", "orin-nano-jp6-busy", "agx-orin-jp6", "thor-l4t38"],
)
def test_parse_tegrastats_generations(
    line: str, ram: tuple[int, int], cores: tuple[float | None, ...], gpu: float | None,
    temperatures: dict[str, float], power: dict[str, int],
) -> None:
    t = parse_tegrastats(line, timestamp=1234.5)
    assert (t.ram_used_mb, t.ram_total_mb) == ram
    assert t.cpu_percent == cores
    assert t.gpu_percent == gpu
    assert dict(t.temperatures) == pytest.approx(temperatures)
    assert dict(t.power_mw) == power
    assert t.timestamp == 1234.5 and t.source == "tegrastats"


def test_cpu_mean_counts_online_cores_only() -> None:
    assert parse_tegrastats(NANO_JP4_BUSY).cpu_mean_percent == pytest.approx(39.5)
    assert Telemetry(timestamp=0.0, source="sysfs").cpu_mean_percent is None


def test_telemetry_is_immutable_and_serialisable() -> None:
    t = parse_tegrastats(ORIN_NANO_JP6, timestamp=10.0)
    with pytest.raises(TypeError):
        t.temperatures["cpu"] = 99.0  # type: ignore[index]
    data = t.to_dict()
    assert data["temperatures"]["tj"] == 43.6 and data["power_mw"]["VDD_IN"] == 4316
    assert data["cpu_percent"] == [12.0, 8.0, 4.0, 0.0, 0.0, 0.0] and data["cpu_mean_percent"] == 4.0


@pytest.mark.parametrize("line", ["", "tegrastats: command not found", "RAM 2448/77", "SWAP 0/3886MB CPU [1%@729]"])
def test_parse_rejects_lines_without_ram(line: str) -> None:
    with pytest.raises(DeviceError, match="no 'RAM used/totalMB' field") as caught:
        parse_tegrastats(line)
    assert caught.value.hint and "tegrastats --interval" in caught.value.hint


def _thermal(zones: dict[int, tuple[str, str]]) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {}
    for number, (kind, temp) in zones.items():
        files[f"sys/class/thermal/thermal_zone{number}/type"] = kind + "\n"
        files[f"sys/class/thermal/thermal_zone{number}/temp"] = temp + "\n"
    return files


def test_sysfs_on_x86_reports_memory_and_numbered_duplicate_zones(make_root: RootFactory) -> None:
    root = make_root({**X86_FILES, **_thermal({
        0: ("acpitz", "27800"), 1: ("acpitz", "29800"), 2: ("x86_pkg_temp", "45000"), 10: ("iwlwifi_1", "38000"),
    })})
    t = read_sysfs(root, timestamp=5.0)
    assert t.source == "sysfs" and t.timestamp == 5.0
    assert (t.ram_used_mb, t.ram_total_mb) == ((32780228 - 30112004) // 1024, 32780228 // 1024)
    assert dict(t.temperatures) == {"acpitz": 27.8, "acpitz_1": 29.8, "x86_pkg_temp": 45.0, "iwlwifi_1": 38.0}
    assert t.cpu_percent == () and t.gpu_percent is None and dict(t.power_mw) == {}


def test_sysfs_on_jetson_matches_tegrastats_names_and_skips_bad_zones(make_root: RootFactory) -> None:
    files = {
        "proc/meminfo": "MemTotal:        7773224 kB\nMemFree:  1000000 kB\nBuffers: 10240 kB\nCached: 2048000 kB\n",
        **_thermal({
            0: ("CPU-therm", "41500"), 1: ("GPU-therm", "39500"), 2: ("PMIC-Die", "100000"),
            3: ("Tboard_tegra", "32000"), 4: ("cv0-thermal", "-256000"), 5: ("tj-thermal", "42125"),
            6: ("AO-therm", "not a number"),
        }),
        "sys/class/thermal/thermal_zone7/type": "soc0-thermal\n",  # no temp file at all
        "sys/class/thermal/cooling_device0/type": "pwm-fan\n",
    }
    root = make_root(files)
    (root / "sys/class/thermal/thermal_zone8/temp").mkdir(parents=True)  # reading it fails (EISDIR)
    (root / "sys/class/thermal/thermal_zone8/type").write_text("gpu-thermal\n")
    t = read_sysfs(root)
    assert dict(t.temperatures) == {"cpu": 41.5, "gpu": 39.5, "tboard": 32.0, "tj": 42.125}
    # No MemAvailable (old kernels): free + buffers + cached count as available.
    assert t.ram_total_mb == 7773224 // 1024
    assert t.ram_used_mb == (7773224 - 1000000 - 10240 - 2048000) // 1024


def test_sysfs_on_an_empty_root_reports_nothing(tmp_path: Path) -> None:
    t = read_sysfs(tmp_path)
    assert (t.ram_used_mb, t.ram_total_mb, dict(t.temperatures)) == (None, None, {})


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _fake_tegrastats(bin_dir: Path, body: str) -> str:
    """An executable 'tegrastats' shell script in bin_dir; returns a PATH that finds it first."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "tegrastats"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"


def test_sampler_reads_a_real_tegrastats_process_and_skips_bad_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    bin_dir = tmp_path / "bin"
    path = _fake_tegrastats(bin_dir, (
        f'echo "$$" > "{bin_dir}/pid"\n'
        f'echo "$@" > "{bin_dir}/args"\n'
        "while true; do\n"
        "  echo 'garbage from a broken driver'\n"
        f"  echo '{ORIN_NANO_JP6_BUSY}'\n"
        "  sleep 0.02\n"
        "done\n"
    ))
    caplog.set_level(logging.DEBUG, logger="devices.telemetry")
    sampler = TelemetrySampler(root=tmp_path, interval_s=0.05, path=path)
    with sampler:
        assert sampler.mode == "tegrastats"
        _wait_for(lambda: sampler.latest() is not None)
        _wait_for(lambda: caplog.text.count("skipping a tegrastats line") >= 2)
        latest = sampler.latest()
        assert latest is not None and latest.source == "tegrastats"
        assert latest.ram_used_mb == 6712 and latest.gpu_percent == 99 and latest.temperatures["gpu"] == 57.25
        assert latest.power_mw["VDD_IN"] == 9871
        assert (bin_dir / "args").read_text().split() == ["--interval", "50"]
        pid = int((bin_dir / "pid").read_text())
    assert sampler.mode == "stopped"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert len(warnings) == 1 and "garbage from a broken driver" in warnings[0].getMessage()
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)


def test_sampler_falls_back_to_sysfs_when_tegrastats_exits(
    tmp_path: Path, make_root: RootFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    root = make_root({**X86_FILES, **_thermal({0: ("x86_pkg_temp", "51000")})})
    path = _fake_tegrastats(tmp_path / "bin", f"echo '{NANO_JP4_IDLE}'\nexit 3\n")
    with TelemetrySampler(root=root, interval_s=0.02, path=path) as sampler:
        _wait_for(lambda: sampler.mode == "sysfs")
        _wait_for(lambda: (t := sampler.latest()) is not None and t.source == "sysfs")
        latest = sampler.latest()
        assert latest is not None and latest.temperatures == {"x86_pkg_temp": 51.0}
    assert "tegrastats exited with code 3; reading sysfs instead" in caplog.text


def test_sampler_polls_sysfs_without_tegrastats(tmp_path: Path, make_root: RootFactory) -> None:
    root = make_root({**X86_FILES, **_thermal({0: ("x86_pkg_temp", "45000")})})
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with TelemetrySampler(root=root, interval_s=0.02, path=str(empty)) as sampler:
        assert sampler.mode == "sysfs"
        _wait_for(lambda: sampler.latest() is not None)
        (root / "sys/class/thermal/thermal_zone0/temp").write_text("61500\n")
        _wait_for(lambda: (t := sampler.latest()) is not None and t.temperatures.get("x86_pkg_temp") == 61.5)
    assert sampler.mode == "stopped"


def test_sampler_before_start_has_no_reading(tmp_path: Path) -> None:
    sampler = TelemetrySampler(root=tmp_path, path=str(tmp_path))
    assert sampler.latest() is None and sampler.mode == "stopped"
    sampler.stop()  # stopping a sampler that never started is harmless


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_sampler_rejects_a_bad_interval(interval: float) -> None:
    with pytest.raises(DeviceError, match=r"interval_s=.* is not a positive number"):
        TelemetrySampler(interval_s=interval)


def test_sysfs_cpu_load_comes_from_two_proc_stat_readings(make_root: RootFactory) -> None:
    from devices.telemetry import cpu_percent, read_cpu_times

    counters = ("cpu  300 0 100 600 0 0 0 0 0 0\n"
            "cpu0 100 0 50 300 0 0 0 0 0 0\n"
            "cpu1 200 0 50 300 0 0 0 0 0 0\n"
            "intr 12345\nctxt 999\n")
    root = make_root({**X86_FILES, "proc/stat": counters})
    before = read_cpu_times(root)
    assert before == {0: (150, 450), 1: (250, 550)}
    # cpu0 busy 50 of 100 jiffies since, cpu1 idle all 100 (iowait counts as idle), cpu2 came online
    (root / "proc/stat").write_text("cpu0 150 0 50 350 0 0 0 0\ncpu1 200 0 50 380 20 0 0 0\ncpu2 5 0 0 5 0 0 0 0\n"
                                    "cpu3 garbage\n")
    t = read_sysfs(root, cpu_before=before)
    assert t.cpu_percent == (50.0, 0.0, None) and t.cpu_mean_percent == 25.0
    assert read_sysfs(root).cpu_percent == ()  # one reading alone gives no load
    assert cpu_percent(before, {}) == () and cpu_percent({0: (10, 100)}, {0: (10, 100)}) == (None,)


def test_the_sampler_reports_this_machines_cpu_load_without_tegrastats(tmp_path: Path) -> None:
    with TelemetrySampler("/", interval_s=0.05, tegrastats=str(tmp_path / "no-tegrastats")) as sampler:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (sampler.latest() and sampler.latest().cpu_percent):  # type: ignore[union-attr]
            time.sleep(0.02)
        reading = sampler.latest()
    assert sampler.mode == "stopped" and reading is not None and reading.source == "sysfs"
    assert reading.cpu_percent and all(v is None or 0.0 <= v <= 100.0 for v in reading.cpu_percent)

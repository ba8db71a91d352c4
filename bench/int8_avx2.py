"""What an x86 CPU without VNNI computes: the demo image model's u8s8 and u8s7 graphs under qemu.

    python -m bench.int8_avx2 [--samples 24] [--out build/bench/int8_avx2.json]

onnxruntime picks its int8 kernels from the CPU it runs on. ``qemu-x86_64-static -cpu max`` (user
mode) emulates an x86-64 with AVX2 but without AVX-512 and VNNI, so onnxruntime runs there the
kernels of such a CPU: uint8 x int8 pairs summed in saturating int16 (VPMADDUBSW). This script
runs the demo surface-defects model's u8s8 and u8s7 graphs (the ones ``python -m bench.int8``
saved under ``build/bench/graphs/``, else calibrated here the same way) with onnxruntime's fused
kernels, natively and under qemu, on ``--samples`` held-out test images (saved to a ``.npz``), and
compares each run with the graph's exact result (``converters.reference.run_reference``) and with
fp32. A one-layer probe (``bench.int8_kernels``, 1x1 convolution) run in the same emulated process
shows which kernels it got. Emulation is slow (50-100x): keep the sample count small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

QEMU = "qemu-x86_64-static"
GRAPHS = ("u8s8", "u8s7")


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_fused(paths: dict[str, Path], x: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, path in paths.items():
        s = _session(path.read_bytes())
        out[name] = np.concatenate([s.run(None, {"image": x[i:i + 8]})[0] for i in range(0, len(x), 8)])
    return out


def child(inputs: Path, output: Path, graphs: list[str]) -> None:
    """Run inside the emulated process: fused outputs of each graph, and the kernel probe."""
    from bench.int8_kernels import fused_error, probe_model

    x = np.load(inputs)["image"]
    paths = {Path(g).name.split(".")[1]: Path(g) for g in graphs}
    start = time.perf_counter()
    out = run_fused(paths, x)
    seconds = time.perf_counter() - start
    probe = {form: fused_error(*probe_model("conv1x1", form)) for form in GRAPHS}
    arrays: dict[str, Any] = {**out, "probe": np.array([probe[f] for f in GRAPHS]), "seconds": np.array(seconds)}
    np.savez(output, **arrays)


def graphs_for(cache: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The demo image model's saved edge-sdk graphs (and their weight roundings), calibrated here
    (as ``bench.int8`` does, rounding chosen on the test set's exact accuracy) when it left none."""
    keep = cache / "graphs"
    paths = {g: keep / f"demo_image.{g}.onnx" for g in GRAPHS}
    meta = keep / "demo_image.json"
    if all(p.exists() for p in paths.values()) and meta.exists():
        return paths, json.loads(meta.read_text())["rounding"]
    from bench.int8 import DEMO_CAL, choose_rounding, edge_int8, fidelity, load_bench, run_exact, save_chosen

    print("no saved graphs from bench.int8: calibrating the demo image model (a few minutes)", flush=True)
    b = load_bench("demo-image", cache, DEMO_CAL, 10**6)
    rows, _ = edge_int8(b.path, b.cal, "u8s8")
    reference = np.concatenate([_session(b.path.read_bytes()).run(None, h)[0] for h in b.held]).astype(np.float64)
    for r in rows:
        if r.model is not None:
            r.exact = fidelity(b.task, reference, run_exact(r.model, b.held), b.labels)
    choose_rounding(b.task, rows)
    save_chosen(rows, keep, "demo_image")
    return paths, json.loads(meta.read_text())["rounding"]


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-30)
    return {"agreement": float(100 * np.mean(ref.argmax(1) == got.argmax(1))), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ref - got).max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="held-out test images (emulation is slow)")
    parser.add_argument("--cache", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=Path("build/bench/int8_avx2.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # INPUTS OUTPUT GRAPH...
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2:])
        return
    qemu = shutil.which(QEMU)
    if qemu is None:
        print(f"SKIPPED: {QEMU} is not installed (apt-get install qemu-user-static)")
        return
    import onnx

    import devices
    from bench import _models
    from converters.reference import run_reference
    from runtime.backends import cpu_int8_graph

    started = time.monotonic()
    try:
        model, _, test_x, test_y, labels = _models.demo_image(Path("build/demo/image"))
    except _models.ModelUnavailable as exc:
        print(f"SKIPPED: {exc}")
        return
    paths, rounding = graphs_for(args.cache)
    x, y = test_x[:args.samples], test_y[:args.samples]
    work = args.cache / "avx2"
    work.mkdir(parents=True, exist_ok=True)
    inputs, outputs = work / "inputs.npz", work / "outputs.npz"
    np.savez(inputs, image=x)
    fp32 = _session(model.read_bytes()).run(None, {"image": x})[0]
    exact = {g: run_reference(onnx.load(str(p)), [{"image": x}]) for g, p in paths.items()}
    native = run_fused(paths, x)
    from bench.int8_kernels import fused_error, probe_model

    native_probe = {f: fused_error(*probe_model("conv1x1", f)) for f in GRAPHS}
    command = [qemu, "-cpu", "max", sys.executable, "-m", "bench.int8_avx2", "--child", str(inputs), str(outputs),
               *(str(paths[g]) for g in GRAPHS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    qemu_s = time.perf_counter() - t
    emulated = np.load(outputs)

    info = devices.detect()
    host = f"{info.arch} " + ("with VNNI" if {"avx512_vnni", "avx_vnni", "amx_int8"} & info.cpu_flags else "without VNNI")
    avx2_graph, avx2_reason = cpu_int8_graph("x86_64", frozenset({"avx2"}))
    print(f"\n== demo surface-defects: int8 graphs on x86-64 AVX2 without VNNI (qemu-x86_64-static -cpu max) vs "
          f"natively ({host}) ==")
    print("(graphs as bench.int8 chose them: " + ", ".join(f"{g} {rounding.get(g, '?')} rounding" for g in GRAPHS)
          + ")")
    print(f"({len(x)} held-out test images; qemu run {qemu_s:.0f} s including start-up; an AVX2 x86 without VNNI "
          f"is served {avx2_graph}: {avx2_reason})")
    print("1x1-conv kernel probe (largest |fused - exact| / largest output; exact below 1e-2): "
          + ", ".join(f"{f} native {native_probe[f]:.1e} / qemu {emulated['probe'][i]:.1e}"
                      for i, f in enumerate(GRAPHS)))
    header = (f"{'graph':<6} {'run':<22} {'vs exact: agree':>15} {'cos':>7} {'min cos':>8} {'max |diff|':>10}   "
              f"{'vs fp32: agree':>14} {'cos':>7}  {'accuracy':>8}")
    print(header)
    print("-" * len(header))
    results: dict[str, Any] = {"samples": len(x), "rounding": rounding, "qemu_seconds": round(qemu_s, 1), "host": host,
                               "probe_conv1x1": {"native": native_probe,
                                                 "qemu": {f: float(emulated["probe"][i]) for i, f in enumerate(GRAPHS)}},
                               "graphs": {}}
    acc_fp32 = 100 * float(np.mean(fp32.argmax(1) == y))
    print(f"{'fp32':<6} {'native':<22} {'-':>15} {'-':>7} {'-':>8} {'-':>10}   {'100.0%':>14} {'1.0000':>7}  "
          f"{acc_fp32:7.1f}%")
    for g in GRAPHS:
        runs = {"exact reference": exact[g], "fused native": native[g], "fused qemu AVX2": emulated[g]}
        results["graphs"][g] = {}
        for run, got in runs.items():
            vs_exact, vs_fp32 = _compare(exact[g], got), _compare(fp32, got)
            acc = 100 * float(np.mean(got.argmax(1) == y))
            results["graphs"][g][run] = {"vs_exact": vs_exact, "vs_fp32": vs_fp32, "accuracy": acc}
            print(f"{g:<6} {run:<22} {vs_exact['agreement']:14.1f}% {vs_exact['mean_cosine']:7.4f} "
                  f"{vs_exact['min_cosine']:8.4f} {vs_exact['max_abs_diff']:10.3g}   {vs_fp32['agreement']:13.1f}% "
                  f"{vs_fp32['mean_cosine']:7.4f}  {acc:7.1f}%")
    wall = time.monotonic() - started
    results["wall_s"] = round(wall, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"total wall time {wall:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

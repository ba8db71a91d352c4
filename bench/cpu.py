"""Benchmark: the CPU backends on the package's own graphs, per ISA, end to end and from a cold start.

    python -m bench.cpu [--out build/bench/cpu.json] [--models demo-image demo-text minilm lite0] [--quick]

What runs where a device has no GPU: onnxruntime's CPU provider (``onnxruntime-cpu``) or OpenVINO's
CPU plugin (``openvino-cpu``, the ``[openvino]`` extra) reading the same files. Per model, on this
machine's ISA (named in every table), 2 threads each:

1. **Model alone** (rows, one round-robin so load from other processes hits every row alike):
   ORT fp32 (the baseline of every ratio and fidelity figure), ORT int8 (the int8 graph
   ``runtime.backends.this_cpu_int8_graph`` picks for this CPU), OpenVINO fp32 and OpenVINO int8
   on the same two files, OpenVINO bf16 on the fp32 file where the CPU has bf16 arithmetic
   (AVX-512 BF16 or AMX), and NNCF int8 (``nncf.quantize`` of the fp32 graph on the same
   calibration data, ``ModelType.TRANSFORMER`` for the text models) as the peer. b1 latency
   (median of single-sample runs), b8 throughput (8 / median batch-of-8 time), fidelity on the
   held-out inputs against ORT fp32 (mean and min cosine; top-1 agreement and accuracy where it
   applies) and, for the int8 file, how far each runtime's integer kernels are from the file's exact
   meaning (``converters.reference``: the Q/DQ graph as the spec defines it, the same on every CPU).
   The demo models' int8 graph is the one in ``build/demo/packages/<name>.int8.edgepkg`` (``make
   demo``); MiniLM-L6 (sequence 128) and EfficientNet-Lite0 (ImageNet head, 224) get theirs from
   ``converters.quantize`` with the SDK's default method and the weight rounding ``convert`` would keep
   (nearest or reconstructed, whichever is more faithful on the held-out inputs; no mixed precision:
   ``bench.int8`` has the rest of the int8 story). OpenVINO compiles every model (NNCF's too) with the
   batch axis bounded, as the ``openvino-cpu`` backend does.
2. **End to end vs model alone** (demo packages, each CPU backend, ``edge_sdk.load``): throughput of
   ``model.predict_batch`` on the encoded test files (PNG / text lines; decode, preprocessing or
   tokenization, inference, postprocessing) against ``model.pipeline.infer`` on the feeds
   ``model.pipeline.encode_batches`` gives (the very batches ``predict_batch`` runs: for text, each
   length bucket's windows), batch 8 both.
3. **Cold start** (demo packages, each CPU backend, a fresh Python process per run): package
   open -> first prediction, after the imports (reported apart). OpenVINO runs twice, with an
   empty and then a filled compiled-model cache.

Targets (the CPU-path issue): with VNNI, MiniLM int8 >= 3.4x ORT fp32 at cosine >= 0.997 and
EfficientNet-Lite0 >= 2.8x at >= 99% top-1 agreement; without VNNI >= 1.7x at the same fidelity;
end to end >= 90% of model alone; cold start <= 1 s. Nothing is asserted: the last lines say which
are met on this ISA. The machine may be shared: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench import _models
from bench._log import Log
from bench.int8 import DEMO_ROOT, Bench, choose_rounding, edge_int8, fidelity, isa_info, load_bench, run_exact

Feeds = dict[str, np.ndarray]
Run = Callable[[Feeds], np.ndarray]
BATCH = 8
THREADS = 2
MODELS = ("demo-image", "demo-text", "minilm", "lite0")
PACKAGES = {"demo-image": "surface-defects", "demo-text": "fault-reports"}
TARGET_SPEEDUP = {("minilm", True): 3.4, ("lite0", True): 2.8, ("minilm", False): 1.7, ("lite0", False): 1.7}
TARGET_FIDELITY = {"minilm": ("mean_cosine", 0.997), "lite0": ("top1_agreement", 99.0)}
TARGET_END_TO_END = 0.90
TARGET_COLD_S = 1.0

log = Log("cpu")


@dataclass
class Row:
    name: str
    runtime: str  # "onnxruntime", "openvino", "nncf"
    graph: str  # "fp32", the int8 graph ("u8s8", "u8s7"), or "nncf"
    run: Run | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    to_exact: dict[str, Any] = field(default_factory=dict)
    b1_ms: float | None = None
    b8_sps: float | None = None
    b1_ratio: float | None = None
    b8_ratio: float | None = None
    error: str | None = None

    def out(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "run"}


# --- the runtimes, same files, same threads -------------------------------------------------------


def ort_run(model: bytes) -> Run:
    from runtime.runners.onnxrt import DISABLED_OPTIMIZERS

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
    name = sess.get_outputs()[0].name
    return lambda feeds: sess.run([name], feeds)[0]


def ov_compiled(model: Any, precision: str = "f32") -> Run:
    """An OpenVINO model (or ONNX bytes) compiled as the openvino-cpu backend compiles it (``precision``
    "bf16": the float parts in bfloat16, which the backend never does by itself)."""
    import openvino as ov

    from runtime.runners.openvino import bound_batch, compile_config

    core = ov.Core()
    config = {**compile_config(THREADS), "INFERENCE_PRECISION_HINT": precision}
    model = core.read_model(model) if isinstance(model, bytes) else model
    bound_batch(model)  # the batch axis bounded, as the backend compiles it (NNCF's model too)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    out = compiled.outputs[0]

    def run(feeds: Feeds) -> np.ndarray:
        return np.array(request.infer(feeds)[out], copy=True)

    return run


def nncf_run(fp32: bytes, calibration: Sequence[Feeds], text: bool) -> Run:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(fp32)
    kwargs: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER} if text else {}
    quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=sum(_n(b) for b in calibration),
                              **kwargs)
    return ov_compiled(quantized)


def _cpuinfo_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists (``devices`` keeps only the int8 ones)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def _n(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def outputs(run: Run, batches: Sequence[Feeds]) -> np.ndarray:
    return np.concatenate([run(b) for b in batches]).astype(np.float64)


def exactness(got: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    """How far a runtime's int8 kernels are from the file's exact meaning: worst difference relative
    to the largest exact output (parity's measure), mean cosine, top-1 agreement."""
    from bench.int8 import cosines

    rel = float(np.abs(got - exact).max() / max(1.0, float(np.abs(exact).max())))
    out = {"max_rel_diff": rel, "mean_cosine": float(cosines(exact, got).mean())}
    if exact.ndim == 2 and exact.shape[1] > 1 and exact.shape[1] != 384:
        out["top1_agreement"] = float(100.0 * np.mean(exact.argmax(1) == got.argmax(1)))
    return out


def _block(run: Callable[[], object], times: list[float], repeats: int) -> None:
    time.sleep(0.02)
    run()
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)


def time_rows(rows: list[Row], b1: Feeds, b8: Feeds, rounds: int) -> None:
    """b1 / b8 medians over ``rounds`` round-robin visits of every row, ratios to the first row."""
    timed = [r for r in rows if r.run is not None]
    t1: dict[str, list[float]] = {r.name: [] for r in timed}
    t8: dict[str, list[float]] = {r.name: [] for r in timed}
    for r in timed:
        for feeds in (b1, b1, b8, b8):
            r.run(feeds)  # type: ignore[misc]
    for _ in range(rounds):
        for r in timed:
            run = r.run
            _block(lambda: run(b8), t8[r.name], 2)  # type: ignore[misc]
            _block(lambda: run(b1), t1[r.name], 4)  # type: ignore[misc]
    for r in timed:
        r.b1_ms = 1e3 * statistics.median(t1[r.name])
        r.b8_sps = BATCH / statistics.median(t8[r.name])
    base = timed[0]
    for r in timed:
        r.b1_ratio = base.b1_ms / r.b1_ms  # type: ignore[operator]
        r.b8_ratio = r.b8_sps / base.b8_sps  # type: ignore[operator]


# --- per model ------------------------------------------------------------------------------------


def model_files(key: str, b: Bench, served: str, reference: np.ndarray) -> tuple[bytes, bytes, str]:
    """(fp32 graph, int8 graph this CPU serves, where they come from)."""
    if key in PACKAGES:
        from runtime.backends import cpu_graph
        from runtime.package import Package

        path = DEMO_ROOT / "packages" / f"{PACKAGES[key]}.int8.edgepkg"
        if not path.exists():
            raise _models.ModelUnavailable(f"missing {path} (run `make demo`)")
        package = Package.open(path)
        graph = cpu_graph(package, "int8")
        m = package.manifest
        return package.read_bytes(m.model), package.read_bytes(m.graphs[graph]), f"{path.name}, graph {graph}"
    rows, _ = edge_int8(b.path, b.cal, served)
    for r in rows:  # the weight rounding convert would keep, by the exact fidelity on the held-out data
        if r.graph == served and r.model is not None:
            r.exact = fidelity(b.task, reference, run_exact(r.model, b.held), b.labels)
    choose_rounding(b.task, rows)
    chosen = next(r for r in rows if r.graph == served and r.chosen)
    return b.path.read_bytes(), chosen.model, f"converters.quantize ({served}, {chosen.rounding} rounding)"  # type: ignore[return-value]


def bench_model(key: str, args: argparse.Namespace, isa: dict[str, Any]) -> dict[str, Any]:
    cal_n, held_n = (32, 32) if args.quick else (128, 160)
    b = load_bench(key, Path("build/bench"), cal_n, held_n)
    served = isa["served_graph"]
    fp32, int8, source = model_files(key, b, served, outputs(ort_run(b.path.read_bytes()), b.held))
    log(f"{b.title}: int8 graph from {source}; {sum(map(_n, b.held))} held-out inputs")
    rows = [Row("ORT fp32", "onnxruntime", "fp32", ort_run(fp32)),
            Row(f"ORT int8 {served}", "onnxruntime", served, ort_run(int8)),
            Row("OpenVINO fp32", "openvino", "fp32", ov_compiled(fp32)),
            Row(f"OpenVINO int8 {served}", "openvino", served, ov_compiled(int8))]
    if {"avx512_bf16", "amx_bf16"} & _cpuinfo_flags():  # bf16 arithmetic in hardware
        rows.append(Row("OpenVINO bf16 (fp32 graph)", "openvino", "bf16", ov_compiled(fp32, "bf16")))
    t = time.perf_counter()
    try:
        rows.append(Row("NNCF int8 (OpenVINO)", "nncf", "nncf", nncf_run(fp32, b.cal, b.kind == "text")))
        log(f"NNCF quantized in {time.perf_counter() - t:.1f} s")
    except Exception as exc:  # noqa: BLE001 - the peer is optional: a missing nncf is a row with its reason
        rows.append(Row("NNCF int8 (OpenVINO)", "nncf", "nncf", error=f"{type(exc).__name__}: {exc}"[:300]))
    reference = outputs(rows[0].run, b.held)  # type: ignore[arg-type]
    exact = run_exact(int8, b.held)
    for r in rows:
        if r.run is None:
            continue
        got = outputs(r.run, b.held)
        r.fidelity = fidelity(b.task, reference, got, b.labels)
        if r.graph == served:
            r.to_exact = exactness(got, exact)
    log("fidelity measured; timing")
    b1 = {k: v[:1] for k, v in b.held[0].items()}
    time_rows(rows, b1, b.held[0], rounds=args.rounds)
    return {"title": b.title, "task": b.task, "int8_source": source, "rows": [r.out() for r in rows],
            "exact_fidelity": fidelity(b.task, reference, exact, b.labels)}


# --- end to end, cold start -----------------------------------------------------------------------


def end_to_end(key: str, backend: str, rounds: int, threads: int = THREADS) -> dict[str, Any]:
    """predict_batch on the encoded test files vs the model alone on their feeds, batch 8, same model
    (with ``threads`` below the cores, images decode on the idle ones while the model runs)."""
    import edge_sdk

    path = DEMO_ROOT / "packages" / f"{PACKAGES[key]}.int8.edgepkg"
    if key == "demo-image":
        items: list[Any] = sorted(str(p) for p in (DEMO_ROOT / "image" / "data" / "test").rglob("*.png"))[:64]
    else:
        _, _, texts, _, _, _ = _models.demo_text(DEMO_ROOT / "text")
        items = texts[:64]
    with edge_sdk.load(path, backend=backend, threads=threads) as model:
        feeds = model.pipeline.encode_batches(items, max_batch=BATCH)  # exactly what predict_batch runs
        alone, whole = [], []
        model.predict_batch(items[:BATCH], max_batch=BATCH)
        for _ in range(rounds):
            t = time.perf_counter()
            for f in feeds:
                model.pipeline.infer(f)
            alone.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.predict_batch(items, max_batch=BATCH)
            whole.append(time.perf_counter() - t)
        served = model.info["precision_served"]
        workers = model.pipeline.decode_workers()
    a, w = statistics.median(alone), statistics.median(whole)
    return {"backend": backend, "served": served, "threads": threads, "decode_workers": workers,
            "items": len(items), "model_alone_ips": len(items) / a,
            "end_to_end_ips": len(items) / w, "ratio": a / w}


_COLD = """
import json, sys, time
t0 = time.perf_counter()
import edge_sdk
t1 = time.perf_counter()
model = edge_sdk.load(sys.argv[1], backend=sys.argv[2])
t2 = time.perf_counter()
model.predict(sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "served": model.info["precision_served"]}))
"""


def cold_start(key: str, backend: str, cache: Path) -> dict[str, Any]:
    path = DEMO_ROOT / "packages" / f"{PACKAGES[key]}.int8.edgepkg"
    if key == "demo-image":
        sample = str(next((DEMO_ROOT / "image" / "data" / "test").rglob("*.png")))
    else:
        sample = _models.demo_text(DEMO_ROOT / "text")[2][0]
    env = {**os.environ, "EDGE_SDK_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", _COLD, str(path), backend, sample], env=env, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["open_to_first_s"] = result["load_s"] + result["first_s"]
    return result


# --- report ---------------------------------------------------------------------------------------


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_report(results: dict[str, Any], isa: dict[str, Any]) -> None:
    print(f"\n# CPU backends on {isa['label']} (int8 graph {isa['served_graph']}), {THREADS} threads, batch 8\n")
    for key, res in results["models"].items():
        if "error" in res:
            print(f"## {key}: skipped ({res['error']})\n")
            continue
        print(f"## {res['title']} (int8: {res['int8_source']})")
        print("| row | b1 ms | b1 x | b8 items/s | b8 x | cosine (min) | top-1 agr. | acc. | int8 kernels vs exact |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            fid, ex = r["fidelity"], r["to_exact"]
            exact = (f"rel. diff {ex['max_rel_diff']:.3g}, cos {ex['mean_cosine']:.4f}"
                     + (f", agr. {ex['top1_agreement']:.1f}%" if "top1_agreement" in ex else "")) if ex else ""
            if r["error"]:
                print(f"| {r['name']} | failed: {r['error']} |||||||")
                continue
            cos = f"{fid['mean_cosine']:.4f} ({fid['min_cosine']:.4f})"
            print(f"| {r['name']} | {_f(r['b1_ms'], '.2f')} | {_f(r['b1_ratio'], '.2f')} | {_f(r['b8_sps'], '.1f')} | "
                  f"{_f(r['b8_ratio'], '.2f')} | {cos} | {_f(fid.get('top1_agreement'), '.1f')} | "
                  f"{_f(fid.get('accuracy'), '.2f')} | {exact} |")
        ex = res["exact_fidelity"]
        print(f"(the int8 file's exact meaning vs fp32: cosine {ex['mean_cosine']:.4f}"
              + (f", agreement {ex['top1_agreement']:.1f}%" if "top1_agreement" in ex else "") + ")\n")
    if results.get("end_to_end"):
        print("## End to end (predict_batch on encoded files) vs model alone, batch 8")
        print("| package | backend | served | threads + decode workers | model alone items/s | end to end items/s "
              "| ratio |")
        print("|---|---|---|---|---|---|---|")
        for key, runs in results["end_to_end"].items():
            for r in runs:
                print(f"| {PACKAGES[key]} | {r['backend']} | {r['served']} | {r['threads']} + {r['decode_workers']} | "
                      f"{r['model_alone_ips']:.1f} | {r['end_to_end_ips']:.1f} | {r['ratio']:.2f} |")
        print()
    if results.get("cold_start"):
        print("## Cold start (fresh process: package open -> first prediction; imports apart)")
        print("| package | backend | cache | served | imports s | open -> first s |")
        print("|---|---|---|---|---|---|")
        for key, runs in results["cold_start"].items():
            for r in runs:
                print(f"| {PACKAGES[key]} | {r['backend']} | {r['cache']} | {r['served']} | {r['import_s']:.2f} | "
                      f"{r['open_to_first_s']:.2f} |")
        print()
    for line in results["targets"]:
        print(line)


def targets(results: dict[str, Any], isa: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("minilm", "lite0"):
        res = results["models"].get(key)
        if not res or "error" in res:
            continue
        want = TARGET_SPEEDUP[(key, isa["vnni"])]
        metric, floor = TARGET_FIDELITY[key]
        best = max((r for r in res["rows"] if r["graph"] != "fp32" and r["b8_ratio"] and not r["error"]
                    and r["fidelity"].get(metric, -1) >= floor), key=lambda r: r["b8_ratio"], default=None)
        edge = [r for r in res["rows"] if r["runtime"] != "nncf" and r["graph"] not in ("fp32", "bf16") and r["b8_ratio"]]
        top = max(edge, key=lambda r: r["b8_ratio"], default=None)
        met = top is not None and top["b8_ratio"] >= want and top["fidelity"].get(metric, -1) >= floor
        lines.append(f"target {key} int8 >= {want}x ORT fp32 at {metric} >= {floor} ({isa['label']}): "
                     f"{'MET' if met else 'not met'} - best edge-sdk graph row {top['name'] if top else '-'} "
                     f"{_f(top and top['b8_ratio'], '.2f')}x at {_f(top and top['fidelity'].get(metric), '.4g')}"
                     + (f"; fastest row within the fidelity: {best['name']} {best['b8_ratio']:.2f}x" if best else ""))
    for key, runs in results.get("end_to_end", {}).items():
        for r in runs:
            lines.append(f"target end to end >= {TARGET_END_TO_END:.0%} of model alone, {PACKAGES[key]} on "
                         f"{r['backend']}, {r['threads']} threads + {r['decode_workers']} decode workers: "
                         f"{'MET' if r['ratio'] >= TARGET_END_TO_END else 'not met'} ({r['ratio']:.2f})")
    for key, runs in results.get("cold_start", {}).items():
        for r in runs:
            ok = r["open_to_first_s"] <= TARGET_COLD_S
            lines.append(f"target cold start <= {TARGET_COLD_S:g} s, {PACKAGES[key]} on {r['backend']} "
                         f"({r['cache']} cache): {'MET' if ok else 'not met'} ({r['open_to_first_s']:.2f} s)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/bench/cpu.json"))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=12, help="timing rounds per row (default 12)")
    parser.add_argument("--quick", action="store_true", help="32 calibration / 32 held-out inputs, 3 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    isa = isa_info()
    log(f"ISA: {isa['label']}; CPU int8 graph {isa['served_graph']}")
    from runtime.runners.openvino import openvino_version

    results: dict[str, Any] = {"isa": isa, "threads": THREADS, "openvino": openvino_version(), "models": {},
                               "end_to_end": {}, "cold_start": {}}
    for key in args.models:
        try:
            results["models"][key] = bench_model(key, args, isa)
        except _models.ModelUnavailable as exc:
            results["models"][key] = {"error": str(exc)}
            log(f"{key}: skipped ({exc})")
    backends = ["onnxruntime-cpu", "openvino-cpu"] if openvino_version() else ["onnxruntime-cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        for key in [k for k in args.models if k in PACKAGES and "error" not in results["models"][k]]:
            layouts = [THREADS, 1] if key == "demo-image" else [THREADS]  # 1: a core left to decode on
            results["end_to_end"][key] = [end_to_end(key, b, max(3, args.rounds // 2), t)
                                          for b in backends for t in layouts]
            runs = []
            for backend in backends:
                cache = Path(tmp) / backend / key
                runs.append({**cold_start(key, backend, cache), "backend": backend, "cache": "empty"})
                if backend == "openvino-cpu":
                    runs.append({**cold_start(key, backend, cache), "backend": backend, "cache": "filled"})
            results["cold_start"][key] = runs
            log(f"{key}: end to end and cold start measured")
    results["targets"] = targets(results, isa)
    buffer = io.StringIO()
    sys.stdout, saved = buffer, sys.stdout
    try:
        print_report(results, isa)
    finally:
        sys.stdout = saved
    print(buffer.getvalue())
    results["report"] = buffer.getvalue()
    log.write(results, args.out)


if __name__ == "__main__":
    main()

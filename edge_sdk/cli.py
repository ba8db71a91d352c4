"""The ``edge-sdk`` command: thin glue over the SDK.

Every ``EdgeSDKError`` is printed as one line (plus its hint) and exits 1,
without a traceback. A missing optional dependency disables only the
subcommand that needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from edge_sdk._cli_kb import add_kb_parser
from edge_sdk._cli_keys import add_keys_parser
from edge_sdk.errors import BackendUnavailableError, EdgeSDKError
from runtime.manifest import CONVERT_TASKS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _cmd_devices(args: argparse.Namespace) -> int:
    import devices

    from devices.install import install_advice, python_env

    info = devices.detect(args.root)
    advice = install_advice(info, python_env(args.root))
    if args.json:
        _print_json({**info.to_dict(), "install": [a.__dict__ for a in advice]})
    else:
        print("\n".join(info.summary_lines() + [f"install {a.line()}" for a in advice]))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        from converters.conversion import convert
    except ImportError as exc:
        raise BackendUnavailableError(f"edge-sdk convert needs the 'convert' extra ({exc.name} is missing)",
                                      hint="pip install 'edge-sdk[convert]'") from None
    preprocess: Any = args.preprocess
    if preprocess and preprocess.lstrip().startswith("{"):
        try:
            preprocess = json.loads(preprocess)
        except json.JSONDecodeError as exc:
            raise EdgeSDKError(f"--preprocess is not valid JSON: {exc}") from None
    options: dict[str, Any] = {k: v for k, v in {
        "name": args.name, "version": args.version, "quantize": args.quantize, "smoothing": args.smoothing,
        "threshold": args.threshold, "normal": args.normal, "coreset_ratio": args.coreset_ratio,
        "feature_layers": [n.strip() for n in args.feature_layers.split(",") if n.strip()] if args.feature_layers
        else None,
    }.items() if v is not None}  # unset: the SDK's defaults
    options.update(archive=not args.directory, method=args.method, calibration_samples=args.calibration_samples,
                   budget=None if args.budget < 0 else args.budget)
    if args.no_smoothing:
        options["smoothing"] = None
    if args.no_report:
        options["report"] = False
    if args.sign:
        from runtime.signing import load_signing_key

        options["sign"] = load_signing_key(args.sign, extra="convert")  # a bad key fails before the conversion
    if args.prune:
        try:
            options["prune"] = json.loads(args.prune) if args.prune.lstrip().startswith("{") else args.prune
        except json.JSONDecodeError as exc:
            raise EdgeSDKError(f"--prune is not valid JSON: {exc}") from None
    report = convert(
        args.model, args.output, task=args.task, labels=_labels_arg(args.labels), preprocess=preprocess,
        tokenizer=args.tokenizer, max_length=args.max_length, calibration=args.calibration,
        validation=args.validation, progress=None if args.json else _Progress(), **options,
    )
    signer = options["sign"].key_id if args.sign else None
    if args.json:
        _print_json({**report.to_dict(), "signer": signer})
    else:
        print("\n".join(report.lines() + ([f"signed by key {signer}"] if signer else [])))
    return 0


class _Progress:
    """A one-line progress bar on stderr for calibration and the sensitivity search."""

    def __init__(self) -> None:
        self.stage, self.done = "", 0

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage:
            if self.stage:
                print(file=sys.stderr)
            self.stage, self.done = stage, 0
        self.done += step
        filled = int(30 * min(self.done, total) / max(total, 1))
        print(f"\r{stage:<12} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{total}", end="", file=sys.stderr)
        if self.done >= total:
            print(file=sys.stderr)
            self.stage = ""


def _labels_arg(value: str | None) -> Any:
    if value is None:
        return None
    return value if Path(value).is_file() else [v.strip() for v in value.split(",") if v.strip()]


def _cmd_report(args: argparse.Namespace) -> int:
    import importlib.util

    try:
        from converters.html_report import write_report
    except ImportError as exc:
        raise BackendUnavailableError(f"edge-sdk report needs the 'convert' extra ({exc.name} is missing)",
                                      hint="pip install 'edge-sdk[convert]'") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailableError("edge-sdk report needs matplotlib for its plots (the 'convert' extra)",
                                      hint="pip install 'edge-sdk[convert]'")
    out = write_report(args.packages, args.output, title=args.title, timed=not args.no_timing)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): {len(args.packages)} package(s)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from runtime.package import Package
    from runtime.signing import load_public_key

    trusted = [load_public_key(k) for k in args.trusted_key]
    package = Package.open(args.package, trusted_keys=trusted)
    serves, serve_line = (None, "not checked (--no-load)") if args.no_load else _serves(package)
    summary = {**package.manifest.summary(), "path": str(package.path), "hashes_ok": True, "serves": serves,
               "serve_check": serve_line, "signer": package.signer, "signed": package.signatures is not None,
               "reports": dict(package.manifest.reports)}
    code = 1 if serves is False else 0
    if args.json:
        _print_json(summary)
        return code
    verdict = {True: "verified", False: "CANNOT SERVE", None: "hashes ok"}[serves]
    print(f"{summary['name']} {summary['version']}  ({summary['task']}, {summary['precision']})  {verdict}")
    print(f"path: {summary['path']}")
    print(f"serves: {serve_line}")
    print(f"signature: {_signature_line(package, bool(trusted))}")
    print(f"labels: {', '.join(summary['labels'])}")
    for kind in ("inputs", "outputs"):
        for t in summary[kind]:
            print(f"{kind[:-1]}: {t['name']} {t['dtype']} {t['shape']}")
    print(f"preprocess: {json.dumps(summary['preprocess'], sort_keys=True)}")
    validation = summary["reports"].get("validation")
    if validation:
        print(f"validation accuracy: {validation['accuracy']:.3f} on {validation['samples']} samples")
    from converters.report import int8_lines, pruning_lines

    if summary["reports"].get("pruning"):
        print("\n".join(pruning_lines(summary["reports"]["pruning"])))
    if summary["reports"].get("canonicalization"):
        from converters.report import canonical_line

        print(canonical_line(summary["reports"]["canonicalization"]))
    if summary["reports"].get("int8"):
        print("\n".join(int8_lines(summary["reports"]["int8"])))
    if args.device:
        _print_device_choice(package)
    return code


def _serves(package: Any) -> tuple[bool | None, str]:
    """Whether the package can serve: its manifest against its preprocessing and graph, then the golden
    vectors through onnxruntime (what every device can run). Hashes alone do not say it can."""
    from runtime.pipeline import Pipeline

    try:
        with Pipeline.from_package(package, "onnxruntime-cpu") as pipeline:
            parity = pipeline.selection.parity
            detail = f", golden vectors within {parity.max_abs_diff:.1e}" if parity is not None else ""
            return True, f"yes, on onnxruntime-cpu ({pipeline.selection.precision_label}{detail})"
    except EdgeSDKError as exc:
        return False, f"no: {exc.message}"


def _signature_line(package: Any, trusted: bool) -> str:
    if package.signer:
        return f"signed by key {package.signer}" + (" (trusted)" if trusted else "")
    if package.signatures is not None:
        return "signed, but not checked here (pip install 'edge-sdk[serve]' to check it)"
    return "unsigned"


def _print_device_choice(package: Any) -> None:
    """Run selection here (with the golden-vector check) and say what serves and why the rest do not."""
    from runtime.backends import device_key
    from runtime.select import select_runner

    print(f"this device: {device_key()}")
    try:
        selection = select_runner(package)
    except EdgeSDKError as exc:
        print(f"no backend can serve here: {exc.message}")
        return
    try:
        parity = selection.parity
        detail = f", parity {parity.max_abs_diff:.2e} <= {parity.tolerance:g}" if parity else ""
        engine = f", engine {selection.served.engine.name}" if selection.served.engine else ""
        print(f"would serve with: {selection.backend} ({selection.precision_label}, {selection.graph} graph"
              f"{engine}{detail})")
        for skipped in selection.skipped:
            print(f"  skipped {skipped.backend}: {skipped.reason}")
    finally:
        selection.runner.deactivate()


def _cmd_engine_build(args: argparse.Namespace) -> int:
    import devices
    from converters.device_build import build_for_device, plan_build
    from runtime.package import Package

    if args.dry_run:
        package = Package.open(args.package)
        plan = plan_build(package, devices.detect(), dla_core=args.dla_core, precision=args.precision,
                          workspace_mb=args.workspace_mb, sparsity=args.sparsity)
        print(f"would build engine {plan.spec.name} from the {plan.graph} graph (about {plan.needed_mb} MB needed)")
        print(plan.command(package))
        return 0
    path, result, plan = build_for_device(args.package, dla_core=args.dla_core, precision=args.precision,
                                          workspace_mb=args.workspace_mb, sparsity=args.sparsity,
                                          progress=_build_progress)
    print(f"built engine {plan.spec.name} in {result.seconds:.0f} s with TensorRT {result.tensorrt_version}: {path}")
    print(f"reproduce with: {result.command}")
    if args.into:
        from runtime.engine_cache import add_package_engine

        out = add_package_engine(Package.open(args.package), args.into, result.engine, plan.fingerprint.to_dict(),
                                 plan.spec, result.tensorrt_version)
        print(f"wrote {out.path} carrying engines/{plan.spec.name}.plan")
    return 0


def _build_progress(phase: str, fraction: float) -> None:
    print(f"\r{phase[:40]:<40} {100 * fraction:5.1f}%", end="" if fraction < 1 else "\n", file=sys.stderr)


def _cmd_engine_list(args: argparse.Namespace) -> int:
    from runtime.engine_cache import EngineCache, default_cache_dir

    entries = EngineCache(default_cache_dir()).entries()
    if args.json:
        _print_json(entries)
    for entry in [] if args.json else entries:
        print(json.dumps(entry, sort_keys=True, default=str))
    if not entries and not args.json:
        print(f"no engines in {default_cache_dir()}")
    return 0


def _cmd_calib_cache(args: argparse.Namespace) -> int:
    from converters.calibration.scales import ScaleFile
    from runtime.package import Package, sha256_bytes

    package = Package.open(args.package)
    if "scales.json" not in package.manifest.files:
        raise EdgeSDKError(f"package {args.package} has no scales.json", hint="convert it with --quantize int8")
    scales = ScaleFile.from_json(package.read_bytes("scales.json").decode("utf-8"))
    if scales.graph_hash != sha256_bytes(package.read_bytes(package.manifest.model)):
        raise EdgeSDKError(
            f"the scales in {args.package} were made for another graph than its {package.manifest.model}; "
            "a calibration cache from them would be silently wrong",
            hint="re-convert the package with --quantize int8")
    cache = scales.to_trt_cache(args.trt_version or _detected_tensorrt())
    if args.output:
        Path(args.output).write_text(cache, encoding="utf-8")
    else:
        print(cache, end="")
    return 0


def _detected_tensorrt() -> str:
    """This machine's TensorRT version; TensorRT ignores a calibration cache whose header names another."""
    import devices

    version = devices.detect().tensorrt_version
    if version is None:
        raise EdgeSDKError("no TensorRT is installed here to take the calibration cache's version from",
                           hint="pass --trt-version of the device that reads it: 8.5.2 on JetPack 5.1.x, "
                                "8.6.2 on JetPack 6.0, 10.3.0 on JetPack 6.1/6.2")
    return version


def _run_inputs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [(t[:40], t) for t in args.text or []]
    if args.text_file:
        lines = Path(args.text_file).read_text(encoding="utf-8").splitlines()
        items += [(line[:40], line) for line in lines if line.strip()]
    for value in args.inputs:
        path = Path(value)
        if path.is_dir():
            items += [(str(p), str(p)) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            items.append((value, value))
    if not items:
        raise EdgeSDKError("nothing to run", hint="pass image paths, a folder, --text or --text-file")
    return items


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_sdk.model import load

    if args.source:
        if args.inputs or args.text or args.text_file:
            raise EdgeSDKError("--source streams frames; it cannot be combined with input files or texts",
                               hint="run them separately")
        from edge_sdk._cli_stream import run_sources

        return run_sources(args)

    items = _run_inputs(args)
    with load(args.package, backend=args.backend, threads=args.threads, precision=args.precision) as model:
        predictions = (model.predict_batch([x for _, x in items]) if args.batch is None
                       else model.predict_batch([x for _, x in items], max_batch=args.batch))
        if args.json:
            _print_json([{"input": name, **p.to_dict()} for (name, _), p in zip(items, predictions)])
            return 0
        width = max(len(name) for name, _ in items)
        for (name, _), p in zip(items, predictions):
            print(f"{name:<{width}}  {p.label:<18} {p.score:6.3f}  {p.backend} {p.precision}  "
                  f"{p.timings.total_ms / p.batch_size:7.2f} ms")
        for skipped in model.info["skipped_backends"]:
            print(f"(skipped {skipped['backend']}: {skipped['reason']})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edge_sdk._cli_deploy import add_deploy_parser
    from edge_sdk._cli_serve import add_serve_parser
    from edge_sdk.deploy.agent import add_device_parser
    from edge_sdk._cli_service import add_service_parser
    from edge_sdk._cli_stream import add_stream_arguments

    parser = argparse.ArgumentParser(prog="edge-sdk", description="Convert models and run them on edge devices.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("devices", help="what this machine is and what it can run")
    p.add_argument("--root", default="/", help="read device files under this root (default /)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("convert", help="convert an ONNX model into an .edgepkg package")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("-o", "--output", required=True, help="package path to write")
    p.add_argument("--task", required=True, choices=CONVERT_TASKS)
    p.add_argument("--labels", help="labels.txt path or comma-separated labels (anomaly-detection: default ok,defect)")
    p.add_argument("--preprocess", help="image preprocessing as JSON or a JSON file path")
    p.add_argument("--tokenizer", help="tokenizer.json of a text model")
    p.add_argument("--max-length", type=int, default=128, help="text truncation length")
    p.add_argument("--calibration", help="calibration images folder or text file")
    p.add_argument("--validation", help="labelled validation: ImageFolder or label<TAB>text file")
    p.add_argument("--name", help="package name (default: from the output file name)")
    p.add_argument("--version", help="package version")
    p.add_argument("--directory", action="store_true", help="write a directory instead of one archive file")
    p.add_argument("--quantize", choices=["int8"], help="also build int8 graphs (needs --calibration)")
    p.add_argument("--method", default="auto", choices=["auto", "entropy", "percentile", "mse", "minmax"],
                   help="calibration range method (auto: least quantization error per tensor)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="allowed accuracy drop in points before layers return to float (negative: no search)")
    p.add_argument("--calibration-samples", type=int, default=256, help="calibration samples to use")
    p.add_argument("--smoothing", type=float, help="activation smoothing strength for transformers (0-1)")
    p.add_argument("--no-smoothing", action="store_true", help="keep the fp32 graph as is before quantizing")
    p.add_argument("--threshold", type=float,
                   help="anomaly-score: score at and above which an input is a fault (default: fitted on --validation)")
    p.add_argument("--normal", help="anomaly-detection: folder of good images the memory bank is built from "
                                    "(also the default --calibration)")
    p.add_argument("--coreset-ratio", type=float,
                   help="anomaly-detection: share of the good images' patch features the memory bank keeps (0.05)")
    p.add_argument("--feature-layers", help="anomaly-detection: comma-separated backbone tensors to read patches "
                                            "from (default: the stage outputs at strides 16 and 32)")
    p.add_argument("--prune", help='magnitude | activation | 2:4, or JSON such as '
                                   '\'{"method": "structured", "ratio": 0.3}\' or \'{"method": "structured", "budget": 1.0}\'')
    p.add_argument("--sign", metavar="KEY", help="sign the package with this ed25519 private key file "
                                                 "(edge-sdk keys generate)")
    p.add_argument("--no-report", action="store_true",
                   help="leave the HTML conversion report (reports/report.html) out of the package")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("report", help="the HTML conversion report of one or more packages of a model, side by side")
    p.add_argument("packages", nargs="+", metavar="PKG", help="packages to compare (e.g. its fp32, pruned and int8 ones)")
    p.add_argument("-o", "--output", required=True, help="the .html file to write (one self-contained page)")
    p.add_argument("--title", help="the page's title (default: from the model names)")
    p.add_argument("--no-timing", action="store_true",
                   help="do not time the graphs on this machine (latency columns stay empty)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("inspect", help="verify a package (hashes, signature, that it serves) and show what it holds")
    p.add_argument("package")
    p.add_argument("--no-load", action="store_true",
                   help="check hashes and signature only; do not load the graph and run its golden vectors")
    p.add_argument("--device", action="store_true", help="also show which backend would serve it here, and why")
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="also require a signature by this public key (repeatable), as a device that trusts it does")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("engine", help="TensorRT engines for this device")
    engine = p.add_subparsers(dest="engine_command", required=True)
    p = engine.add_parser("build", help="build this device's engine for a package into the engine cache")
    p.add_argument("package")
    p.add_argument("--dla-core", type=int, help="build for this DLA core (GPU fallback allowed; fixed shapes; "
                                                "int8 from the calibration cache, else fp16)")
    p.add_argument("--precision", choices=("auto", "int8", "fp16", "fp32"), default="auto",
                   help="auto: int8 when the package has it, else fp16")
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace limit")
    p.add_argument("--sparsity", action="store_true", help="enable 2:4 sparse tactics")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the trtexec command, build nothing")
    p.add_argument("--into", help="also write a copy of the package that carries the engine (for a fleet of "
                                  "identical devices)")
    p.set_defaults(func=_cmd_engine_build)
    p = engine.add_parser("list", help="engines in the engine cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_engine_list)

    p = sub.add_parser("calib-cache", help="render a package's int8 scales as a TensorRT calibration cache")
    p.add_argument("package")
    p.add_argument("--trt-version", help="TensorRT version of the device that reads the cache (default: the "
                                         "TensorRT installed here; 8.5.2 on JetPack 5, 10.3.0 on JetPack 6.1/6.2)")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=_cmd_calib_cache)

    add_kb_parser(sub)
    add_keys_parser(sub)

    p = sub.add_parser("run", help="predict images or texts with a package")
    p.add_argument("package")
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--text-file", help="a file with one text per line")
    p.add_argument("--backend", default="auto", help="auto, or a comma-separated policy (e.g. onnxruntime-cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                   help="what to serve (auto: int8 when the package has it; fp16: TensorRT only)")
    p.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    p.add_argument("--batch", type=int, help="max batch size (default: predict_batch's for files, 8 for streams)")
    p.add_argument("--json", action="store_true")
    add_stream_arguments(p)
    p.set_defaults(func=_cmd_run)
    add_serve_parser(sub)
    add_service_parser(sub)
    add_deploy_parser(sub)
    add_device_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EdgeSDKError as exc:
        print(f"edge-sdk: error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edge-sdk: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

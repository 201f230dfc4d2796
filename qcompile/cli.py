"""The ``qcompile`` command line: compile, explain, evaluate, inspect, report, demo.

MODEL is ``package.module:factory`` (returns the model and its example inputs) or a local Hugging Face
folder (safetensors weights). DATA is a folder of images, a .npy / .pt tensor file or
``package.module:callable``. Errors print one line and exit with code 2."""
from __future__ import annotations

import argparse
import sys
import warnings

EXIT_ERROR = 2
BACKENDS_HELP = "x86 (PyTorch quantized kernels), onnx (ONNX Runtime QDQ), executorch (XNNPACK .pte)"
EPILOG = """examples:
  qcompile compile qcompile.demo_model:tiny_cnn --backend onnx --calibration qcompile.demo_model:calibration -o tiny.onnx
  qcompile explain qcompile.demo_model:tiny_cnn --backend executorch
  qcompile evaluate tiny.onnx --model qcompile.demo_model:tiny_cnn --data qcompile.demo_model:evaluation
  qcompile inspect tiny.onnx
  qcompile report tiny.qc --html report.html"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- commands ---------------------------------------------------------------------------------------
def cmd_compile(a) -> int:
    import qcompile
    from .cli_io import as_batches, load_data, load_model
    _say(f"[1/3] loading {a.model}")
    model, args, kwargs = load_model(a.model, a.seq_len)
    calib = as_batches(load_data(a.calibration, args)) if a.calibration else None
    verify = as_batches(load_data(a.verify_data, args)) if a.verify_data else None
    _say(f"[2/3] compiling for {a.backend} ({a.mode})")
    art = qcompile.compile(model, args, backend=a.backend, calibration=calib, mode=a.mode, progress=True,
                           verify_data=verify, example_kwargs=kwargs or None)
    _say(f"[3/3] saving {a.output}")
    art.save(a.output)
    print(_summary_line(art.report))
    if a.html:
        art.report.to_html(a.html)
        print(f"HTML report: {a.html}")
    return 0


def _summary_line(rep) -> str:
    s = rep.summary()
    bs = s["int8_byte_share"]
    line = (f"{s['backend']} ({s['runtime']}): int8 MACs {s['int8_mac_share']:.1%}, parameters "
            f"{s['int8_param_share']:.1%}" + (f", stored bytes {bs:.1%}" if bs is not None else ""))
    h = rep.heldout.get("summary", {})
    if "sqnr_vs_float_db_min" in h:
        line += f"; held-out SQNR vs float min {h['sqnr_vs_float_db_min']:.1f} dB"
    return line


def cmd_explain(a) -> int:
    import qcompile
    from .cli_io import load_model
    model, args, kwargs = load_model(a.model, a.seq_len)
    print(qcompile.explain(model, args, backend=a.backend, mode=a.mode, example_kwargs=kwargs or None))
    return 0


def cmd_evaluate(a) -> int:
    import qcompile
    from .cli_files import open_artifact
    from .cli_io import load_data, load_model
    cand = open_artifact(a.artifact)
    if a.model:
        reference, args, _ = load_model(a.model, a.seq_len)
    elif hasattr(cand, "run_reference"):
        reference, args = cand.run_reference, tuple(cand.example_inputs.args) if cand.example_inputs else ()
        _say("no --model: comparing with the artifact's q/dq reference graph (give --model for the float model)")
    else:
        raise qcompile.InputError(f"evaluating {a.artifact} needs --model MODEL (the float model to compare with)")
    data = load_data(a.data, args)
    sizes = tuple(int(b) for b in a.batch_sizes.split(",") if b) if a.batch_sizes else ()
    ev = qcompile.evaluate(cand, reference, data, slices=a.slices, batch_sizes=sizes, task=a.task, progress=True)
    print(ev)
    if a.json:
        ev.to_json(a.json)
    if a.html:
        ev.to_html(a.html, report=getattr(cand, "report", None))
        print(f"HTML report: {a.html}")
    return 0


def cmd_inspect(a) -> int:
    from .cli_files import inspect_text
    print(inspect_text(a.file))
    return 0


def cmd_report(a) -> int:
    from .cli_files import _check
    from .errors import InputError
    if _check(a.file) != ".qc":
        raise InputError(f"{a.file}: the full report lives in .qc files (a .onnx / .pte file keeps only its "
                         f"summary: use qcompile inspect)")
    import qcompile
    rep = qcompile.load(a.file).report
    if not (a.html or a.json):
        print(rep)
    if a.html:
        rep.to_html(a.html)
        print(f"HTML report: {a.html}")
    if a.json:
        rep.to_json(a.json)
    return 0


def cmd_demo(a) -> int:
    import qcompile
    from . import demo_model
    from .backends import get_backend
    get_backend(a.backend)  # an unknown backend fails before any work
    if a.model == "tiny_cnn":
        (model, example), calib, data, slices = demo_model.tiny_cnn(), demo_model.calibration(), \
            demo_model.evaluation(), "brightness"
    else:  # the demo shapes (seeded random weights)
        from . import demo_shapes
        model, example = demo_shapes.get_model(a.model)
        calib, slices = demo_shapes.calibration_samples(a.model), None
        data = calib[-4:]
    print(qcompile.explain(model, example, backend=a.backend).summary(), "(predicted before calibration)\n")
    art = qcompile.compile(model, example, backend=a.backend, calibration=calib, progress=True)
    print(art.report)
    ev = qcompile.evaluate(art, model, data, slices=slices, batch_sizes=(1, 8),
                           task="embedding" if a.model == "bert_encoder" else None)
    print()
    print(ev)
    if a.html:
        art.report.to_html(a.html, evaluation=ev)
        print(f"HTML report written to {a.html}")
    return 0


# -- parser -----------------------------------------------------------------------------------------
def _model_args(p, backend=True):
    p.add_argument("model", metavar="MODEL", help="package.module:factory returning (model, example_inputs), "
                   "or a local Hugging Face model folder")
    if backend:
        p.add_argument("--backend", default="x86", help=BACKENDS_HELP + " (default x86)")
        p.add_argument("--mode", default="static", choices=["static", "dynamic", "weight_only"])
    p.add_argument("--seq-len", type=int, default=32, help="sequence length of a Hugging Face model's example")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = _Parser(prog="qcompile", description="qcompile: a quantization compiler for PyTorch models "
                 "(capture, calibrate, int8 on x86 / ONNX Runtime / ExecuTorch, verify, evaluate).",
                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qcompile {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    c = sub.add_parser("compile", help="quantize MODEL and save the artifact (.qc, .onnx or .pte)",
                       description="Quantize MODEL for a backend and save it; prints the coverage summary.")
    _model_args(c)
    c.add_argument("--calibration", metavar="DATA", help="calibration data (image folder, .npy, .pt, module:callable)")
    c.add_argument("--verify-data", metavar="DATA", help="held-out data the report verifies on")
    c.add_argument("-o", "--output", required=True, help="output file: .qc (any backend), .onnx or .pte")
    c.add_argument("--html", help="also write the HTML report here")
    c.set_defaults(fn=cmd_compile)
    e = sub.add_parser("explain", help="predict what will run int8 and what float, and why (no calibration)",
                       description="Predict coverage before calibration: every node int8 or float, with the reason.")
    _model_args(e)
    e.set_defaults(fn=cmd_explain)
    v = sub.add_parser("evaluate", help="task metric, slices, changed predictions and latency of a saved artifact",
                       description="Evaluate a saved artifact (.qc, .onnx, .pte) against the float model on DATA.")
    v.add_argument("artifact", metavar="ARTIFACT")
    v.add_argument("--data", required=True, metavar="DATA", help="image folder, .npy, .pt or module:callable")
    v.add_argument("--model", metavar="MODEL", help="the float model (module:factory or HF folder) to compare with")
    v.add_argument("--slices", help="data key giving each sample its slice (e.g. targets)")
    v.add_argument("--task", choices=["classification", "embedding", "sequence"])
    v.add_argument("--batch-sizes", default="1,8,32", help="latency batch sizes, comma separated ('' for none)")
    v.add_argument("--seq-len", type=int, default=32)
    v.add_argument("--json", help="write the evaluation as JSON")
    v.add_argument("--html", help="write the HTML report with the evaluation")
    v.set_defaults(fn=cmd_evaluate)
    i = sub.add_parser("inspect", help="show what a saved .qc / .onnx / .pte file holds",
                       description="Show a saved artifact: its report (.qc), integer kernels (.onnx), delegates (.pte).")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(fn=cmd_inspect)
    r = sub.add_parser("report", help="print or write (--html, --json) the report of a .qc file",
                       description="The coverage report of a saved .qc artifact, as text, HTML or JSON.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--html")
    r.add_argument("--json")
    r.set_defaults(fn=cmd_report)
    d = sub.add_parser("demo", help="compile and evaluate a tiny CNN, print its report",
                       description="Compile qcompile.demo_model:tiny_cnn, print the report and the evaluation.")
    d.add_argument("--backend", default="x86", help=BACKENDS_HELP)
    d.add_argument("--model", default="tiny_cnn", choices=["tiny_cnn", "resnet18", "mobilenet_v2", "bert_encoder"],
                   help="which model (default tiny_cnn)")
    d.add_argument("--html", help="also write the HTML report here")
    d.set_defaults(fn=cmd_demo)
    return ap


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 600 else text[:597] + "..."


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        _say("qcompile: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if a.debug:
            raise
        kind = "" if _is_ours(e) else f"{type(e).__name__}: "
        _say(f"qcompile {a.cmd}: error: {kind}{_one_line(e)}")
        return EXIT_ERROR


def _is_ours(e) -> bool:
    from .errors import QCompileError
    return isinstance(e, QCompileError)


if __name__ == "__main__":
    sys.exit(main())

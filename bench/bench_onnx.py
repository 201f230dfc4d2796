"""ONNX QDQ on ONNX Runtime (CPU EP): qcompile vs onnxruntime.quantization.quantize_static vs float.

    python bench/bench_onnx.py [--repeats 15] [--calib 8] [--threads 2] [--sweep]

Two workloads: the ResNet-18 shape at batch 4, 224x224, and the BERT-shaped encoder (batch 4, 128
tokens). The float model is exported with torch.onnx.export (dynamo); ORT's own int8 model is that file
quantized by ``quantize_static`` (QDQ, per-channel, uint8 activations / int8 weights, MinMax) on the same
calibration batches. Latencies are medians of interleaved ``session.run`` calls, median over 5 fresh processes that hold
only the three sessions (order rotated; the machine is shared); SQNR is against the
float PyTorch model, minimum over held-out batches. ``--sweep`` adds the activation-scheme table
(uint8 / int8 activations, 7-bit or full-range weights, int8 attention matmuls) used to pick the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

import onnx
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile.qparams import sqnr  # noqa: E402
from qcompile.demo_shapes import image_batches, make_bert_encoder, make_resnet18  # noqa: E402

warnings.filterwarnings("ignore")


def resnet_workload(n_calib: int):
    model = make_resnet18(seed=0)
    calib = [(b,) for b in image_batches(n_calib, batch=4, seed=1)]
    held = [(b,) for b in image_batches(3, batch=4, seed=2)]
    return "ResNet-18 shape, batch 4, 224x224", model, calib, held, ["x"]


def bert_workload(n_calib: int):
    model = make_bert_encoder(seed=0, max_len=128)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 1000, (4, 128), generator=g)
        mask = torch.ones(4, 128, dtype=torch.int64)
        mask[2:, 96:] = 0
        return ids, mask
    calib = [batch(100 + i) for i in range(n_calib)]
    held = [batch(200 + i) for i in range(3)]
    return "BERT-shaped encoder (4 layers, hidden 256), batch 4, 128 tokens", model, calib, held, \
        ["input_ids", "attention_mask"]


def export_float(model, example, names, path):
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in example)
    prog = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=shapes, input_names=names,
                             verbose=False)
    prog.save(path)
    return path


def ort_quantize(float_path, calib, names, out_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = out_path.replace(".onnx", "_pre.onnx")
    quant_pre_process(float_path, pre)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {n: t.numpy() for n, t in zip(names, b)}
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def session(model_or_path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # idle sessions' worker threads spin after each run and steal the cores of the one being timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def feed(sess, batch):
    return {i.name: t.numpy() for i, t in zip(sess.get_inputs(), batch)}


def time_in_fresh_process(tmp: str, paths: dict, args, processes: int = 5) -> dict:
    """Median over several fresh processes, each holding only the sessions and timing them
    interleaved (order rotated per process). One process alone swings by +-20% on this shared machine,
    and the bench process itself carries torch.export / calibration / ORT quantizer state."""
    spec = os.path.join(tmp, "timing.json")
    with open(spec, "w") as f:
        json.dump({"paths": paths, "x": os.path.join(tmp, "x.pt"), "threads": args.threads,
                   "repeats": args.repeats}, f)
    runs = []
    for i in range(processes):
        out = subprocess.run([sys.executable, __file__, "--time-spec", spec, "--rotate", str(i)], check=True,
                             capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in paths}


def _time_spec(spec_path: str, rotate: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    x = torch.load(spec["x"], weights_only=True)  # a tensor this script saved: never unpickle objects
    names = list(spec["paths"])
    names = names[rotate % len(names):] + names[:rotate % len(names)]
    sess = {k: session(spec["paths"][k], spec["threads"]) for k in names}
    feeds = {k: feed(s, x) for k, s in sess.items()}
    lat = interleaved({k: (lambda k=k: sess[k].run(None, feeds[k])) for k in names}, repeats=spec["repeats"])
    print(json.dumps(lat))


def best_of_medians(fns: dict, repeats: int, rounds: int = 3) -> dict:
    """The machine is shared: take the best of several interleaved medians (each round rotates the order)."""
    best = {}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        lat = interleaved({k: fns[k] for k in order}, repeats=repeats)
        best = {k: min(lat[k], best.get(k, lat[k])) for k in names}
    return best


def min_sqnr(model, sess, held):
    with torch.no_grad():
        return min(sqnr(model(*b), torch.from_numpy(sess.run(None, feed(sess, b))[0])) for b in held)


def compile_qc(model, calib, threads, compile_kw=None, **options):
    art = qcompile.compile(model, calib[0], backend="onnx", calibration=calib, progress=False,
                           backend_options=dict(threads=threads, **options), **(compile_kw or {}))
    return art, session(art.lowered.model, threads)


def run_workload(work, args, tmp):
    title, model, calib, held, names = work
    x = held[0]
    float_path = export_float(model, x, names, os.path.join(tmp, "float.onnx"))
    ortq_path = ort_quantize(float_path, calib, names, os.path.join(tmp, "ort_int8.onnx"))
    art, _ = compile_qc(model, calib, args.threads)
    qc_path = art.save(os.path.join(tmp, "qcompile.onnx"))
    gptq, _ = compile_qc(model, calib, args.threads, compile_kw={"algorithm": "gptq"})
    gptq_path = gptq.save(os.path.join(tmp, "qcompile_gptq.onnx"))
    torch.save(x, os.path.join(tmp, "x.pt"))
    paths = {"float": float_path, "ort": ortq_path, "qc": qc_path, "qc_gptq": gptq_path}
    lat = time_in_fresh_process(tmp, paths, args)
    size = {k: os.path.getsize(p) for k, p in paths.items()}
    sq = {k: min_sqnr(model, session(paths[k], args.threads), held) for k in ("ort", "qc", "qc_gptq")}
    f = lat["float"]
    rows = [
        ["ORT float (torch.onnx.export)", f"{f*1e3:.1f}", "1.00x", "-", "-", f"{size['float']/1e6:.1f}", "1.00"],
        ["ORT int8: quantize_static (QDQ, per-channel)", f"{lat['ort']*1e3:.1f}", f"{f/lat['ort']:.2f}x", "1.00",
         f"{sq['ort']:.1f}", f"{size['ort']/1e6:.1f}", f"{size['ort']/size['float']:.2f}"],
        ["ORT int8: qcompile backend=onnx", f"{lat['qc']*1e3:.1f}", f"{f/lat['qc']:.2f}x",
         f"{lat['qc']/lat['ort']:.2f}", f"{sq['qc']:.1f}", f"{size['qc']/1e6:.1f}", f"{size['qc']/size['float']:.2f}"],
        ["ORT int8: qcompile backend=onnx, algorithm='gptq'", f"{lat['qc_gptq']*1e3:.1f}", f"{f/lat['qc_gptq']:.2f}x",
         f"{lat['qc_gptq']/lat['ort']:.2f}", f"{sq['qc_gptq']:.1f}", f"{size['qc_gptq']/1e6:.1f}",
         f"{size['qc_gptq']/size['float']:.2f}"],
    ]
    print(f"\n### {title}\n")
    print(table(rows, ["model", "latency ms", "speed-up vs ORT float", "latency / quantize_static",
                       "SQNR vs float dB", "file MB", "size / float"]))
    v = art.report.verify
    print(f"\nqcompile vs its reference graph on ORT: within one step {v['within_one_step']:.4f}, "
          f"SQNR {v['sqnr_vs_reference_db']:.1f} dB, first layer drop: {v['first_sqnr_drop']}; "
          f"ORT int8 ops {v['ort_int8_ops']}, float ops {v['ort_float_ops']}")
    return model, calib, held


SWEEP = [
    ("uint8 act, int8 weights (default)", {}),
    ("int8 act (ORT rewrites to uint8 on x86)", {"act_dtype": "int8"}),
    ("uint8 act, 7-bit weights (reduce_range)", {"weight_reduce_range": True}),
    ("uint8 act, full-range int8 weights [-128, 127]", {"weight_narrow": False}),
    ("attention matmuls kept float", {"quantize_attention": False}),
]


def sweep(work, args):
    title, model, calib, held, _ = work
    arts = {name: compile_qc(model, calib, args.threads, **opts) for name, opts in SWEEP}
    x = held[0]
    feeds = {name: feed(s, x) for name, (_, s) in arts.items()}
    lat = best_of_medians({name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, (_, s) in arts.items()},
                          args.repeats)
    rows = []
    for name, (art, s) in arts.items():
        v = art.report.verify
        rows.append([name, f"{lat[name]*1e3:.1f}", f"{min_sqnr(model, s, held):.1f}",
                     f"{v['within_one_step']:.4f}", f"{v['min_layer_within_one_step']:.4f}"])
    print(f"\n#### scheme sweep: {title}\n")
    print(table(rows, ["scheme", "latency ms", "SQNR vs float dB", "ORT vs reference: within one step (output)",
                       "min over layers"]))


def main():
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--keep", help="write the ONNX files to this folder instead of a temporary one")
    ap.add_argument("--time-spec", help=argparse.SUPPRESS)
    ap.add_argument("--rotate", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_spec:
        return _time_spec(args.time_spec, args.rotate)
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    print(f"onnxruntime {ort.__version__} CPU EP, {args.threads} intra-op threads; latency = median over 5 fresh "
          f"processes of the median of {args.repeats} interleaved runs; SQNR = min over 3 held-out batches vs the "
          f"float PyTorch model")
    with tempfile.TemporaryDirectory() as scratch:
        for make in (resnet_workload, bert_workload):
            work = make(args.calib)
            tmp = os.path.join(args.keep or scratch, make.__name__.replace("_workload", ""))
            os.makedirs(tmp, exist_ok=True)
            run_workload(work, args, tmp)
            if args.sweep:
                sweep(work, args)


if __name__ == "__main__":
    main()

"""Static int8 on a real transformer: MiniLM-L6 (all-MiniLM-L6-v2 weights) on x86 and ONNX Runtime.

    python bench/bench_minilm_static.py [--repeats 9] [--seq 128] [--backends x86,onnx]

Per backend: float, qcompile dynamic int8, qcompile static int8 (default: fp32-output linears where every
consumer is float), static with the output linears requantized (``float_output_linears=False``, what
static was before), static + SmoothQuant, and the peer a user would otherwise pick (x86: torch.ao
``quantize_dynamic``; ONNX: ORT ``quantize_static`` on the float ONNX graph with the same calibration).
Calibration: bench/calibration_sentences.txt (not the evaluated sentences); evaluation: min / mean
sentence-embedding cosine to float over the 24 zoo sentences. Latency: median of interleaved calls at
batch 8 (and 1), ``--seq`` tokens; ratio against qcompile dynamic.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from _fixtures import zoo  # noqa: E402

warnings.filterwarnings("ignore")
CALIBRATION = [s for s in (Path(__file__).parent / "calibration_sentences.txt").read_text().splitlines() if s.strip()]


def _enc(tok, sentences, seq):
    e = tok(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return e["input_ids"], e["attention_mask"]


def _ort_peer(model, tok, seq, cal, tmp):
    """ORT quantize_static (QDQ, per-channel, u8/s8) on the float ONNX graph qcompile emits."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    import onnxruntime as ort
    float_art = qcompile.compile(model, cal[0], backend="onnx", mode="weight_only", exclude=[".*"], verify=False)
    fp = float_art.save(os.path.join(tmp, "float.onnx"))
    names = [i.name for i in ort.InferenceSession(fp).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{n: t.numpy() for n, t in zip(names, s)} for s in cal])

        def get_next(self):
            return next(self.it, None)
    qp = os.path.join(tmp, "peer.onnx")
    quantize_static(fp, qp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    sess = ort.InferenceSession(qp)

    def run(ids, mask):
        out = sess.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0]
        return {"last_hidden_state": torch.from_numpy(out)}
    return run


def systems(backend, model, tok, seq, tmp):
    cal = [_enc(tok, CALIBRATION[i:i + 8], seq) for i in range(0, len(CALIBRATION), 8)]
    ex = cal[0]
    kw = dict(backend=backend, verify=False, progress=False)
    out = {"float": model,
           "qcompile dynamic int8": qcompile.compile(model, ex, mode="dynamic", **kw),
           "qcompile static int8": qcompile.compile(model, ex, calibration=cal, **kw),
           "static, output linears requantized": qcompile.compile(
               model, ex, calibration=cal, backend_options={"float_output_linears": False}, **kw),
           "qcompile static int8 + smoothquant": qcompile.compile(model, ex, calibration=cal,
                                                                  algorithm="smoothquant", **kw)}
    if backend == "x86":
        out["peer: torch.ao quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    else:
        out["peer: ORT quantize_static"] = _ort_peer(model, tok, seq, cal, tmp)
    return out


def backend_table(backend, model, tok, seq, repeats, tmp) -> str:
    syst = systems(backend, model, tok, seq, tmp)
    ref = zoo.embed(model, tok, zoo.SENTENCES, max_length=seq)
    cos = {}
    for k, m in syst.items():
        if k != "float":
            c = torch.nn.functional.cosine_similarity(ref, zoo.embed(m, tok, zoo.SENTENCES, max_length=seq))
            cos[k] = (c.min().item(), c.mean().item())
    lat = {}
    with torch.no_grad():
        for b in (1, 8):
            args = _enc(tok, zoo.SENTENCES[:b], seq)
            lat[b] = interleaved({k: (lambda m=m: m(*args)) for k, m in syst.items()}, repeats=repeats)
    dyn = "qcompile dynamic int8"
    rows = [[k, "-" if k == "float" else f"{cos[k][0]:.4f} / {cos[k][1]:.4f}",
             f"{lat[1][k] * 1e3:.1f}", f"{lat[8][k] * 1e3:.1f}", f"{lat[8]['float'] / lat[8][k]:.2f}x",
             f"{lat[8][dyn] / lat[8][k]:.2f}x"] for k in syst]
    return table(rows, [f"MiniLM-L6 on {backend}, seq {seq}", "cosine min / mean", "ms b1", "ms b8",
                        "vs float b8", "vs dynamic b8"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--backends", default="x86,onnx")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine_line())
    print(f"torch threads: {torch.get_num_threads()}; calibration: {len(CALIBRATION)} sentences of "
          f"bench/calibration_sentences.txt; evaluated on the {len(zoo.SENTENCES)} zoo sentences\n")
    model, tok = zoo.load_minilm()
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends.split(","):
            print(backend_table(b, model, tok, args.seq, args.repeats, tmp) + "\n", flush=True)


if __name__ == "__main__":
    main()

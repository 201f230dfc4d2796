"""GPTQ vs round-to-nearest (RTN) weight rounding, on the two models the issues judge.

    python bench/bench_gptq.py [--calib 8] [--skip-resnet] [--skip-minilm]

Table 1: ResNet-18 shape, static int8 (x86), exactly bench_x86.py's setup (resnet18_shaped, Gaussian
inputs, same seeds): output SQNR vs float on held-out batches, compile time, time spent in GPTQ.
Table 2: MiniLM-L6 weight-only int4 g128 (affine), calibrated on bench/calibration_sentences.txt (64
sentences disjoint from the 24 evaluation sentences): min / mean cosine of sentence embeddings and
their mean squared error to float.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile.gptq import GPTQConfig  # noqa: E402
from qcompile.qparams import sqnr  # noqa: E402

warnings.filterwarnings("ignore")
CALIBRATION = [s for s in (Path(__file__).parent / "calibration_sentences.txt").read_text().splitlines()
               if s and not s.startswith("#")]


def resnet_table(n_calib: int) -> str:
    from qcompile.demo_shapes import resnet18_shaped
    torch.manual_seed(0)
    model = resnet18_shaped().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(n_calib)]
    held = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(4)]
    with torch.no_grad():
        ref = [model(h) for h in held]
    rows = []
    for label, algo in (("round-to-nearest (default)", None), ("GPTQ", "gptq"),
                        ("GPTQ, no act-order", GPTQConfig(act_order=False))):
        t0 = time.perf_counter()
        art = qcompile.compile(model, (held[0],), backend="x86", calibration=calib, algorithm=algo,
                               progress=False, verify=False)
        total = time.perf_counter() - t0
        with torch.no_grad():
            s = min(sqnr(r, art(h)) for r, h in zip(ref, held))
        w = art.report.weight_rounding
        proxy = (sum(v["rel_error"] for v in w.values()) / sum(v["rtn_rel_error"] for v in w.values())) if w else 1.0
        rows.append([label, f"{s:.2f}", f"{total:.1f}", f"{art.report.timings.get('weight_rounding_s', 0.0):.1f}",
                     f"{proxy:.3f}"])
    head = [f"ResNet-18 static int8, {n_calib} x 4 calibration images", "SQNR dB (min of 4 held-out)",
            "compile s", "of which GPTQ s", "layer error vs RTN"]
    return table(rows, head)


def minilm_table() -> str:
    from _fixtures import zoo
    SENTENCES, embed, load_minilm = zoo.SENTENCES, zoo.embed, zoo.load_minilm
    model, tok = load_minilm()
    enc = lambda s: tok(s, padding="max_length", truncation=True, max_length=64, return_tensors="pt")  # noqa: E731
    calib = [(e["input_ids"], e["attention_mask"]) for e in (enc(CALIBRATION[i:i + 4])
                                                             for i in range(0, len(CALIBRATION), 4))]
    ex = (enc(SENTENCES[:4])["input_ids"], enc(SENTENCES[:4])["attention_mask"])
    ref = embed(model, tok, SENTENCES, max_length=64)
    rows = []
    for label, algo in (("round-to-nearest", "rtn"), ("GPTQ", "gptq"), ("GPTQ, no act-order", GPTQConfig(act_order=False))):
        t0 = time.perf_counter()
        art = qcompile.compile(model, ex, backend="x86", mode="weight_only", calibration=calib, algorithm=algo,
                               weights=qcompile.WeightSpec(bits=4, group_size=128, symmetric=False), verify=False)
        total = time.perf_counter() - t0
        e = embed(art, tok, SENTENCES, max_length=64)
        cos = (e * ref).sum(-1)
        rows.append([label, f"{cos.min():.4f}", f"{cos.mean():.4f}", f"{((e - ref) ** 2).sum(-1).mean():.5f}",
                     f"{total:.1f}", f"{art.report.sizes['bits_per_quantized_weight']:.3f}"])
    head = [f"MiniLM-L6 int4 g128 weight-only, {len(CALIBRATION)} calibration sentences", "min cosine",
            "mean cosine", "embedding MSE", "compile s", "bits / weight"]
    return table(rows, head)


def main():
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.skip_resnet:
        print(resnet_table(args.calib) + "\n")
    if not args.skip_minilm:
        print(minilm_table())


if __name__ == "__main__":
    main()

"""Accuracy recovery on a real model and real photographs: EfficientNet-Lite2 (real ImageNet weights) on
130 crops of the photographs shipped in scikit-image (see accuracy_case.py). Calibration on 32 crops,
evaluation on the 98 others (disjoint).

For each backend: float, plain PTQ, each algorithm alone, the combination ("recommended"), w4a8 plain and
with learned rounding, and the accuracy-budgeted search; beside each backend's own flow (torch.ao FX on x86,
ORT quantize_static on ONNX, XNNPACKQuantizer PT2E on ExecuTorch) on the same data.
Columns: top-1 agreement with float (all / confident crops, float > 50 %), SQNR of the logits, median
latency of one crop, stored size, share of the MACs run in int8.

The crops are resized in float, so their pixels are fractional; the row "float, 8-bit px" is the float
model on the same crops with the pixels rounded to 8 bits (what a deployed pipeline feeds): how far
input rounding alone moves it, the ceiling for any model with an 8-bit input. ``--pixels`` runs the whole
table on 8-bit-pixel crops (the float reference then sees them too).

    .venv/bin/python bench/bench_accuracy.py [--backends x86,onnx,executorch] [--rows plain,recommended,...] [--pixels]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_case as case  # noqa: E402
from _timing import machine_line  # noqa: E402

import qcompile  # noqa: E402
from qcompile import WeightSpec  # noqa: E402
from qcompile.passes.adaround import GREEDY_8BIT, GreedyRoundingConfig  # noqa: E402

W4 = WeightSpec(bits=4)
UP_8BIT = GreedyRoundingConfig(max_samples=8, max_flips=64, upstream=True)  # the 8-bit default's budget, upstream
ROWS = {
    "plain": dict(algorithm="rtn"),
    "default": dict(algorithm=None),
    "equalize": dict(algorithm=["equalize"]),
    "bias_correction": dict(algorithm=["bias_correction"]),
    "gptq": dict(algorithm=["gptq"]),
    "adaround": dict(algorithm=["adaround"]),
    "greedy": dict(algorithm=["greedy_rounding"]),
    "exact input": dict(algorithm=["exact_input", "bias_correction"]),
    "exact + greedy": dict(algorithm=["exact_input", "greedy_rounding", "bias_correction"]),
    "upstream": dict(algorithm=[UP_8BIT, "bias_correction"]),
    "exact + greedy8": dict(algorithm=["exact_input", GREEDY_8BIT, "bias_correction"]),  # the default's budget
    "exact + upstream": dict(algorithm=["exact_input", UP_8BIT, "bias_correction"]),
    "recommended": dict(algorithm="recommended"),
    "w4a8 plain": dict(algorithm="rtn", weights=W4),
    "w4a8 default": dict(algorithm=None, weights=W4),
    "w4a8 gptq": dict(algorithm=["gptq"], weights=W4),
    "w4a8 upstream": dict(algorithm=[GreedyRoundingConfig(upstream=True), "bias_correction"], weights=W4),
    "w4a8 recommended": dict(algorithm="recommended", weights=W4),
    "budget 1%": dict(algorithm=None, budget=0.01),
}


def latency_ms(fn, x, repeats: int = 7) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(fn, ev, ref_ev, size) -> dict:
    out = case.agreement(ref_ev, case.run(fn, ev))
    report = getattr(fn, "report", None)
    macs = report.summary()["int8_mac_share"] if report is not None else None
    return {**out, "latency_ms": latency_ms(fn, ev[0]), "size_mb": size / 1e6 if size else float("nan"),
            "int8_macs": macs}


def artifact_size(art) -> int:
    return int(sum(r.get("bytes", 0) for r in getattr(art.report, "storage", []) or []))


def qcompile_row(model, backend, cal, ev, ref_ev, spec: dict) -> dict:
    spec = dict(spec)
    budget = spec.pop("budget", None)
    kw = dict(calibration=cal, verify=False, progress=False, **spec)
    if budget is not None:
        kw["accuracy"] = qcompile.AccuracyBudget(data=ev[:24], max_drop=budget, progress=False)
    art = qcompile.compile(model, (ev[0],), backend, **kw)
    return measure(art, ev, ref_ev, artifact_size(art))


def own_flow(model, backend, cal, ev, ref_ev) -> dict | None:
    """torch.ao FX (x86), ORT quantize_static (onnx), XNNPACKQuantizer PT2E (executorch)."""
    if backend == "x86":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (ev[0],))
        with torch.no_grad():
            for x in cal:
                prepared(x)
        q = convert_fx(prepared)
        return measure(q, ev, ref_ev, None)
    return None  # ONNX / ExecuTorch own flows: see docs/accuracy.md (not measured in this run)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="x86")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--pixels", action="store_true", help="crops with 8-bit pixels (float reference too)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, res = case.load_model()
    samples = case.crops(130, res)
    if args.pixels:
        samples = [case.to_pixels(x) for x in samples]
    cal, ev = case.split(samples)
    ref_ev = case.run(model, ev)
    print(f"EfficientNet-Lite2, {len(ev)} evaluation crops{' (8-bit pixels)' if args.pixels else ''} ({int((ref_ev.softmax(1).max(1).values > 0.5).sum())} "
          f"confident), {len(cal)} calibration crops, {res}x{res}; {machine_line()}, torch {torch.__version__}")
    head = f"{'backend':<11}{'row':<20}{'agree %':>9}{'conf %':>9}{'SQNR dB':>9}{'ms':>9}{'MB':>8}{'int8 MAC %':>11}"
    print(head)
    fl = measure(model, ev, ref_ev, sum(p.numel() * 4 for p in model.parameters()))
    print(f"{'torch':<11}{'float':<20}{100 * fl['agree']:9.1f}{100 * fl['agree_conf']:9.1f}{'inf':>9}"
          f"{fl['latency_ms']:9.1f}{fl['size_mb']:8.2f}{0.0:11.1f}", flush=True)
    if not args.pixels:
        px = case.agreement(ref_ev, case.run(model, [case.to_pixels(x) for x in ev]))
        print(f"{'torch':<11}{'float, 8-bit px':<20}{100 * px['agree']:9.1f}{100 * px['agree_conf']:9.1f}"
              f"{px['sqnr_db']:9.1f}{fl['latency_ms']:9.1f}{fl['size_mb']:8.2f}{0.0:11.1f}", flush=True)
    for backend in args.backends.split(","):
        rows = [(r, None) for r in args.rows.split(",")] + [("own flow", "own")]
        for name, kind in rows:
            try:
                r = own_flow(model, backend, cal, ev, ref_ev) if kind else qcompile_row(model, backend, cal, ev, ref_ev, ROWS[name])
            except Exception as e:  # a row that fails is reported, the table goes on
                print(f"{backend:<11}{name:<20} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if r is None:
                continue
            macs = f"{100 * r['int8_macs']:11.1f}" if r.get("int8_macs") is not None else f"{'-':>11}"
            print(f"{backend:<11}{name:<20}{100 * r['agree']:9.1f}{100 * r['agree_conf']:9.1f}{r['sqnr_db']:9.1f}"
                  f"{r['latency_ms']:9.1f}{r['size_mb']:8.2f}{macs}", flush=True)


if __name__ == "__main__":
    main()

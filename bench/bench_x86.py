"""x86 static int8 on the ResNet-18 shape (batch 4, 224x224): qcompile vs torch.ao FX vs float; and a
transformer encoder (d=384, 6 layers, batch 8 x 128): static int8 vs dynamic int8 vs float.

    python bench/bench_x86.py [--repeats 15] [--calib 8] [--skip-encoder]

Prints one markdown table: latency (median of interleaved runs), speed-up over float, ratio to
torch.ao, SQNR vs float on held-out images, and compile time excluding calibration forwards.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import int8_peak_macs_per_s, interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile.qparams import sqnr  # noqa: E402
from qcompile.demo_shapes import resnet18_shaped  # noqa: E402

warnings.filterwarnings("ignore")


def torch_ao(model, example, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    t0 = time.perf_counter()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,))
    t1 = time.perf_counter()
    with torch.no_grad():
        for x in calib:
            prepared(x)
    t2 = time.perf_counter()
    q = convert_fx(prepared)
    t3 = time.perf_counter()
    return q, (t1 - t0) + (t3 - t2)


def qc(model, example, calib, **kw):
    art = qcompile.compile(model, (example,), backend="x86", calibration=calib, progress=False, **kw)
    t = art.report.timings
    # weight_rounding_s repeats the rounding algorithm's own entry (gptq_s / greedy_rounding_s): counted once
    return art, sum(v for k, v in t.items() if k not in ("calibration_s", "weight_rounding_s"))


def encoder_table(repeats: int) -> str:
    """nn.TransformerEncoder (d=384, 6 layers, 6 heads, ffn 1536), batch 8 x 128: float vs dynamic int8
    vs static int8 (default: attention in fp32; and with attention="int8", Q.K^T and P.V on the int8 batched
    kernel); min cosine of the outputs to float over held-out batches."""
    from torch import nn
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 128, 384, generator=g) for _ in range(8)]
    held = [torch.randn(8, 128, 384, generator=g) for _ in range(3)]
    x = held[0]
    systems = {"float": model,
               "qcompile dynamic int8": qcompile.compile(model, (x,), backend="x86", mode="dynamic", verify=False),
               "qcompile static int8": qcompile.compile(model, (x,), backend="x86", calibration=calib,
                                                        verify=False, progress=False),
               "qcompile static int8, attention='int8'": qcompile.compile(
                   model, (x,), backend="x86", calibration=calib, verify=False, progress=False,
                   backend_options={"attention": "int8"}),
               "qcompile static int8, engine='x86'": qcompile.compile(
                   model, (x,), backend="x86", calibration=calib, verify=False, progress=False,
                   backend_options={"engine": "x86"})}
    with torch.no_grad():
        lat = interleaved({k: (lambda m=m: m(x)) for k, m in systems.items()}, repeats=repeats)
        ref = [model(h) for h in held]

        def cos(m):
            return min(torch.nn.functional.cosine_similarity(r.flatten(1), m(h).flatten(1)).min().item()
                       for r, h in zip(ref, held))
        cosines = {k: cos(m) for k, m in systems.items() if k != "float"}
    mm = [r for r in systems["qcompile static int8, attention='int8'"].report.rows if r.op == "matmul"]
    rows = [[k, f"{lat[k]*1e3:.1f}", f"{lat['float']/lat[k]:.2f}x",
             "-" if k == "float" else f"{lat['qcompile dynamic int8']/lat[k]:.2f}x",
             "-" if k == "float" else f"{cosines[k]:.6f}"] for k in systems]
    default_rows = systems["qcompile static int8"].report.rows
    fused = [r for r in default_rows if r.op == "scaled_dot_product_attention"]
    auto_mm = [r for r in default_rows if r.op == "matmul" and r.status == "int8"]
    note = (f"\nstatic (default, attention='auto'): {len(auto_mm)} attention matmuls int8, {len(fused)} attention ops "
            f"kept fp32; attention='int8': {sum(r.status == 'int8' for r in mm)} of {len(mm)} attention matmuls int8 "
            f"({mm[0].kernel if mm else '-'})")
    return table(rows, ["TransformerEncoder d=384 x6, batch 8x128", "latency ms", "speed-up vs float",
                        "speed-up vs dynamic", "min cosine vs float"]) + note


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--skip-encoder", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = resnet18_shaped().eval()  # torchvision-style init (a BN-calibrated random net is chaotic)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(args.calib)]
    held = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(4)]
    x = held[0]
    ao, ao_compile = torch_ao(model, x, calib)
    arts = {"qcompile x86 (default: engine='auto', kernel family measured per layer)": qc(model, x, calib),
            "qcompile x86, engine='x86' (torch's fixed rule)": qc(model, x, calib, backend_options={"engine": "x86"}),
            "qcompile x86, algorithm='gptq'": qc(model, x, calib, algorithm="gptq")}
    fns = {"float": lambda: model(x), "torch.ao": lambda: ao(x)}
    fns.update({k: (lambda a=a: a(x)) for k, (a, _) in arts.items()})
    with torch.no_grad():
        lat = interleaved(fns, repeats=args.repeats)
        ref = [model(h) for h in held]
        s_ao = min(sqnr(r, ao(h)) for r, h in zip(ref, held))
        s_qc = {k: min(sqnr(r, a(h)) for r, h in zip(ref, held)) for k, (a, _) in arts.items()}
    macs = sum(r.macs for r in arts["qcompile x86, engine='x86' (torch's fixed rule)"][0].report.rows
               if r.status == "int8")
    peak, how = int8_peak_macs_per_s(torch.get_num_threads())

    def share(k):  # achieved int8 MAC rate against the nominal peak (the float row: same MACs in fp32)
        return f"{macs / lat[k] / peak:.0%}" if k != "float" else "-"

    rows = [
        ["float eager", f"{lat['float']*1e3:.1f}", "1.00x", "-", "-", "-", "-"],
        ["torch.ao prepare_fx/convert_fx (x86)", f"{lat['torch.ao']*1e3:.1f}", f"{lat['float']/lat['torch.ao']:.2f}x",
         "1.00", f"{s_ao:.1f}", f"{ao_compile:.2f}", share("torch.ao")],
    ] + [[k, f"{lat[k]*1e3:.1f}", f"{lat['float']/lat[k]:.2f}x", f"{lat[k]/lat['torch.ao']:.2f}", f"{s_qc[k]:.1f}",
          f"{c:.2f}", share(k)] for k, (_, c) in arts.items()]
    art = arts["qcompile x86, algorithm='gptq'"][0]
    print(machine_line())
    print(f"ResNet-18 shape, batch 4, 224x224, median of {args.repeats} interleaved runs; SQNR = min over "
          f"{len(held)} held-out batches; int8 peak = {peak / 1e9:.0f} GMAC/s = {how}; "
          f"{macs / 1e9:.2f} GMAC per batch in int8\n")
    print(table(rows, ["system", "latency ms", "speed-up vs float", "latency / torch.ao", "SQNR dB",
                       "compile s (excl. calibration forwards)", "of int8 peak"]))
    print("\ncompile phases of the gptq run (s):", {k: round(v, 2) for k, v in art.report.timings.items()})
    print("\nqcompile report summary:", art.report.summary())
    if not args.skip_encoder:
        print("\n" + encoder_table(args.repeats))


if __name__ == "__main__":
    main()

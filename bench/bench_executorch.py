#!/usr/bin/env python3
"""ExecuTorch / XNNPACK benchmark: the MobileNetV2-shaped demo model at batch 1, in one run.

Variants, all run by executorch.runtime with XNNPACK delegation:
  et-fp32      ExecuTorch float: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner)
  et-int8      ExecuTorch's own int8 flow: XNNPACKQuantizer(per-channel) + prepare_pt2e / convert_pt2e
  qc-int8      qcompile.compile(backend="executorch") with its defaults (the classifier feeding the output runs
               XNNPACK's dynamically quantized GEMM: int8 weights and compute, fp32 logits)
  qc-int8-qout qcompile with backend_options={"dynamic_output_linears": False} (int8 classifier output, as
               ExecuTorch's own flow)
  qc-int8-fpdw qcompile with backend_options={"float_depthwise": True} (the depthwise convs before
               hardswish in fp32: faster on an x86 host, fp32 weights in the .pte; off by default)

Both int8 flows calibrate on the same images. SQNR is measured against the float model on held-out
images. Latency: every round runs each program once in shuffled order (interleaved, so machine noise
hits all variants alike); the table shows medians and the median of per-round paired ratios.

    python3 bench/bench_executorch.py             # res 224, 16 calibration images, 100 rounds, 1 thread
    python3 bench/bench_executorch.py --quick     # res 96, fewer images / rounds (smoke test)

Dynamic section (``--dynamic``): text encoders, int8 linears with activations quantized at run time:
  et-fp32      as above
  et-dyn       ExecuTorch's own dynamic flow: XNNPACKQuantizer(get_symmetric_quantization_config(
               is_per_channel=True, is_dynamic=True)) + prepare_pt2e / convert_pt2e + XnnpackPartitioner
  qc-dyn       qcompile.compile(backend="executorch", mode="dynamic")
on the demo BERT-shaped encoder (demo_shapes.make_bert_encoder: 4 layers, hidden 256, batch 2 x 32 tokens)
and a Hugging Face BertModel built from its config (bench/conformance_models.py "bert", random weights).
SQNR against the float model on held-out token batches.

    python3 bench/bench_executorch.py --dynamic [--rounds 50]
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_line  # noqa: E402


@dataclass
class Variant:
    name: str
    run: object                      # callable: list of tensors -> list of tensors (the loaded method)
    buffer: bytes                    # the .pte program
    shares: dict
    build_s: float
    times: list = field(default_factory=list)

    @property
    def pte_bytes(self) -> int:
        return len(self.buffer)


_ALIVE = []  # executorch.runtime.Program owners: a Method must not outlive its Program


def _load(buffer: bytes):
    from executorch.runtime import Runtime
    program = Runtime.get().load_program(buffer)
    _ALIVE.append(program)
    return program.load_method("forward")


def _lower(ep):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from qcompile.backends.executorch.delegation import edge_shares
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    shares = edge_shares(edge.exported_program().graph_module)
    buffer = bytes(edge.to_executorch().buffer)
    return buffer, shares


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def build_et_fp32(model, x) -> Variant:
    t0 = time.perf_counter()
    buffer, shares = _lower(torch.export.export(model, _tuple(x)))
    return Variant("et-fp32", _load(buffer).execute, buffer, shares, time.perf_counter() - t0)


def build_et_int8(model, x, calib, dynamic: bool = False) -> Variant:
    """ExecuTorch's own flow. Hugging Face mask code (``arange(n) + 0``) breaks the stock quantizer's
    scalar-to-tensor transform (IndexError); as in bench/conformance_peers.py, retry without it."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class NoScalarAttrs(XNNPACKQuantizer):
        def transform_for_annotation(self, gm):
            return gm
    t0 = time.perf_counter()
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    for cls in (XNNPACKQuantizer, NoScalarAttrs):
        try:
            prepared = prepare_pt2e(torch.export.export(model, _tuple(x)).module(), cls().set_global(cfg))
            with torch.no_grad():
                for c in calib:
                    prepared(*_tuple(c))
            converted = convert_pt2e(prepared)
            buffer, shares = _lower(torch.export.export(converted, _tuple(x)))
            break
        except IndexError:
            if cls is NoScalarAttrs:
                raise
    name = "et-dyn" if dynamic else "et-int8"
    return Variant(name, _load(buffer).execute, buffer, shares, time.perf_counter() - t0)


def build_qcompile(model, x, calib, threads: int, int8_head: bool = False, mode: str = "static",
                   float_depthwise: bool = False) -> Variant:
    import qcompile
    from qcompile.backends.executorch.delegation import shares
    t0 = time.perf_counter()
    options = {"num_threads": threads, **({"dynamic_output_linears": False} if int8_head else {}),
               **({"float_depthwise": True} if float_depthwise else {})}
    art = qcompile.compile(model, _tuple(x), backend="executorch", calibration=calib, progress=False, mode=mode,
                           backend_options=options)
    name = ("qc-dyn" if mode == "dynamic" else "qc-int8-qout" if int8_head else
            "qc-int8-fpdw" if float_depthwise else "qc-int8")
    _ALIVE.append(art)
    return Variant(name, art.lowered.program.method.execute, art.lowered.program.buffer,
                   shares(art.lowered.delegation), time.perf_counter() - t0)


def sqnr_db(model, variant: Variant, images) -> float:
    from qcompile.qparams import sqnr
    with torch.no_grad():
        ref = torch.cat([model(*_tuple(im)) for im in images])
    out = torch.cat([variant.run(list(_tuple(im)))[0] for im in images])
    return sqnr(ref, out)


def time_interleaved(variants: list, x, rounds: int, warmup: int, seed: int) -> None:
    x = list(_tuple(x))
    for v in variants:
        for _ in range(warmup):
            v.run(x)
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            t0 = time.perf_counter()
            v.run(x)
            v.times.append(time.perf_counter() - t0)


def paired_ratio(a: Variant, b: Variant) -> float:
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def table(variants: list, sqnrs: dict, ref: Variant) -> str:
    head = (f"| variant | median ms | p10-p90 ms | ratio vs {ref.name} (paired) | SQNR vs float dB | "
            "delegated compute nodes | delegated conv/linear (int8) | .pte MB | build s |")
    rows = [head, "|" + "---|" * 9]
    for v in variants:
        dec = statistics.quantiles(v.times, n=10)
        s = v.shares
        rows.append(f"| {v.name} | {statistics.median(v.times) * 1e3:.2f} | {dec[0] * 1e3:.2f}-{dec[-1] * 1e3:.2f} | "
                    f"{paired_ratio(v, ref):.3f} | {sqnrs.get(v.name, float('nan')):.2f} | {s['compute']:.1%} | "
                    f"{s['gemm']:.1%} ({s['gemm_int8']:.1%}) | {v.pte_bytes / 1e6:.2f} | {v.build_s:.0f} |")
    return "\n".join(rows)


def verdict(variants: dict, sqnrs: dict) -> str:
    ours, theirs = variants["qc-int8"], variants["et-int8"]
    lines = [f"- latency qc-int8 / et-int8 (median of paired ratios): {paired_ratio(ours, theirs):.3f} "
             f"(target <= 1)",
             f"- SQNR qc-int8 - et-int8: {sqnrs['qc-int8'] - sqnrs['et-int8']:+.2f} dB (target >= 0)",
             f"- delegated compute share qc-int8 - et-int8: {ours.shares['compute'] - theirs.shares['compute']:+.1%}; "
             f"conv/linear delegated: {ours.shares['gemm']:.0%} vs {theirs.shares['gemm']:.0%}"]
    if "qc-int8-qout" in variants:
        q = variants["qc-int8-qout"]
        lines.append(f"- int8 classifier output: latency ratio {paired_ratio(q, theirs):.3f}, "
                     f"SQNR {sqnrs['qc-int8-qout'] - sqnrs['et-int8']:+.2f} dB vs et-int8")
    if "qc-int8-fpdw" in variants:
        q = variants["qc-int8-fpdw"]
        lines.append(f"- float_depthwise=True (x86 host): latency ratio {paired_ratio(q, theirs):.3f}, "
                     f"SQNR {sqnrs['qc-int8-fpdw'] - sqnrs['et-int8']:+.2f} dB vs et-int8, "
                     f"conv/linear int8 {q.shares['gemm_int8']:.0%}, .pte {q.pte_bytes / 1e6:.2f} MB")
    return "\n".join(lines)


# -- dynamic section ---------------------------------------------------------------------------------------
def dynamic_models(n_eval: int) -> list:
    """(label, model, example inputs, held-out inputs) of the text encoders the dynamic section runs."""
    from qcompile import demo_shapes as zoo
    from conformance_models import MODELS
    enc, enc_x = zoo.get_model("bert_encoder")
    bert = MODELS["bert"]
    return [("demo bert_encoder (4 x 256, 2 x 32 tokens)", enc, enc_x,
             [zoo._bert_inputs(seed=100 + i) for i in range(n_eval)]),
            ("HF BertModel from config (conformance 'bert', 2 x 16 tokens)", bert.build(), bert.inputs(0),
             [bert.inputs(100 + i) for i in range(n_eval)])]


def dynamic_verdict(by_name: dict, sqnrs: dict) -> str:
    ours, theirs, fp = by_name["qc-dyn"], by_name["et-dyn"], by_name["et-fp32"]
    return (f"- latency qc-dyn / et-dyn (median of paired ratios): {paired_ratio(ours, theirs):.3f}; "
            f"qc-dyn / et-fp32: {paired_ratio(ours, fp):.3f}\n"
            f"- SQNR qc-dyn - et-dyn: {sqnrs['qc-dyn'] - sqnrs['et-dyn']:+.2f} dB; linears delegated int8: "
            f"{ours.shares['gemm_int8']:.0%} vs {theirs.shares['gemm_int8']:.0%}")


def run_dynamic(a) -> None:
    import executorch.version
    from qcompile.backends.executorch.runtime import set_threads, thread_count
    for label, model, x, held_out in dynamic_models(a.eval):
        set_threads(a.threads)
        built = [build_et_fp32(model, x), build_et_int8(model, x, [x], dynamic=True),
                 build_qcompile(model, x, None, a.threads, None, mode="dynamic")]
        set_threads(a.threads)
        sqnrs = {v.name: sqnr_db(model, v, held_out) for v in built}
        time_interleaved(built, x, a.rounds, a.warmup, a.seed)
        print(f"## Dynamic: {label}; ExecuTorch {executorch.version.__version__} + XNNPACK, {thread_count()} "
              f"thread(s), {a.rounds} interleaved rounds, {a.eval} held-out batches\n")
        print(table(built, sqnrs, built[1]))
        print()
        print(dynamic_verdict({v.name: v for v in built}, sqnrs))
        print()


def main(argv=None) -> int:
    print(machine_line(), flush=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--calib", type=int, default=16, help="calibration images (batch 1)")
    p.add_argument("--eval", type=int, default=8, help="held-out images for SQNR")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="ExecuTorch thread pool size (all variants)")
    p.add_argument("--no-qout", action="store_true", help="skip the int8-classifier-output variant")
    p.add_argument("--no-fpdw", action="store_true", help="skip the float_depthwise=True variant")
    p.add_argument("--quick", action="store_true", help="res 96, 4 calibration / 2 eval images, 15 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="DIR", help="also write each variant's .pte program to DIR")
    p.add_argument("--dynamic", action="store_true", help="the dynamic-mode section (text encoders) instead")
    a = p.parse_args(argv)
    if a.quick:
        a.res, a.calib, a.eval, a.rounds, a.warmup = 96, 4, 2, 15, 2
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if a.dynamic:
        torch.manual_seed(a.seed)
        torch.set_num_threads(1)
        run_dynamic(a)
        return 0
    from qcompile import demo_shapes as zoo
    from qcompile.backends.executorch.runtime import set_threads, thread_count

    torch.manual_seed(a.seed)
    torch.set_num_threads(1)  # export / calibration: 2 intra-op threads thrash on a shared 2-core machine
    model = zoo.make_mobilenet_v2(res=a.res)
    x = zoo.image_batches(1, batch=1, res=a.res, seed=123)[0]
    calib = zoo.image_batches(a.calib, batch=1, res=a.res, seed=1)
    held_out = zoo.image_batches(a.eval, batch=1, res=a.res, seed=2)
    set_threads(a.threads)
    built = [build_et_fp32(model, x), build_et_int8(model, x, calib),
             build_qcompile(model, x, calib, a.threads, None)]
    if not a.no_qout:
        built.append(build_qcompile(model, x, calib, a.threads, True))
    if not a.no_fpdw:
        built.append(build_qcompile(model, x, calib, a.threads, float_depthwise=True))
    set_threads(a.threads)
    sqnrs = {v.name: sqnr_db(model, v, held_out) for v in built}
    time_interleaved(built, x, a.rounds, a.warmup, a.seed)
    by_name = {v.name: v for v in built}
    if a.save:
        os.makedirs(a.save, exist_ok=True)
        for v in built:
            with open(os.path.join(a.save, f"{v.name}.pte"), "wb") as f:
                f.write(v.buffer)
    import executorch.version
    print(f"## ExecuTorch {executorch.version.__version__} + XNNPACK, MobileNetV2-shaped (demo_shapes.make_mobilenet_v2, "
          f"res {a.res}), batch 1, {thread_count()} thread(s), {a.rounds} interleaved rounds, "
          f"{a.calib} calibration / {a.eval} held-out images\n")
    print(table(built, sqnrs, by_name["et-int8"]))
    print()
    print(verdict(by_name, sqnrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
